"""Per-kernel entry selection for DGST.

A weight tensor is viewed as rows = kernels (dim 0; also dim 0 for
ConvTranspose weights, as in the released code). In every row the ``k``
entries with the largest |gradient| are selected. ``topk`` + ``scatter`` is
O(numel) and allocates only the boolean mask.
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


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1) if t.dim() > 1 else t.detach().reshape(1, -1)


def _mask_from_scores(scores: torch.Tensor, k: int, like: torch.Tensor) -> torch.Tensor:
    idx = scores.topk(k, dim=1, sorted=False).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, idx, True)
    return mask.view_as(like)


def topk_mask(grad: torch.Tensor, gamma: float) -> torch.Tensor:
    rows = _rows(grad)
    return _mask_from_scores(rows.abs(), entries_per_row(gamma, rows.shape[1]), grad)


def random_mask(like: torch.Tensor, gamma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    rows = _rows(like)
    scores = torch.rand(rows.shape, generator=generator, device="cpu").to(rows.device)
    return _mask_from_scores(scores, entries_per_row(gamma, rows.shape[1]), like)
