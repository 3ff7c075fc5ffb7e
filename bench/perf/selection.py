"""DGST's top-k selection against the released implementation's, on the same gradients of the full
network: time and mask agreement (ties at the k-th place explain every difference)."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Dict

import torch

from bench.memory import sync
from bench.perf.timing import ratio, spread


def selection_benchmark(full_state, spec, loss, batch, device, reps, log) -> Dict[str, Any]:
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
            sync(device)
            t0 = time.perf_counter()
            res = fn()
            sync(device)
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
              "ours": spread(t_ours), "released": spread(t_rel),
              "speedup": ratio(statistics.median(t_rel), statistics.median(t_ours)),
              "agreement": agree / entries if entries else float("nan"),
              "rows": rows, "rows_equal": rows_equal, "rows_differing_by_ties": tie_rows,
              "rows_differing_otherwise": rows - rows_equal - tie_rows}
    log(f"  selection: ours {result['ours']['median_s']:.4f}s, released {result['released']['median_s']:.4f}s "
        f"({result['speedup']:.1f}x); masks agree on {result['agreement']:.6f} of {entries:,} entries")
    return result
