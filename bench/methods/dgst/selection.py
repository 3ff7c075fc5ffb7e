"""Per-kernel entry selection for DGST.

A weight tensor is viewed as rows = kernels (dim 0; also dim 0 for
ConvTranspose weights, as in the released code). In every row the ``k``
entries with the largest |gradient| are selected. The selection is returned as
flat indices into the tensor (``rows * k`` of them): ``topk`` is O(numel) and
nothing of the tensor's size is allocated beyond |gradient|, so the training
step never builds or scans a dense mask. ``*_mask`` build the boolean mask for
checks and reports.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def entries_per_row(gamma: float, row_length: int) -> int:
    """gamma >= 1: that many entries per kernel; 0 < gamma < 1: that fraction of the row (at least 1)."""
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    k = int(gamma) if gamma >= 1 else math.ceil(gamma * row_length)
    return max(1, min(k, row_length))


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor as (kernels, entries per kernel); a 1-D tensor is one row."""
    return t.detach().reshape(t.shape[0], -1) if t.dim() > 1 else t.detach().reshape(1, -1)


def _flat_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (into the row-major tensor) of the ``k`` largest scores of every row."""
    cols = scores.topk(k, dim=1, sorted=False).indices
    offsets = torch.arange(scores.shape[0], device=scores.device).mul_(scores.shape[1]).unsqueeze(1)
    return (cols + offsets).reshape(-1)


def topk_indices(grad: torch.Tensor, gamma: float) -> torch.Tensor:
    rows = as_rows(grad)
    return _flat_topk(rows.abs(), entries_per_row(gamma, rows.shape[1]))


def random_indices(like: torch.Tensor, gamma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    rows = as_rows(like)
    scores = torch.rand(rows.shape, generator=generator, device="cpu").to(rows.device)
    return _flat_topk(scores, entries_per_row(gamma, rows.shape[1]))


def mask_from_indices(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    mask[idx] = True
    return mask.view_as(like)


def topk_mask(grad: torch.Tensor, gamma: float) -> torch.Tensor:
    return mask_from_indices(topk_indices(grad, gamma), grad)
