"""Measuring: every method set up as the runner does it, memory windows, the harness-vs-stock comparison
(timing: ``bench.perf.timing``; the DGST selection benchmark: ``bench.perf.selection``; docs/perf.md says
how and why)."""
from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from torch import nn

from bench.memory import MemoryMeter, release_freed_memory
from bench.perf.results import REFERENCE, NetworkResult, PerfReport
from bench.perf.selection import selection_benchmark
from bench.perf.specs import NetworkSpec, network_spec
from bench.perf.timing import Contestant, paired_ratio, ratio, spread, time_round_robin
from bench.quiet import quiet


def _quiet_trainer(cls, plans: dict, configuration: str, dataset_json: dict, device: torch.device):
    """An nnU-Net trainer object without ``initialize()`` (no preprocessed data needed); its console
    chatter goes to the third-party log."""
    p = copy.deepcopy(plans)
    p["continue_training"] = False
    with quiet():
        return cls(p, configuration, 0, copy.deepcopy(dataset_json), device)


@contextlib.contextmanager
def _scratch_nnunet_folders():
    """nnU-Net trainers create an output folder and log file on construction: keep them out of
    the user's nnU-Net folders."""
    from bench.home import configure_nnunet_env

    configure_nnunet_env()
    tmp = tempfile.mkdtemp(prefix="bench-perf-")
    names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    old = {n: os.environ.get(n) for n in names}
    for n in names:
        os.environ[n] = os.path.join(tmp, n)
    try:
        yield tmp
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v
        shutil.rmtree(tmp, ignore_errors=True)


def make_batch(spec: NetworkSpec, stock_trainer, device: torch.device, seed: int = 0):
    """One random batch in nnU-Net's training format: data (b, c, *patch) and the deep-supervision
    target list, one nearest-neighbour-downsampled label map per output scale."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    g = torch.Generator().manual_seed(seed)
    channels = determine_num_input_channels(stock_trainer.plans_manager, stock_trainer.configuration_manager,
                                            spec.dataset_json)
    data = torch.randn(spec.batch, channels, *spec.patch, generator=g)
    seg = (torch.rand(spec.batch, 1, *spec.patch, generator=g) > 0.9).float()
    targets = []
    for scale in stock_trainer._get_deep_supervision_scales() or [[1.0] * len(spec.patch)]:
        size = [int(round(p * s)) for p, s in zip(spec.patch, scale)]
        targets.append(seg if list(size) == list(spec.patch) else nn.functional.interpolate(seg, size=size))
    return data.to(device), [t.to(device) for t in targets]


def alias_keys(network: nn.Module) -> set:
    """state_dict keys that repeat a tensor already listed under another key. nnU-Net registers
    each conv/norm twice (``.conv`` / ``.all_modules.0``) and the decoder holds the encoder
    (``decoder.encoder.*``): counting those would count the same weights two or three times."""
    seen, aliases = set(), set()
    for key, value in network.state_dict(keep_vars=True).items():
        if id(value) in seen:
            aliases.add(key)
        seen.add(id(value))
    return aliases


def count_entries(state: Dict[str, torch.Tensor], aliases: set) -> int:
    return int(sum(v.numel() for k, v in state.items() if k not in aliases and v.is_floating_point()))


def count_changed(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor], aliases: set) -> int:
    """Entries that differ between two exports, each tensor counted once (keys present in both)."""
    from bench.engine.train import count_changed as count_changed_over
    return count_changed_over(before, after, [k for k, v in before.items() if k not in aliases
                                               and v.is_floating_point() and k in after and after[k].shape == v.shape])


def _context(spec: NetworkSpec, foundation, device, seed):
    from bench.methods.base import MethodContext
    # as the runner builds it: some methods (adapters) export an architecture override from the plans entry
    return MethodContext(foundation_state=foundation, device=device, seed=seed,
                         extra={"architecture": copy.deepcopy(spec.config["architecture"])})


def _train_start(net: nn.Module, loss, data: torch.Tensor, target, device: torch.device):
    """What ``Method.on_train_start`` gets in a run, on the one perf batch."""
    from bench.methods.base import TrainStart
    return TrainStart(net, itertools.repeat({"data": data, "target": target}),
                      lambda batch: loss(net(batch["data"]), batch["target"]), device)


def _dry_run(name: str, device: torch.device) -> None:
    """One step of ``name`` on a throwaway 3-stage network: lazy imports and one-time set-up of the
    method's code path (e.g. peft's first injection: seconds and ~60 MiB) stay out of its measurement."""
    from bench.engine.network import build_network
    from bench.engine.step import make_optimizer, training_step
    from bench.methods import get_method

    spec = network_spec("test", device)
    net = build_network(spec.plans, spec.dataset_json).to(device)
    foundation = {k: v.detach().clone() for k, v in net.state_dict().items()}
    method = get_method(name)
    net = method.prepare(net, _context(spec, foundation, device, 0)).to(device)
    optimizer = make_optimizer("sgd", method.param_groups(net), 1e-3, 3e-5)

    def loss(out, target):
        return sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
    data = torch.randn(spec.batch, 1, *spec.patch, device=device)
    method.on_train_start(_train_start(net, loss, data, data, device))
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    for step in range(2):
        training_step(net, method, optimizer, loss, data, data, step, scaler)
    method.export(net)


def _setup_method(name, spec, foundation, device, seed, loss, batch, meter, warmup):
    """Build, prepare and warm up one method inside a memory window; returns its state."""
    from bench.engine.network import build_network
    from bench.engine.step import make_optimizer, training_step
    from bench.methods import METHODS, get_method
    from bench.engine.recipe import HARNESS_DEFAULTS

    data, target = batch
    meter.start()
    torch.manual_seed(seed)
    net = build_network(spec.plans, spec.dataset_json, spec.configuration)
    net.load_state_dict(foundation)
    net = net.to(device)
    method = get_method(name)
    ctx = _context(spec, foundation, device, seed)
    net = method.prepare(net, ctx).to(device)
    lr = float(METHODS.get(name).spec_overrides.get("lr", HARNESS_DEFAULTS["lr"]))
    optimizer = make_optimizer("sgd", method.param_groups(net), lr, 3e-5)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    with meter.paused():  # the harness's snapshot for the "changed" count is not the method's memory
        before = {k: v.detach().cpu() for k, v in method.export(net)[0].items()}  # export already copies
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        aliases = alias_keys(net)
    method.on_train_start(_train_start(net, loss, data, target, device))
    state = {"net": net, "method": method, "optimizer": optimizer, "scaler": scaler, "step": 0,
             "before": before, "trainable": trainable, "aliases": aliases}

    def step():
        training_step(net, method, optimizer, loss, data, target, state["step"], scaler)
        state["step"] += 1
    state["run"] = step
    net.train()
    for _ in range(warmup):
        step()
    state["peak_bytes"] = meter.stop()
    return state


def measure_network(spec: NetworkSpec, device: torch.device, methods: Sequence[str], steps: int, warmup: int,
                    selection_reps: int, seed: int = 0, log: Callable[[str], None] = print,
                    memory_reps: int = 1) -> NetworkResult:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from bench.engine.network import build_network
    from bench.engine.step import make_optimizer
    from bench.engine.trainer import BenchTrainer
    from bench.methods import get_method

    log(f"[{spec.key}] {spec.title}: patch {'x'.join(map(str, spec.patch))}, batch {spec.batch}, device {device}")
    with _scratch_nnunet_folders():
        stock = _quiet_trainer(nnUNetTrainer, spec.plans, spec.configuration, spec.dataset_json, device)
        harness = _quiet_trainer(BenchTrainer, spec.plans, spec.configuration, spec.dataset_json, device)
        loss = stock._build_loss()  # nnU-Net's loss exactly as its trainer builds it
        batch = make_batch(spec, stock, device, seed)
        torch.manual_seed(seed)
        fnet = build_network(spec.plans, spec.dataset_json, spec.configuration)
        stock_aliases = alias_keys(fnet)
        foundation = {k: v.detach().clone() for k, v in fnet.state_dict().items()}
        total = count_entries(foundation, stock_aliases)
        del fnet

        # 1. harness vs stock nnU-Net: one network, optimizer, loss and GradScaler shared by both. Set up
        #    first: its warm-up also warms the process (kernel caches for these shapes) before any
        #    method's memory is metered.
        torch.manual_seed(seed)
        hnet = build_network(spec.plans, spec.dataset_json, spec.configuration)
        hnet.load_state_dict(foundation)
        full = get_method(REFERENCE)
        hnet = full.prepare(hnet.to(device), _context(spec, foundation, device, seed)).to(device)
        hopt = make_optimizer("sgd", full.param_groups(hnet), 1e-2, 3e-5)
        for trainer in (stock, harness):
            trainer.network, trainer.optimizer, trainer.loss = hnet, hopt, loss
            trainer.grad_scaler = stock.grad_scaler
        harness.method, harness.global_step, harness.step_times = full, 0, []
        tr_batch = {"data": batch[0], "target": batch[1]}
        hnet.train()
        for _ in range(warmup):
            stock.train_step(tr_batch)
            harness.train_step(tr_batch)

        # 2. set-up + warm-up, one method at a time, each in its own memory window
        states: Dict[str, Dict[str, Any]] = {}
        errors: Dict[str, str] = {}
        meter = MemoryMeter(device)
        gc.collect()
        gc.freeze()  # everything alive now is never garbage: later collections stay fast
        try:
            for name in methods:
                t0 = time.perf_counter()
                try:
                    _dry_run(name, device)
                    states[name] = _setup_method(name, spec, foundation, device, seed, loss, batch, meter, warmup)
                except Exception as e:
                    if name == REFERENCE:
                        raise
                    errors[name] = f"set-up failed: {type(e).__name__}: {e}"
                    log(f"  {name}: {errors[name]}")
                    continue
                peak = states[name]["peak_bytes"]
                states[name]["peak_samples"] = [peak]
                log(f"  {name}: set up and {warmup} warm-up steps in {time.perf_counter() - t0:.1f}s, peak "
                    + (f"{peak / 2**20:.0f} MiB" if peak is not None else "n/a"))
            # 2b. more memory windows, rotating the order: a resident-set peak moves by tens of MiB with
            #     what the allocator happens to reuse, so the table reports the median window.
            for rep in range(1, memory_reps):
                alive = [n for n in methods if n in states]
                for name in alive[rep % len(alive):] + alive[:rep % len(alive)]:
                    extra = _setup_method(name, spec, foundation, device, seed, loss, batch, meter, warmup)
                    states[name]["peak_samples"].append(extra["peak_bytes"])
                    del extra  # so that the next window does not reuse its memory
                    release_freed_memory()
                log(f"  memory windows {rep + 1}/{memory_reps} done")
        finally:
            gc.unfreeze()
        for st in states.values():
            samples = [b for b in st["peak_samples"] if b is not None]
            st["peak_bytes"] = statistics.median(samples) if samples else None

        # 3. interleaved timing
        contestants = [Contestant(n, s["run"]) for n, s in states.items()]
        contestants += [Contestant("nnunet:stock", lambda: stock.train_step(tr_batch)),
                        Contestant("nnunet:harness", lambda: harness.train_step(tr_batch))]
        log(f"  timing {steps} interleaved rounds of {len(contestants)} steps")
        time_round_robin(contestants, steps, device, log)
        by_name = {c.name: c for c in contestants}

        # 4. rows
        ref_times = by_name[REFERENCE].times
        ref = spread(ref_times)["median_s"]
        ref_mem = states[REFERENCE]["peak_bytes"]
        rows = []
        for name in methods:
            if name in errors:
                rows.append({"method": name, "error": errors[name]})
                continue
            s, c = states[name], by_name[name]
            after = s["method"].export(s["net"])[0]
            sp = spread(c.times)
            peak = s["peak_bytes"]
            rows.append({"method": name, "trainable": s["trainable"],
                         "changed": count_changed(s["before"], {k: v.detach().cpu() for k, v in after.items()},
                                                  stock_aliases | s["aliases"]),
                         "total": total, **sp, "step_ratio": paired_ratio(c.times, ref_times),
                         "peak_mib": None if peak is None else peak / 2**20,
                         "memory_ratio": ratio(peak, ref_mem), "error": c.error})
        harness_result = {"stock": spread(by_name["nnunet:stock"].times),
                          "harness": spread(by_name["nnunet:harness"].times)}
        harness_result["ratio"] = paired_ratio(by_name["nnunet:harness"].times, by_name["nnunet:stock"].times)
        log(f"  harness/stock nnU-Net: {harness_result['ratio']:.3f}")

        # 5. selection, on the full network's gradients
        selection = selection_benchmark(states[REFERENCE], spec, loss, batch, device, selection_reps, log)
        selection["share_of_full_step"] = ratio(selection["ours"]["median_s"], ref)
        del states, contestants, by_name, stock, harness, hnet, hopt
        release_freed_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return NetworkResult(spec.key, spec.title, spec.patch, spec.batch, spec.features, total, rows, selection,
                         harness_result)


def resolve_device(name: str) -> torch.device:
    from bench.engine.train import resolve_device as _resolve
    return _resolve(name)


def device_description(device: torch.device) -> Tuple[str, str]:
    """(human-readable name, file-name slug)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return name, "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU: {cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})", "cpu"


def default_settings(device: torch.device) -> Dict[str, int]:
    """CPU: a quick look (a few minutes); CUDA: enough rounds for a stable median."""
    return {"steps": 8, "warmup": 2, "selection_reps": 3, "memory_reps": 3} if device.type != "cuda" else \
        {"steps": 20, "warmup": 3, "selection_reps": 10, "memory_reps": 1}  # the CUDA allocator's peak is exact


def run_perf(networks: Sequence[NetworkSpec], device: torch.device, methods: Sequence[str], steps: int,
             warmup: int, selection_reps: int, seed: int = 0, log: Callable[[str], None] = print,
             memory_reps: int = 1) -> PerfReport:
    from bench.provenance import versions

    if warmup < 2:
        raise ValueError("--warmup must be >= 2: peak memory is taken over the warm-up steps, and step 2 is the "
                         "first with the optimizer state alive during forward and backward")
    if steps < 1:
        raise ValueError("--steps must be >= 1")
    if memory_reps < 1:
        raise ValueError("--memory-reps must be >= 1")
    name, slug = device_description(device)
    results = [measure_network(spec, device, methods, steps, warmup, selection_reps, seed, log, memory_reps)
               for spec in networks]
    memory_method = ("torch.cuda.max_memory_allocated above the allocation at the window's start "
                     "(reset_peak_memory_stats per method)" if device.type == "cuda" else
                     "resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs) above the resident "
                     "set at the window's start, after gc + malloc_trim; tracemalloc does not see torch")
    return PerfReport(device=device.type, device_name=name, device_slug=slug,
                      date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), versions=versions(),
                      threads=torch.get_num_threads(), steps=steps, warmup=warmup, selection_reps=selection_reps,
                      seed=seed, networks=results, memory_method=memory_method, memory_reps=memory_reps)
