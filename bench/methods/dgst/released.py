"""A faithful re-implementation of the selection in LN-Seg-FM's released trainer.

Kept for the ``dgst-released`` ablation and for ``bench perf``; not used by ``dgst``.
Per tensor it allocates a dense ``eye(row_length)`` and argsorts every row
twice; the released function returns its mask dictionary without ever filling
it (``fill_mask=False``), so the released "DGST" trains like full fine-tuning.
``fill_mask=True`` returns what it meant to select, for the equivalence check.
"""
from __future__ import annotations

from typing import Dict

import torch

from bench.methods.dgst.selection import as_rows


def released_selection(grads: Dict[str, torch.Tensor], gamma: int = 2,
                       fill_mask: bool = False) -> Dict[str, torch.Tensor]:
    masks: Dict[str, torch.Tensor] = {}
    for name, g in grads.items():
        rows = as_rows(g)
        row_length = rows.shape[1]
        eye = torch.eye(row_length, device=g.device)
        order = torch.argsort(rows.abs(), dim=1, descending=True)
        ranks = torch.argsort(order, dim=1)  # second full sort, as released
        keep = ranks < gamma
        # one-hot rows of the identity for the kept positions, summed into a dense row mask
        selected = (eye[order[:, :gamma]].sum(dim=1) > 0) & keep
        if fill_mask:
            masks[name] = selected.view_as(g)
    return masks
