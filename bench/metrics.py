"""Per-case segmentation metrics for binary 3D masks (z, y, x), in millimetres.

Definitions (distances respect anisotropic voxel spacing, given in the array's
axis order):

- Surface: the mask voxels with at least one 6-connected neighbour outside the
  mask (``mask & ~binary_erosion(mask)``; outside the array counts as
  background). This is MONAI's ``get_mask_edges`` without sub-voxel areas.
- Directed surface distances d(A->B): for every surface voxel of A, the
  Euclidean distance (mm, voxel centres) to the nearest surface voxel of B.
- HD95 = max(P95(d(pred->ref)), P95(d(ref->pred))), percentiles with linear
  interpolation: MONAI ``compute_hausdorff_distance(percentile=95)``.
- ASSD = mean of the union of both directed distance sets (each surface voxel
  counts once): MONAI ``compute_average_surface_distance(symmetric=True)``.
- NSD at tolerance t = (#{d(pred->ref) <= t} + #{d(ref->pred) <= t}) /
  (#pred surface voxels + #ref surface voxels): MONAI ``compute_surface_dice``
  with ``use_subvoxels=False`` (surface voxels counted, not areas).
- Lesions: 26-connected components. A reference lesion is detected (TP) when
  at least ``LESION_MIN_OVERLAP_VOXELS`` of its voxels are predicted by any
  predicted component (i.e. IoU > 0); FN = undetected reference lesions; FP =
  predicted components touching no reference lesion. Precision is over
  predicted components (matched / all predicted), recall over reference
  lesions (TP / all reference lesions); F1 = 2PR / (P + R), 0 when P + R = 0.
- Volumes: voxel count x voxel volume, in millilitres.

Empty-mask rules (never NaN):

=================  =====  =====  =============================  ==========================
case               Dice   NSD    HD95, ASSD                     lesion P / R / F1
=================  =====  =====  =============================  ==========================
both empty         1      1      0                              1 / 1 / 1
exactly one empty  0      0      ``worst_distance_mm``          0 / 0 / 0
=================  =====  =====  =============================  ==========================

``worst_distance_mm`` defaults to the diagonal of the volume's extent
(``sqrt(sum((shape * spacing)**2))``), the largest distance two voxels of the
volume can have. Lesion rules with a zero denominator: precision is 1 if there
are no reference lesions and no predicted components, else 0; recall likewise.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

METRICS = ("dice", "hd95", "assd", "nsd", "lesion_tp", "lesion_fp", "lesion_fn",
           "lesion_precision", "lesion_recall", "lesion_f1", "vol_pred_ml", "vol_ref_ml")
# Metrics where a larger value is better (the others are distances, counts or volumes).
HIGHER_IS_BETTER = ("dice", "nsd", "lesion_precision", "lesion_recall", "lesion_f1")
DEFAULT_NSD_TOLERANCE_MM = 1.0
HD_PERCENTILE = 95
# Lesion matching rule: a reference lesion is detected if a predicted component
# overlaps it by at least this many voxels (1 voxel <=> IoU > 0).
LESION_MIN_OVERLAP_VOXELS = 1
LESION_STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                 worst_distance_mm: Optional[float] = None) -> dict:
    """All metrics of one case; see the module docstring for definitions and empty-mask rules.

    ``pred`` and ``ref`` are 3D arrays of the same shape (non-zero = foreground),
    ``spacing`` the voxel size in mm in the same axis order.
    """
    pred, ref = np.asarray(pred) != 0, np.asarray(ref) != 0
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"pred and ref must be 3D arrays of the same shape, got {pred.shape} and {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing}")
    if worst_distance_mm is None:
        worst_distance_mm = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing)))

    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    out = {}
    if n_pred == 0 and n_ref == 0:
        out.update(dice=1.0, hd95=0.0, assd=0.0, nsd=1.0)
    elif n_pred == 0 or n_ref == 0:
        out.update(dice=0.0, hd95=float(worst_distance_mm), assd=float(worst_distance_mm), nsd=0.0)
    else:
        out["dice"] = 2.0 * int(np.logical_and(pred, ref).sum()) / (n_pred + n_ref)
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        out["hd95"] = float(max(np.percentile(d_pr, HD_PERCENTILE), np.percentile(d_rp, HD_PERCENTILE)))
        both = np.concatenate([d_pr, d_rp])
        out["assd"] = float(both.mean())
        out["nsd"] = float(np.count_nonzero(both <= nsd_tolerance_mm) / both.size)
    out.update(lesion_metrics(pred, ref))
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    out["vol_pred_ml"] = n_pred * voxel_ml
    out["vol_ref_ml"] = n_ref * voxel_ml
    return {k: out[k] for k in METRICS}


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred->ref, ref->pred) in mm; both masks must be non-empty."""
    # Crop to the union's bounding box plus one voxel: every surface voxel and its
    # nearest partner lie inside, so distances and erosion are unchanged, and the
    # distance transforms run on the small box instead of the whole CT volume.
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(pred | ref))
    s_pred, s_ref = _surface(pred[box]), _surface(ref[box])
    # EDT of the complement gives, at every voxel, the distance to the nearest surface voxel.
    d_pr = ndimage.distance_transform_edt(~s_ref, sampling=spacing)[s_pred]
    d_rp = ndimage.distance_transform_edt(~s_pred, sampling=spacing)[s_ref]
    return d_pr, d_rp


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def lesion_metrics(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Lesion-wise detection counts and rates (26-connected components)."""
    pred_lab, n_pred = ndimage.label(pred, structure=LESION_STRUCTURE)
    ref_lab, n_ref = ndimage.label(ref, structure=LESION_STRUCTURE)
    # Overlap voxel counts per (reference lesion, predicted component) pair.
    both = (ref_lab > 0) & (pred_lab > 0)
    pairs, counts = np.unique(np.stack([ref_lab[both], pred_lab[both]]), axis=1, return_counts=True)
    hit = counts >= LESION_MIN_OVERLAP_VOXELS
    tp = len(np.unique(pairs[0, hit]))
    matched_pred = len(np.unique(pairs[1, hit]))
    fp, fn = n_pred - matched_pred, n_ref - tp
    precision = matched_pred / n_pred if n_pred else float(n_ref == 0)
    recall = tp / n_ref if n_ref else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"lesion_tp": int(tp), "lesion_fp": int(fp), "lesion_fn": int(fn),
            "lesion_precision": float(precision), "lesion_recall": float(recall), "lesion_f1": float(f1)}
