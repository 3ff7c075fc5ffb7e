"""DGST (Dynamic Gradient Sparsification Training) and its ablations.

Rule (DESIGN.md section 4):
1. Hierarchical freezing: norm affine parameters, every bias and the
   segmentation heads are always trained; positional embeddings / class tokens
   are always frozen; every other weight tensor is "sparse".
2. Each step, in every kernel (row, dim 0) of a sparse tensor, the ``gamma``
   entries with the largest |gradient| are selected.
3. Only selected entries of sparse tensors change at that step. This holds at
   the update level: the optimizer runs as usual, then every non-selected
   entry of the weight AND of its optimizer state (momentum, Adam moments) is
   restored, so momentum and weight decay cannot move it.
4. Optional ``penalty`` * ||theta - theta_foundation||^2.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from bench.methods import METHODS
from bench.methods.base import Method, MethodContext, is_head, norm_parameter_names
from bench.methods.dgst.released import released_selection
from bench.methods.dgst.selection import random_mask, topk_mask
from bench.methods.penalty import FoundationAnchor

ALWAYS_FROZEN_KEYS = ("pos_embed", "cls_token", "absolute_pos_embed", "position_embedding")


def partition(network: nn.Module, hierarchical: bool = True) -> Dict[str, List[str]]:
    """Split parameter names into ``dense`` (always trained), ``sparse`` and ``frozen``."""
    groups: Dict[str, List[str]] = {"dense": [], "sparse": [], "frozen": []}
    if not hierarchical:
        groups["sparse"] = [n for n, _ in network.named_parameters()]
        return groups
    norms = norm_parameter_names(network)
    for name, p in network.named_parameters():
        if any(key in name for key in ALWAYS_FROZEN_KEYS):
            groups["frozen"].append(name)
        elif name in norms or name.endswith("bias") or is_head(name) or p.dim() < 2:
            groups["dense"].append(name)
        else:
            groups["sparse"].append(name)
    return groups


class _SparseUpdateMethod(Method):
    """Shared machinery: hierarchical freezing plus masked updates of sparse tensors.

    Subclasses only decide which entries are selected (``select``)."""

    defaults = {"gamma": 2, "hierarchical": True, "penalty": 0.0}

    def prepare(self, network: nn.Module, ctx: MethodContext) -> nn.Module:
        self.groups = partition(network, bool(self.hp["hierarchical"]))
        params = dict(network.named_parameters())
        for name in self.groups["frozen"]:
            params[name].requires_grad_(False)
        self.sparse = {n: params[n] for n in self.groups["sparse"]}
        self.masks: Dict[str, torch.Tensor] = {}
        self._saved: Dict[str, List[torch.Tensor]] = {}
        self.anchor = FoundationAnchor(network, ctx.foundation_state)
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.device = ctx.device
        return network

    def regularizer(self, network: nn.Module) -> Optional[torch.Tensor]:
        return self.anchor.penalty(network, float(self.hp["penalty"]))

    def select(self, name: str, p: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_backward(self, network: nn.Module, step: int) -> None:
        self.masks = {}
        for name, p in self.sparse.items():
            if p.grad is None:
                continue
            mask = self.select(name, p, step)
            self.masks[name] = mask
            p.grad.mul_(mask)  # clipping then sees the gradient that is applied

    def before_step(self, network, optimizer, step) -> None:
        self._saved = {}
        for name, p in self.sparse.items():
            if name not in self.masks:
                continue
            state = optimizer.state.get(p, {})
            tensors = [p.data] + [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]
            self._saved[name] = [t.clone() for t in tensors]

    def after_step(self, network, optimizer, step) -> None:
        for name, saved in self._saved.items():
            p = self.sparse[name]
            mask = self.masks[name]
            state = optimizer.state.get(p, {})
            # state tensors created by this very step (first step) restore to zeros
            current = [p.data] + [v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape]
            for i, t in enumerate(current):
                old = saved[i] if i < len(saved) else torch.zeros_like(t)
                t.copy_(torch.where(mask, t, old))
        self._saved = {}


@METHODS.register("dgst")
class DGST(_SparseUpdateMethod):
    name = "dgst"
    summary = "DGST: hierarchical freezing + per-kernel top-gamma |grad| entries each step"

    def select(self, name, p, step):
        return topk_mask(p.grad, self.hp["gamma"])

    @classmethod
    def search_space(cls, trial):
        return {"gamma": trial.suggest_categorical("gamma", [1, 2, 4, 8]),
                "penalty": trial.suggest_float("penalty", 1e-6, 1e-1, log=True)}


@METHODS.register("dgst-random")
class DGSTRandom(_SparseUpdateMethod):
    name = "dgst-random"
    summary = "ablation: DGST freezing, gamma random entries per kernel each step"

    def select(self, name, p, step):
        return random_mask(p.grad, self.hp["gamma"], self.generator)

    search_space = DGST.search_space


@METHODS.register("dgst-static")
class DGSTStatic(_SparseUpdateMethod):
    name = "dgst-static"
    summary = "ablation: DGST freezing, selection fixed once from support-set gradients"
    defaults = {**_SparseUpdateMethod.defaults, "calibration_batches": 4}

    def on_train_start(self, trainer) -> None:
        """Accumulate |grad| over a few support batches before training, then fix the masks."""
        network = trainer.network
        scores = {n: torch.zeros_like(p) for n, p in self.sparse.items()}
        for _ in range(int(self.hp["calibration_batches"])):
            network.zero_grad(set_to_none=True)
            trainer.loss_on_batch(next(trainer.dataloader_train)).backward()
            for n, p in self.sparse.items():
                if p.grad is not None:
                    scores[n] += p.grad.detach().abs()
        network.zero_grad(set_to_none=True)
        self.fixed = {n: topk_mask(s, self.hp["gamma"]) for n, s in scores.items()}

    def select(self, name, p, step):
        return self.fixed[name]

    search_space = DGST.search_space


@METHODS.register("dgst-released")
class DGSTReleased(Method):
    """What LN-Seg-FM's released trainer does: it computes a selection (dense identity,
    two argsorts per tensor, on the mixed-precision path) but never fills the mask
    dictionary, so every parameter is updated: full fine-tuning with its recipe."""

    name = "dgst-released"
    summary = "ablation: the released trainer's behaviour (empty masks -> full fine-tuning, lr 1e-3)"
    defaults = {"gamma": 2}
    spec_overrides = {"lr": 1e-3}

    def prepare(self, network, ctx):
        self.amp = ctx.device.type == "cuda"
        return network

    def after_backward(self, network, step):
        if self.amp:
            grads = {n: p.grad for n, p in network.named_parameters() if p.grad is not None and p.dim() > 1}
            masks = released_selection(grads, int(self.hp["gamma"]), fill_mask=False)
            assert not masks  # the released behaviour: nothing is masked
