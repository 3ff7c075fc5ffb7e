"""Measuring: every method set up as the runner does it, memory windows, round-robin timing, the DGST
selection benchmark and the harness-vs-stock comparison (docs/perf.md says how and why)."""
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from bench.memory import MemoryMeter, release_freed_memory, sync as _sync
from bench.perf.results import REFERENCE, NetworkResult, PerfReport
from bench.perf.specs import NetworkSpec, network_spec
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


@dataclass
class _Contestant:
    name: str
    step: Callable[[], Any]
    times: List[float] = field(default_factory=list)
    error: Optional[str] = None


def _time_round_robin(contestants: List[_Contestant], rounds: int, device: torch.device,
                      log: Callable[[str], None]) -> None:
    """Every round times one step of every contestant; the start rotates each round."""
    for r in range(rounds):
        order = contestants[r % len(contestants):] + contestants[:r % len(contestants)]
        for c in order:
            if c.error:
                continue
            try:
                _sync(device)
                t0 = time.perf_counter()
                c.step()
                _sync(device)
                c.times.append(time.perf_counter() - t0)
            except Exception as e:  # one broken method must not hide the others' numbers
                c.error = f"timed step failed: {type(e).__name__}: {e}"
                log(f"  {c.name}: {c.error}")
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{c.name} {c.times[-1]:.3f}s" for c in contestants
                                                      if c.times and not c.error))


def _spread(times: List[float]) -> Dict[str, float]:
    if not times:
        return {"median_s": float("nan"), "q25_s": float("nan"), "q75_s": float("nan"), "n": 0}
    if len(times) == 1:
        q25 = q75 = times[0]
    else:
        q = statistics.quantiles(times, n=4, method="inclusive")
        q25, q75 = q[0], q[2]
    return {"median_s": statistics.median(times), "q25_s": q25, "q75_s": q75, "n": len(times)}


def _paired_ratio(times: List[float], reference: List[float]) -> Optional[float]:
    """Median over rounds of the within-round ratio: load drift between rounds cancels."""
    pairs = [a / b for a, b in zip(times, reference) if b > 0]
    return statistics.median(pairs) if pairs else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


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


def _selection_benchmark(full_state, spec, loss, batch, device, reps, log) -> Dict[str, Any]:
    """DGST's selection vs the released one on the same gradients of the full network."""
    from bench.methods import METHODS
    from bench.methods.dgst import partition
    from bench.methods.dgst.released import released_selection
    from bench.methods.dgst.selection import entries_per_row, mask_from_indices, topk_indices

    net, data, target = full_state["net"], batch[0], batch[1]
    net.zero_grad(set_to_none=True)
    amp = torch.autocast(device.type) if device.type == "cuda" else contextlib.nullcontext()
    with amp:
        out = loss(net(data), target)
    out.backward()
    params = dict(net.named_parameters())
    names = [n for n in partition(net)["sparse"] if params[n].grad is not None]
    grads = {n: params[n].grad.detach().clone() for n in names}
    net.zero_grad(set_to_none=True)
    gamma = METHODS.get("dgst").defaults["gamma"]

    def ours():  # what the training step runs: flat indices, no dense mask
        return {n: topk_indices(g, gamma) for n, g in grads.items()}

    def released():
        return released_selection(grads, int(gamma), fill_mask=True)

    t_ours, t_rel = [], []
    masks_ours = masks_rel = None
    for _ in range(max(1, reps)):  # interleaved
        for fn, times in ((ours, t_ours), (released, t_rel)):
            _sync(device)
            t0 = time.perf_counter()
            res = fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
            if fn is ours:
                masks_ours = res
            else:
                masks_rel = res
            del res
    entries = agree = rows = rows_equal = tie_rows = 0
    for n, g in grads.items():
        a, b = mask_from_indices(masks_ours[n], g), masks_rel[n]
        entries += a.numel()
        agree += int((a == b).sum())
        ra, rb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        diff_rows = (ra != rb).any(dim=1)
        rows += ra.shape[0]
        rows_equal += int((~diff_rows).sum())
        if diff_rows.any():  # tied |grad| at the k-th place explains a difference
            k = entries_per_row(gamma, ra.shape[1])
            if k < ra.shape[1]:
                top = g.reshape(g.shape[0], -1).abs().topk(k + 1, dim=1).values
                tie_rows += int((diff_rows & (top[:, k - 1] == top[:, k])).sum())
    row_lengths = [g[0].numel() for g in grads.values()]
    result = {"tensors": len(grads), "entries": entries, "gamma": gamma, "max_row_length": max(row_lengths),
              "ours": _spread(t_ours), "released": _spread(t_rel),
              "speedup": _ratio(statistics.median(t_rel), statistics.median(t_ours)),
              "agreement": agree / entries if entries else float("nan"),
              "rows": rows, "rows_equal": rows_equal, "rows_differing_by_ties": tie_rows,
              "rows_differing_otherwise": rows - rows_equal - tie_rows}
    log(f"  selection: ours {result['ours']['median_s']:.4f}s, released {result['released']['median_s']:.4f}s "
        f"({result['speedup']:.1f}x); masks agree on {result['agreement']:.6f} of {entries:,} entries")
    return result


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
        contestants = [_Contestant(n, s["run"]) for n, s in states.items()]
        contestants += [_Contestant("nnunet:stock", lambda: stock.train_step(tr_batch)),
                        _Contestant("nnunet:harness", lambda: harness.train_step(tr_batch))]
        log(f"  timing {steps} interleaved rounds of {len(contestants)} steps")
        _time_round_robin(contestants, steps, device, log)
        by_name = {c.name: c for c in contestants}

        # 4. rows
        ref_times = by_name[REFERENCE].times
        ref = _spread(ref_times)["median_s"]
        ref_mem = states[REFERENCE]["peak_bytes"]
        rows = []
        for name in methods:
            if name in errors:
                rows.append({"method": name, "error": errors[name]})
                continue
            s, c = states[name], by_name[name]
            after = s["method"].export(s["net"])[0]
            sp = _spread(c.times)
            peak = s["peak_bytes"]
            rows.append({"method": name, "trainable": s["trainable"],
                         "changed": count_changed(s["before"], {k: v.detach().cpu() for k, v in after.items()},
                                                  stock_aliases | s["aliases"]),
                         "total": total, **sp, "step_ratio": _paired_ratio(c.times, ref_times),
                         "peak_mib": None if peak is None else peak / 2**20,
                         "memory_ratio": _ratio(peak, ref_mem), "error": c.error})
        harness_result = {"stock": _spread(by_name["nnunet:stock"].times),
                          "harness": _spread(by_name["nnunet:harness"].times)}
        harness_result["ratio"] = _paired_ratio(by_name["nnunet:harness"].times, by_name["nnunet:stock"].times)
        log(f"  harness/stock nnU-Net: {harness_result['ratio']:.3f}")

        # 5. selection, on the full network's gradients
        selection = _selection_benchmark(states[REFERENCE], spec, loss, batch, device, selection_reps, log)
        selection["share_of_full_step"] = _ratio(selection["ours"]["median_s"], ref)
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
