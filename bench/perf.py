"""``bench perf``: what each method costs per training step, measured side by side.

For one network and patch size, every registered method is set up exactly as
the runner does it (foundation weights -> ``Method.prepare`` -> nnU-Net's SGD)
and trained on one random batch with nnU-Net's own loss (built by
``nnUNetTrainer._build_loss``: Dice + CE with deep supervision) through the
harness step (``bench.engine.step.training_step``; AMP and a GradScaler on CUDA).

- Step time: all methods are timed in ONE process, round-robin: every round
  times one step of every method (the order rotates each round), so machine
  drift and load affect all methods alike. Median and IQR over the rounds; on
  CUDA ``torch.cuda.synchronize()`` brackets every timed step. Ratios to full
  fine-tuning (and harness / stock) are medians of the within-round ratios.
- Peak memory: methods are set up one after another, each in a metered window
  from just before its network is built to the end of its warm-up steps
  (weights, gradients, optimizer state, method state, activations; the shared
  input batch and foundation checkpoint are outside the window). CUDA:
  ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` at the window's
  start, after ``reset_peak_memory_stats``. CPU: tracemalloc does not see torch's
  allocations, so the process's resident-set high-water mark (``VmHWM``, reset
  through ``/proc/self/clear_refs``) above the resident set at the window's start,
  after ``gc.collect()`` and glibc ``malloc_trim(0)`` hand freed memory back to the
  OS. In-process and sequential, it needs no subprocess per method (a fresh
  interpreter costs seconds of imports per method); where ``clear_refs`` is not
  available (non-Linux) the CPU number is reported as unavailable.
- Parameters: trainable (``requires_grad``) and actually changed (entries of the
  exported, nnU-Net-loadable weights that differ after warm-up + timed steps;
  nnU-Net's aliased ``all_modules`` keys counted once).
- DGST selection: on the same gradients (one backward pass of the full network),
  the suite's ``topk_indices`` over every sparse tensor against the released
  trainer's selection (``released_selection(..., fill_mask=True)``: a dense
  ``eye(row_length)`` per tensor and two argsorts), timed interleaved, masks
  compared entry by entry (rows that differ only because of tied |gradient|
  values are counted separately).
- Harness overhead: ``BenchTrainer.train_step`` (``training_step`` with ``full``)
  against stock ``nnUNetTrainer.train_step`` on the same network object,
  optimizer, loss, GradScaler and batch, interleaved.

The numbers are written to ``<out>/perf_<device>.md`` and ``.csv`` (regenerated
by the command, never edited by hand) and logged to MLflow as a run tagged
``kind=perf``. Targets are printed next to the ratios, not asserted.
"""
from __future__ import annotations

import contextlib
import copy
import csv
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
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from bench.engine.network import ONE_LABEL_DATASET_JSON
from bench.memory import MemoryMeter, release_freed_memory, sync as _sync
from bench.quiet import quiet

REFERENCE = "full"
DATASET_JSON = {**ONE_LABEL_DATASET_JSON, "numTraining": 0, "file_ending": ".nii.gz"}

# Printed next to the measured ratios; never asserted (timings depend on the machine).
TARGETS = {
    "dgst_step_ratio": ("<=", 1.05, "DGST step time / full fine-tuning"),
    "dgst_memory_ratio": ("<=", 1.05, "DGST peak memory / full fine-tuning"),
    "harness_ratio": ("<=", 1.03, "harness step / stock nnU-Net train_step"),
    "selection_speedup": (">=", 50.0, "released selection time / DGST selection time (default architecture)"),
}


# --------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------
@dataclass
class NetworkSpec:
    key: str
    title: str
    plans: dict
    dataset_json: dict = field(default_factory=lambda: copy.deepcopy(DATASET_JSON))
    configuration: str = "3d_fullres"

    @property
    def config(self) -> dict:
        return self.plans["configurations"][self.configuration]

    @property
    def patch(self) -> Tuple[int, ...]:
        return tuple(self.config["patch_size"])

    @property
    def batch(self) -> int:
        return int(self.config["batch_size"])

    @property
    def features(self) -> List[int]:
        return list(self.config["architecture"]["arch_kwargs"]["features_per_stage"])


def default_hn_plans(patch_size: Sequence[int] = (56, 192, 160), batch_size: int = 2,
                     dataset_name: str = "Dataset990_HeadNeckCT") -> dict:
    """nnU-Net's default 3d_fullres architecture as its planner makes it for head-and-neck CT
    with ~3 mm slices: PlainConvUNet, 6 stages, 32..320 features, in-plane-only first pooling
    and last pooling (anisotropic spacing), 2 convs per stage. Weights are random here."""
    from bench.engine.network import tiny_plans

    features = (32, 64, 128, 256, 320, 320)
    plans = tiny_plans(dataset_name, patch_size=patch_size, spacing=(3.0, 0.98, 0.98), features=features,
                       batch_size=batch_size)
    plans["experiment_planner_used"] = "bench.perf.default_hn_plans (nnU-Net default 3d_fullres, H&N CT)"
    cfg = plans["configurations"]["3d_fullres"]
    cfg["median_image_size_in_voxels"] = [120, 512, 512]
    arch = cfg["architecture"]["arch_kwargs"]
    arch["kernel_sizes"] = [[1, 3, 3]] + [[3, 3, 3]] * 5
    arch["strides"] = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    return plans


def _check_patch(spec: NetworkSpec) -> None:
    strides = spec.config["architecture"]["arch_kwargs"]["strides"]
    total = [1, 1, 1]
    for s in strides:
        total = [t * v for t, v in zip(total, s)]
    bad = [f"{p} (axis {i}) is not a multiple of {t}" for i, (p, t) in enumerate(zip(spec.patch, total)) if p % t]
    if bad:
        raise ValueError(f"patch {list(spec.patch)} does not fit the {spec.key} network's pooling: "
                         + "; ".join(bad))
    if all(p // t <= 1 for p, t in zip(spec.patch, total)):
        raise ValueError(f"patch {list(spec.patch)} leaves a 1x1x1 bottleneck in the {spec.key} network; "
                         f"instance norm needs more than one voxel there: use at least "
                         f"{[2 * t if i == 0 else t for i, t in enumerate(total)]}")


def network_spec(key: str, device: torch.device, patch: Optional[Sequence[int]] = None,
                 batch: Optional[int] = None) -> NetworkSpec:
    """``tiny``: the phantom foundation's architecture; ``default``: nnU-Net's default
    3d_fullres for H&N CT (patch 56x192x160 on CUDA, 16x64x64 batch 1 on CPU);
    ``stunet``: STU-Net-S at its published widths (patch 128^3 on CUDA, 64^3 batch 1 on CPU);
    ``test``: a seconds-fast network for the test-suite."""
    from bench.engine.network import tiny_plans
    from bench.foundation import PHANTOM_INTENSITY

    cpu = device.type != "cuda"
    if key == "tiny":
        plans = tiny_plans("Dataset902_PhantomTarget", patch_size=tuple(patch or (32, 64, 64)),
                           features=(8, 16, 32, 64), batch_size=batch or 2, intensity=PHANTOM_INTENSITY)
        spec = NetworkSpec("tiny", "phantom foundation architecture (PlainConvUNet, 4 stages, 8-64 features)", plans)
    elif key == "default":
        default_patch, default_batch = ((16, 64, 64), 1) if cpu else ((56, 192, 160), 2)
        plans = default_hn_plans(tuple(patch or default_patch), batch or default_batch)
        spec = NetworkSpec("default", "nnU-Net default 3d_fullres for H&N CT (PlainConvUNet, 6 stages, "
                                      "32-320 features)", plans)
    elif key == "test":
        plans = tiny_plans("Dataset999_Tiny", patch_size=tuple(patch or (8, 16, 16)), features=(4, 8, 16),
                           batch_size=batch or 1)
        spec = NetworkSpec("test", "test network (PlainConvUNet, 3 stages, 4-16 features)", plans)
    elif key == "stunet":  # STU-Net-S at its published widths; its 128^3 patch on CUDA
        from bench.architectures.stunet import STUNET_SIZES, stunet_architecture
        plans = tiny_plans("Dataset991_STUNetS", patch_size=tuple(patch or ((64, 64, 64) if cpu else (128,) * 3)),
                           spacing=(1.5, 1.5, 1.5), features=STUNET_SIZES["S"]["features_per_stage"],
                           batch_size=batch or (1 if cpu else 2))
        plans["configurations"]["3d_fullres"]["architecture"] = stunet_architecture(
            STUNET_SIZES["S"]["features_per_stage"], STUNET_SIZES["S"]["n_blocks_per_stage"], [[1, 1, 1]] + [[2] * 3] * 5)
        spec = NetworkSpec("stunet", "STU-Net-S (bench.architectures.stunet, 6 stages, 16-256 features)", plans)
    else:
        raise ValueError(f"unknown network {key!r}: use tiny, default, stunet or both")
    _check_patch(spec)
    return spec


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
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


@dataclass
class NetworkResult:
    key: str
    title: str
    patch: Tuple[int, ...]
    batch: int
    features: List[int]
    total_params: int
    rows: List[Dict[str, Any]]
    selection: Dict[str, Any]
    harness: Dict[str, Any]


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


def _dry_run(name: str, device: torch.device, shell) -> None:
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
    shell.network, shell.method, shell.optimizer, shell.loss = net, method, optimizer, loss
    shell.dataloader_train = shell.dataloader_val = itertools.repeat({"data": data, "target": data})
    method.on_train_start(shell)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    for step in range(2):
        training_step(net, method, optimizer, loss, data, data, step, scaler)
    method.export(net)
    shell.network = shell.method = shell.optimizer = shell.loss = None
    shell.dataloader_train = shell.dataloader_val = None


def _setup_method(name, spec, foundation, device, seed, loss, batch, shell, meter, warmup):
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
    shell.network, shell.method, shell.ctx = net, method, ctx
    shell.optimizer, shell.grad_scaler, shell.loss = optimizer, scaler, loss
    shell.dataloader_train = shell.dataloader_val = itertools.repeat({"data": data, "target": target})
    method.on_train_start(shell)
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
        shell = _quiet_trainer(BenchTrainer, spec.plans, spec.configuration, spec.dataset_json, device)
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
                    _dry_run(name, device, shell)
                    states[name] = _setup_method(name, spec, foundation, device, seed, loss, batch, shell, meter,
                                                 warmup)
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
                    extra = _setup_method(name, spec, foundation, device, seed, loss, batch, shell, meter, warmup)
                    states[name]["peak_samples"].append(extra["peak_bytes"])
                    del extra  # with the shell's references, so the next window does not reuse its memory
                    shell.network = shell.method = shell.optimizer = shell.loss = shell.ctx = None
                    shell.dataloader_train = shell.dataloader_val = None
                    release_freed_memory()
                log(f"  memory windows {rep + 1}/{memory_reps} done")
        finally:
            gc.unfreeze()
        shell.network = shell.method = shell.optimizer = None
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
        del states, contestants, by_name, stock, harness, shell, hnet, hopt
        release_freed_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return NetworkResult(spec.key, spec.title, spec.patch, spec.batch, spec.features, total, rows, selection,
                         harness_result)


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
@dataclass
class PerfReport:
    device: str
    device_name: str
    device_slug: str
    date: str
    versions: Dict[str, str]
    threads: int
    steps: int
    warmup: int
    selection_reps: int
    seed: int
    networks: List[NetworkResult]
    memory_method: str
    memory_reps: int = 1


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


def _fmt(v, spec: str = ".3f", none: str = "n/a") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return none
    return format(v, spec)


def _verdict(key: str, value: Optional[float]) -> str:
    op, bound, _ = TARGETS[key]
    if value is None:
        return f"target {op} {bound:g}: n/a"
    ok = value <= bound if op == "<=" else value >= bound
    return f"target {op} {bound:g}{'x' if key != 'harness_ratio' else ''}: {'met' if ok else 'NOT met'}"


def method_table(net: NetworkResult) -> List[List[str]]:
    head = ["method", "trainable", "changed", "step s (median)", "IQR s", "step x full", "peak MiB", "memory x full",
            "note"]
    lines = [head]
    for r in net.rows:
        if r.get("error") and "median_s" not in r:
            lines.append([r["method"]] + [""] * 7 + [r["error"]])
            continue
        note = r.get("error") or ""
        if r["method"] == "dgst":
            note = "; ".join(x for x in (note, "step " + _verdict("dgst_step_ratio", r["step_ratio"]),
                                         "memory " + _verdict("dgst_memory_ratio", r["memory_ratio"])) if x)
        lines.append([r["method"], f"{r['trainable']:,}", f"{r['changed']:,}", _fmt(r["median_s"], ".3f"),
                      f"{_fmt(r['q25_s'])}-{_fmt(r['q75_s'])}", _fmt(r["step_ratio"], ".3f"),
                      _fmt(r["peak_mib"], ".0f"), _fmt(r["memory_ratio"], ".3f"), note])
    return lines


def _md_table(lines: List[List[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "|".join("---" for _ in lines[0]) + "|"]
    out += ["| " + " | ".join(l) + " |" for l in lines[1:]]
    return "\n".join(out)


def _text_table(lines: List[List[str]]) -> str:
    widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 or i == len(l) - 1 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(l, widths))).rstrip() for l in lines)


def _selection_lines(net: NetworkResult) -> List[str]:
    s = net.selection
    key = "selection_speedup"
    target = _verdict(key, s["speedup"]) + ("" if net.key == "default" else " (target set for the default architecture)")
    return [f"DGST selection (topk_indices) vs released selection (eye(row_length) + two argsorts), same gradients: "
            f"{s['tensors']} sparse tensors, {s['entries']:,} entries, gamma {s['gamma']}, longest row "
            f"{s['max_row_length']:,}",
            f"  ours {_fmt(s['ours']['median_s'], '.4f')} s (IQR {_fmt(s['ours']['q25_s'], '.4f')}-"
            f"{_fmt(s['ours']['q75_s'], '.4f')}), {_fmt(100 * (s['share_of_full_step'] or float('nan')), '.1f')}% "
            f"of a full fine-tuning step; released {_fmt(s['released']['median_s'], '.4f')} s (IQR "
            f"{_fmt(s['released']['q25_s'], '.4f')}-{_fmt(s['released']['q75_s'], '.4f')}); "
            f"speed-up {_fmt(s['speedup'], '.1f')}x ({target})",
            f"  masks agree on {s['agreement']:.6f} of entries; {s['rows_equal']:,}/{s['rows']:,} rows identical, "
            f"{s['rows_differing_by_ties']} differ only by tied |gradient|, {s['rows_differing_otherwise']} otherwise"]


def _harness_line(net: NetworkResult) -> str:
    h = net.harness
    return (f"Harness overhead: BenchTrainer.train_step (training_step + full) {_fmt(h['harness']['median_s'])} s "
            f"(IQR {_fmt(h['harness']['q25_s'])}-{_fmt(h['harness']['q75_s'])}) vs stock nnUNetTrainer.train_step "
            f"{_fmt(h['stock']['median_s'])} s (IQR {_fmt(h['stock']['q25_s'])}-{_fmt(h['stock']['q75_s'])}) on the "
            f"same network, optimizer, loss and batch: ratio {_fmt(h['ratio'])} ({_verdict('harness_ratio', h['ratio'])})")


def _header(report: PerfReport) -> List[str]:
    v = report.versions
    amp = "AMP (autocast + GradScaler)" if report.device == "cuda" else "fp32 (no AMP on CPU, as nnU-Net)"
    return [f"device: {report.device_name}",
            f"date: {report.date}; torch {v.get('torch', '?')}, nnunetv2 {v.get('nnunetv2', '?')}, "
            f"bench {v.get('bench', '?')}, python {v.get('python', '?')}",
            f"steps: {report.steps} timed rounds (round-robin over all methods, rotating start), {report.warmup} "
            f"warm-up steps per method, selection repetitions {report.selection_reps}, seed {report.seed}; "
            f"'x full' and harness/stock are medians of within-round ratios",
            f"step: bench.engine.step.training_step, nnU-Net SGD (momentum 0.99, nesterov, weight decay 3e-5), "
            f"nnU-Net loss (nnUNetTrainer._build_loss: Dice + CE, deep supervision), random data and labels, {amp}",
            f"peak memory: per method, from before its network is built to the end of its warm-up steps, median "
            f"of {report.memory_reps} such window(s) in rotating order; {report.memory_method}",
            "changed: entries of the exported weights that differ after warm-up + timed steps "
            "(random 'foundation' weights)"]


def render_text(report: PerfReport) -> str:
    out = [f"bench perf on {report.device_name}"] + ["  " + h for h in _header(report)[1:]]
    for net in report.networks:
        out += ["", f"[{net.key}] {net.title}: patch {'x'.join(map(str, net.patch))}, batch {net.batch}, "
                    f"{net.total_params:,} parameters", _text_table(method_table(net)), ""]
        out += _selection_lines(net) + [_harness_line(net)]
    return "\n".join(out)


def render_markdown(report: PerfReport) -> str:
    out = [f"# Training-step cost per method ({report.device_slug})", "",
           "<!-- generated by `bench perf`; never edit by hand: rerun the command -->", ""]
    out += [f"- {h}" for h in _header(report)]
    for net in report.networks:
        out += ["", f"## {net.key}: {net.title}", "",
                f"patch {'x'.join(map(str, net.patch))}, batch {net.batch}, features {net.features}, "
                f"{net.total_params:,} parameters", "", _md_table(method_table(net)), ""]
        sel = _selection_lines(net)
        out += [sel[0], "", "- " + sel[1].strip(), "- " + sel[2].strip(), "", _harness_line(net)]
    return "\n".join(out) + "\n"


CSV_FIELDS = ["section", "network", "patch", "batch", "name", "median_s", "q25_s", "q75_s", "n", "ratio",
              "ratio_to", "target", "peak_mib", "memory_ratio", "trainable", "changed", "total", "agreement", "error"]


def csv_rows(report: PerfReport) -> List[Dict[str, Any]]:
    out = []
    for net in report.networks:
        common = {"network": net.key, "patch": "x".join(map(str, net.patch)), "batch": net.batch}
        for r in net.rows:
            target = ""
            if r["method"] == "dgst":
                target = f"step<={TARGETS['dgst_step_ratio'][1]};memory<={TARGETS['dgst_memory_ratio'][1]}"
            out.append({"section": "method", **common, "name": r["method"],
                        **{k: r.get(k) for k in ("median_s", "q25_s", "q75_s", "n", "peak_mib", "memory_ratio",
                                                 "trainable", "changed", "total", "error")},
                        "ratio": r.get("step_ratio"), "ratio_to": REFERENCE, "target": target})
        s = net.selection
        out.append({"section": "selection", **common, "name": "dgst-topk", **s["ours"],
                    "ratio": s["share_of_full_step"], "ratio_to": "full step", "agreement": s["agreement"]})
        out.append({"section": "selection", **common, "name": "released", **s["released"], "ratio": s["speedup"],
                    "ratio_to": "dgst-topk (speed-up)", "target": f">={TARGETS['selection_speedup'][1]:g} (default)",
                    "agreement": s["agreement"]})
        h = net.harness
        out.append({"section": "harness", **common, "name": "nnunet-stock", **h["stock"]})
        out.append({"section": "harness", **common, "name": "harness", **h["harness"], "ratio": h["ratio"],
                    "ratio_to": "nnunet-stock", "target": f"<={TARGETS['harness_ratio'][1]}"})
    for row in out:
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = f"{v:.6g}"
    return out


def write_report(report: PerfReport, out_dir, suffix: str = "") -> Tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"perf_{report.device_slug}{suffix}"
    md, cs = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(render_markdown(report))
    tmp.replace(md)
    tmp = cs.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(csv_rows(report))
    tmp.replace(cs)
    return md, cs


def _metric_key(*parts: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", p) for p in parts)


def log_report(report: PerfReport, files: Sequence[Path], tracking_uri: Optional[str] = None) -> str:
    """One MLflow run tagged kind=perf: settings as params, every number as a metric, the table as artefacts."""
    from bench import tracking

    tags = {"kind": "perf", "device": report.device_name, "device_slug": report.device_slug}
    with tracking.start_run(f"perf-{report.device_slug}", tags, tracking_uri) as run_id:
        params = {"device": report.device, "device_name": report.device_name[:500], "steps": report.steps,
                  "warmup": report.warmup, "selection_reps": report.selection_reps, "seed": report.seed,
                  "memory_reps": report.memory_reps,
                  "threads": report.threads, "memory_method": report.memory_method[:500],
                  **{f"versions.{k}": v for k, v in report.versions.items()}}
        for net in report.networks:
            params[f"{net.key}.patch"] = "x".join(map(str, net.patch))
            params[f"{net.key}.batch"] = net.batch
            params[f"{net.key}.features"] = ",".join(map(str, net.features))
            params[f"{net.key}.methods"] = ",".join(r["method"] for r in net.rows)[:500]
        tracking.log_params({k: str(v) for k, v in params.items()})
        metrics: Dict[str, float] = {}
        for net in report.networks:
            for r in net.rows:
                for k in ("median_s", "q25_s", "q75_s", "step_ratio", "peak_mib", "memory_ratio", "trainable",
                          "changed"):
                    v = r.get(k)
                    if isinstance(v, (int, float)) and v == v:
                        metrics[_metric_key(net.key, r["method"], k)] = float(v)
            s, h = net.selection, net.harness
            for k, v in (("selection/ours_median_s", s["ours"]["median_s"]),
                         ("selection/released_median_s", s["released"]["median_s"]),
                         ("selection/speedup", s["speedup"]), ("selection/agreement", s["agreement"]),
                         ("selection/share_of_full_step", s["share_of_full_step"]),
                         ("harness/stock_median_s", h["stock"]["median_s"]),
                         ("harness/harness_median_s", h["harness"]["median_s"]), ("harness/ratio", h["ratio"])):
                if isinstance(v, (int, float)) and v == v:
                    metrics[f"{net.key}/{k}"] = float(v)
        tracking.log_metrics(metrics)
        for f in files:
            tracking.log_artifact(str(f))
        return run_id
