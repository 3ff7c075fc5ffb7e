"""Training one network: plan-transferred preprocessing, the ``BenchTrainer`` loop, the export.

Used by every run (``bench.runner``), by the phantom foundation's pretraining (``bench.foundation``)
and, for its helpers, by ``bench perf``. The runner decides what to train; this module trains it.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from bench.engine.recipe import Recipe
from bench.home import configure_nnunet_env
from bench import progress
from bench.memory import MemoryMeter
from bench.quiet import quiet


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainConfig:
    """What one training needs beyond data and method: the recipe and the budget."""
    recipe: Recipe                       # optimizer, lr, weight decay
    iterations: int                      # forward/backward passes, a method's calibration passes included
    eval_every: int = 10
    batch_size: Optional[int] = None     # None: the plans' batch size


@dataclass
class TrainOutcome:
    export_state: Dict[str, torch.Tensor]
    arch_override: Optional[dict]
    train_seconds: float
    step_times: List[float]
    peak_memory_mb: Optional[float]  # above the process at the start of fine-tuning; None: unmeasurable
    trainable: int
    total: int
    changed: int
    load_report: Dict[str, List[str]]
    epoch_scores: List[Dict[str, float]]
    train_steps: int = 0           # optimizer steps
    calibration_passes: int = 0    # forward/backward passes outside steps (counted in the iteration budget)
    updated_per_step: Optional[int] = None  # entries one step updates; None: every trainable entry
    batch_size: Optional[int] = None
    patch_size: Optional[List[int]] = None


def parameter_keys(plans: dict, dataset_json: dict, configuration: str, arch_override: Optional[dict]) -> List[str]:
    """State-dict keys of the exported architecture, each parameter once. nnU-Net registers the same
    tensors under several names (``.conv`` and ``.all_modules.0``; ``decoder.encoder.*``);
    ``named_parameters`` de-duplicates them, a state dict does not."""
    from bench.engine.network import build_network
    plans = json.loads(json.dumps(plans))
    if arch_override:
        plans["configurations"][configuration]["architecture"].update(arch_override)
    return [n for n, _ in build_network(plans, dataset_json, configuration).named_parameters()]


def count_changed(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor], keys: List[str]) -> int:
    """Entries that differ between two exports, over ``keys``."""
    return int(sum((before[k] != after[k].to(before[k].device)).sum().item() for k in keys))


def stop_data_loaders(trainer) -> None:
    """Stop nnU-Net's background augmentation workers (what its on_train_end does), best effort."""
    for loader in (getattr(trainer, "dataloader_train", None), getattr(trainer, "dataloader_val", None)):
        finish = getattr(loader, "_finish", None)
        if callable(finish):
            try:
                finish()
            except Exception:  # noqa: BLE001 - cleanup must not mask the original exception
                pass


def train_network(*, dataset, plans, dataset_json, configuration, method, init_state, train_ids, val_ids,
                  out_dir: Path, config: TrainConfig, seed: int, device="auto",
                  log: Callable = print, epoch_callback=None, label: str = "training") -> TrainOutcome:
    """Preprocess (plan transfer), train with BenchTrainer, export stock weights; ``label`` names the
    training's progress bar."""
    from bench.engine.preprocess import preprocess
    from bench.engine.trainer import BenchTrainer
    from bench.methods.base import MethodContext

    configure_nnunet_env()
    dev = resolve_device(device) if isinstance(device, str) else device
    seed_everything(seed)
    base = preprocess(dataset, plans, dataset_json, configuration, list(dict.fromkeys(train_ids + val_ids)), log=log)
    plans_for_trainer = json.loads(json.dumps(plans))
    plans_for_trainer["continue_training"] = False
    with quiet():  # "Using device: cpu" and the like
        trainer = BenchTrainer(plans_for_trainer, configuration, 0, dataset_json, dev)
    ctx = MethodContext(foundation_state=init_state or {}, device=dev, seed=seed,
                        extra={"architecture": plans["configurations"][configuration]["architecture"]})
    trainer.setup(method=method, ctx=ctx, init_state=init_state, train_ids=train_ids, val_ids=val_ids,
                  preprocessed_base=str(base), output_folder=str(out_dir), iterations=config.iterations,
                  eval_every=config.eval_every, lr=config.recipe.lr, weight_decay=config.recipe.weight_decay,
                  optimizer=config.recipe.optimizer, batch_size=config.batch_size)
    scores: List[Dict[str, float]] = []

    def _on_epoch(epoch, s):
        scores.append(s)
        if epoch_callback:
            epoch_callback(epoch, s)
    trainer.epoch_callback = _on_epoch
    meter = MemoryMeter(dev).start()  # network, optimizer state, activations: the method's own cost
    with quiet():
        trainer.initialize()
    net = trainer.network
    before, override = method.export(net)
    keys = parameter_keys(plans, dataset_json, configuration, override)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    updated = method.updates_per_step(net)
    if trainer.load_report:
        rep = trainer.load_report
        fresh_keys = set(rep.get("fresh", ()))
        head_keys = [k for k in rep["reinitialised"] if k not in fresh_keys]
        heads = "loaded (label set matches)" if not head_keys else \
            "re-initialised (the target's label set differs from the foundation's; one head per label set): " \
            + ", ".join(head_keys)
        fresh = f"; {len(fresh_keys)} tensors the checkpoint lacks initialised fresh" if fresh_keys else ""
        log(f"foundation weights: {len(rep['loaded'])} tensors loaded; segmentation heads {heads}{fresh}")
    t0 = time.perf_counter()
    try:
        # stdout=False: what epoch_callback prints is the suite's own
        with progress.task(label, total=config.iterations) as trainer.bar, quiet(stdout=False):
            trainer.run_training()
    except BaseException:
        # An exception out of the loop (e.g. optuna.TrialPruned raised by epoch_callback) skips
        # nnU-Net's on_train_end, the only place that stops its augmentation worker processes.
        stop_data_loaders(trainer)
        raise
    train_seconds = time.perf_counter() - t0
    peak_bytes = meter.stop()
    export_state, arch_override = method.export(trainer.network)
    changed = count_changed(before, export_state, keys)
    total = sum(before[k].numel() for k in keys)
    cm = trainer.configuration_manager
    return TrainOutcome(export_state, arch_override, train_seconds, trainer.step_times,
                        peak_bytes / 2**20 if peak_bytes is not None else None,
                        int(trainable), int(total), changed, trainer.load_report, scores,
                        train_steps=trainer.global_step, calibration_passes=trainer.calibration_passes,
                        updated_per_step=updated, batch_size=int(cm.batch_size),
                        patch_size=[int(v) for v in cm.patch_size])
