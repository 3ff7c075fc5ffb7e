"""DGST (Dynamic Gradient Sparsification Training) and its ablations.

Rule (docs/design.md, "DGST"):
1. Hierarchical freezing: norm affine parameters, every bias and the
   segmentation heads are always trained; positional embeddings / class tokens
   are always frozen; every other weight tensor is "sparse".
2. Each step, in every kernel (row, dim 0) of a sparse tensor, the ``gamma``
   entries with the largest |gradient| are selected.
3. Only selected entries of sparse tensors change at that step. This holds at
   the update level: right after backward, each sparse parameter's data,
   gradient and optimizer state are swapped for compact gathers of the selected
   entries, so gradient clipping sees only the applied gradient and momentum and
   weight decay cannot move a non-selected entry of the weight or of its
   optimizer state (momentum, Adam moments).
4. Optional ``penalty`` * ||theta - theta_foundation||^2.

With Adam / AdamW the rule is *lazy Adam* (the semantics of ``torch.optim.SparseAdam``):
an entry's moments (``exp_avg``, ``exp_avg_sq``) move only at steps where it is
selected and do not decay in between; they start at 0 the first time it is
selected. Adam's step count, and so its bias correction, stays per tensor: it
counts every step at which the tensor had a selection (every step, in practice).
An entry first selected at step t therefore gets the bias correction of step t on
moments that saw one gradient: its first update is a fresh Adam's (lr x sign(grad))
times (1 - beta1) / (1 - beta1^t) / sqrt((1 - beta2) / (1 - beta2^t)), with the
default betas about 0.5x at t = 10, 1x at t = 100 and 3.2x for large t. Per-entry
step counts would need an Adam of our own; this
rule keeps torch's update bit for bit on the selected entries
(tests/test_dgst.py pins both). With SGD there is no step count: momentum and
weight decay touch only selected entries, so each entry sees exactly SGD on the
steps at which it was selected.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from bench.methods import METHODS
from bench.methods.base import Method, MethodContext, TrainStart, is_head, norm_parameter_names
from bench.methods.dgst.released import released_selection
from bench.methods.dgst.selection import entries_per_row, mask_from_indices, random_indices, topk_indices
from bench.methods.penalty import FoundationAnchor
from bench.options import positive_int

# positional embeddings and class tokens; Swin's learned relative position bias is its positional encoding
ALWAYS_FROZEN_KEYS = ("pos_embed", "cls_token", "absolute_pos_embed", "position_embedding",
                      "relative_position_bias_table")


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
    hp_checks = {"gamma": positive_int}  # gamma = 0 would select nothing: no training at all

    def prepare(self, network: nn.Module, ctx: MethodContext) -> nn.Module:
        self.groups = partition(network, bool(self.hp["hierarchical"]))
        params = dict(network.named_parameters())
        for name in self.groups["frozen"]:
            params[name].requires_grad_(False)
        self.sparse = {n: params[n] for n in self.groups["sparse"]}
        self.selected: Dict[str, torch.Tensor] = {}  # name -> flat indices selected at this step
        self._swapped: List[tuple] = []
        # The anchor keeps a device copy of every trainable tensor: only worth its memory when used.
        penalty = float(self.hp["penalty"])
        self.anchor = FoundationAnchor(network, ctx.foundation_state) if penalty > 0 else None
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.device = ctx.device
        return network

    def regularizer(self, network: nn.Module) -> Optional[torch.Tensor]:
        if self.anchor is None:
            return None
        return self.anchor.penalty(network, float(self.hp["penalty"]))

    def select(self, name: str, p: torch.Tensor, step: int) -> torch.Tensor:
        """Flat indices of the entries of ``p`` to update at this step."""
        raise NotImplementedError

    def updates_per_step(self, network: nn.Module) -> Optional[int]:
        """Every dense entry plus ``entries_per_row(gamma)`` per kernel of each sparse tensor."""
        params = dict(network.named_parameters())
        dense = sum(params[n].numel() for n in self.groups["dense"])
        sparse = 0
        for p in self.sparse.values():
            rows = p.shape[0] if p.dim() > 1 else 1
            sparse += rows * entries_per_row(self.hp["gamma"], p.numel() // rows)
        return int(dense + sparse)

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """Boolean masks of the last step's selection (for checks and reports; the step never builds them)."""
        shapes = {id(p): full.shape for p, _, full, _, _ in self._swapped}
        out = {}
        for name, idx in self.selected.items():
            p = self.sparse[name]
            like = torch.empty(shapes.get(id(p), p.shape), dtype=torch.bool, device=idx.device)
            out[name] = mask_from_indices(idx, like)
        return out

    def after_backward(self, network: nn.Module, step: int) -> None:
        """Select, then swap each sparse parameter's data and gradient for 1-D gathers of its selection.

        From here to ``after_step`` the parameter is compact: gradient clipping sees exactly the
        gradient that is applied, and the optimizer's own update rule (momentum, weight decay,
        nesterov, Adam, GradScaler's skip on inf) runs unchanged on the selected entries and never
        touches the others, which stay bit-for-bit unchanged without a saved copy. Per step this
        costs one |gradient| + topk pass per tensor and O(selected) gathers: no dense mask is
        built, multiplied or scanned, and the optimizer's pass over unselected entries is skipped."""
        self.selected, self._swapped = {}, []
        for name, p in self.sparse.items():
            if p.grad is None:
                continue
            idx = self.select(name, p, step)
            self.selected[name] = idx
            if not (p.data.is_contiguous() and p.grad.is_contiguous()):
                raise RuntimeError(f"DGST's masked update needs contiguous tensors; {name} or its gradient is not")
            full_data, full_grad = p.data, p.grad
            p.grad = None  # p changes shape: drop the gradient first, then attach the compact one
            p.data = full_data.view(-1).index_select(0, idx)
            p.grad = full_grad.view(-1).index_select(0, idx)
            self._swapped.append((p, idx, full_data, full_grad, {}))

    def before_step(self, network, optimizer, step) -> None:
        """Swap the per-entry optimizer state (momentum, Adam moments) for gathers of the selection too."""
        for p, idx, full_data, _, full_state in self._swapped:
            state = optimizer.state.get(p, {})
            for k, v in list(state.items()):
                if torch.is_tensor(v) and v.shape == full_data.shape:
                    if not v.is_contiguous():
                        raise RuntimeError(f"DGST's masked update needs contiguous optimizer state ({k})")
                    full_state[k] = v
                    state[k] = v.view(-1).index_select(0, idx)

    def after_step(self, network, optimizer, step) -> None:
        """Scatter the stepped entries back and swap the full tensors in again; the full gradient
        keeps the applied (selected, clipped) values and zeros elsewhere."""
        for p, idx, full_data, full_grad, full_state in self._swapped:
            compact = p.data
            full_data.view(-1).index_copy_(0, idx, compact)
            state = optimizer.state.get(p, {})
            for k, v in list(state.items()):
                if not (torch.is_tensor(v) and v.shape == compact.shape and v.dim() == 1):
                    continue  # e.g. Adam's scalar step count: per tensor, kept as the optimizer left it
                full = full_state.get(k)
                if full is None:  # created by this very step (the first one): unselected entries start at 0
                    full = torch.zeros(full_data.shape, dtype=v.dtype, device=v.device)
                full.view(-1).index_copy_(0, idx, v)
                state[k] = full
            applied = p.grad
            p.grad = None
            p.data = full_data
            p.grad = full_grad.zero_().view(-1).index_copy_(0, idx, applied).view_as(full_data)
        self._swapped = []


@METHODS.register("dgst")
class DGST(_SparseUpdateMethod):
    summary = "DGST: hierarchical freezing + per-kernel top-gamma |grad| entries each step"

    def select(self, name, p, step):
        return topk_indices(p.grad, self.hp["gamma"])

    @classmethod
    def search_space(cls, trial):
        # penalty on/off first: the paper's no-penalty recipe (penalty = 0) must be reachable,
        # which a log-uniform range never is.
        on = trial.suggest_categorical("penalty_on", [False, True])
        return {"gamma": trial.suggest_categorical("gamma", [1, 2, 4, 8]),
                "penalty": trial.suggest_float("penalty", 1e-6, 1e-1, log=True) if on else 0.0}


@METHODS.register("dgst-random")
class DGSTRandom(_SparseUpdateMethod):
    summary = "ablation: DGST freezing, gamma random entries per kernel each step"

    def select(self, name, p, step):
        return random_indices(p.grad, self.hp["gamma"], self.generator)

    search_space = DGST.search_space


@METHODS.register("dgst-static")
class DGSTStatic(_SparseUpdateMethod):
    summary = "ablation: DGST freezing, selection fixed once from support-set gradients"
    defaults = {**_SparseUpdateMethod.defaults, "calibration_batches": 4}
    hp_checks = {**_SparseUpdateMethod.hp_checks, "calibration_batches": positive_int}

    def calibration_passes(self) -> int:
        return int(self.hp["calibration_batches"])  # paid for with as many fewer training steps

    def on_train_start(self, start: TrainStart) -> None:
        """Accumulate |grad| over a few support batches before training, then fix the masks."""
        network = start.network
        scores = {n: torch.zeros_like(p) for n, p in self.sparse.items()}
        for _ in range(int(self.hp["calibration_batches"])):
            network.zero_grad(set_to_none=True)
            start.loss_on_batch(next(start.batches)).backward()
            for n, p in self.sparse.items():
                if p.grad is not None:
                    scores[n] += p.grad.detach().abs()
        network.zero_grad(set_to_none=True)
        self.fixed = {n: topk_indices(s, self.hp["gamma"]) for n, s in scores.items()}

    def select(self, name, p, step):
        return self.fixed[name]

    search_space = DGST.search_space


@METHODS.register("dgst-released")
class DGSTReleased(Method):
    """What LN-Seg-FM's released trainer does: it computes a selection (dense identity,
    two argsorts per tensor, on the mixed-precision path) but never fills the mask
    dictionary, so every parameter is updated: full fine-tuning with its recipe, nnU-Net's
    optimizer (SGD, momentum 0.99, nesterov, weight decay 3e-5) at lr 1e-3, the full gradient
    clipped at norm 12 (the engine's clipping: every trainable parameter is in it)."""

    summary = ("ablation: the released trainer's behaviour (empty masks -> full fine-tuning; "
               "SGD nesterov momentum 0.99, wd 3e-5, lr 1e-3)")
    defaults = {"gamma": 2}
    hp_checks = _SparseUpdateMethod.hp_checks
    spec_overrides = {"optimizer": "sgd", "lr": 1e-3, "weight_decay": 3e-5}

    def prepare(self, network, ctx):
        self.amp = ctx.device.type == "cuda"
        return network

    def after_backward(self, network, step):
        if self.amp:
            grads = {n: p.grad for n, p in network.named_parameters() if p.grad is not None and p.dim() > 1}
            masks = released_selection(grads, int(self.hp["gamma"]), fill_mask=False)
            assert not masks  # the released behaviour: nothing is masked
