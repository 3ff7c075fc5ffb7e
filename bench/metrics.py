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
  with ``use_subvoxels=False`` (surface voxels counted, not areas). The
  tolerance is inclusive.
- Lesions: 26-connected components of prediction and reference.

  * One-to-one (primary, ``lesion_*``): IoU between every (reference lesion,
    predicted component) pair; pairs with IoU >= ``LESION_IOU_THRESHOLD``
    (0.1) are eligible, and the Hungarian algorithm picks the one-to-one
    matching of eligible pairs with the largest total IoU. TP = matched pairs,
    FP = unmatched predicted components, FN = unmatched reference lesions. A
    blob merged over two nodes detects one of them; a node split in two
    predicted components yields one TP and one FP.
  * Any-overlap (lenient, ``lesion_*_any``): a reference lesion is detected
    when any predicted component overlaps it by at least one voxel; FP =
    predicted components touching no reference lesion. One blob can detect
    several nodes.

  Both: precision = matched predicted components / predicted components,
  recall = detected reference lesions / reference lesions, F1 = 2PR / (P + R),
  0 when P + R = 0.
- Volumes: voxel count x voxel volume, in millilitres.

Columns (``METRICS``, in this order), unit and direction (+ higher is better,
- lower is better, blank: descriptive, not a score):

====================  =====  ===  ==================================================
column                unit   dir  meaning
====================  =====  ===  ==================================================
dice                  1      +    Dice overlap
hd95                  mm     -    95th-percentile Hausdorff distance
assd                  mm     -    average symmetric surface distance
nsd                   1      +    NSD at the dataset's tolerance (``nsd_tol_mm``)
nsd_voxel             1      +    NSD at the case's voxel-sized tolerance
nsd_tol_mm            mm          tolerance of ``nsd``: ``Dataset.nsd_tolerance_mm``
nsd_voxel_tol_mm      mm          tolerance of ``nsd_voxel``: the case's largest
                                  voxel spacing (a boundary one voxel off along any
                                  single axis is within tolerance)
lesion_tp             count  +    one-to-one matched lesions
lesion_fp             count  -    unmatched predicted components (FP per scan)
lesion_fn             count  -    unmatched reference lesions
lesion_precision      1      +    one-to-one precision
lesion_recall         1      +    one-to-one recall
lesion_f1             1      +    one-to-one F1 (the primary lesion metric)
lesion_*_any          "      "    the same six under the any-overlap rule
vol_pred_ml           ml          predicted volume
vol_ref_ml            ml          reference volume
pred_empty            0/1         1 if the prediction is empty
ref_empty             0/1         1 if the reference is empty
====================  =====  ===  ==================================================

The column names are the same for every dataset; what differs (the NSD
tolerances) is recorded per case, so a results table stays comparable across
datasets and a report can state the tolerance it averages over.

Empty-mask rules (never NaN; ``pred_empty``/``ref_empty`` say which applied):

=================  =====  ===========  =====================  ===========================
case               Dice   NSD (both)   HD95, ASSD             lesion P / R / F1 (both)
=================  =====  ===========  =====================  ===========================
both empty         1      1            0                      1 / 1 / 1
exactly one empty  0      0            ``worst_distance_mm``  0 / 0 / 0
=================  =====  ===========  =====================  ===========================

Several labels (``score_labels``): a task with several foreground labels (nodes and organs) is scored one
label at a time, each label's voxels against everything else, with the columns and the empty-mask rules
above *per label*: a label absent from both the reference and the prediction of a case scores Dice 1
there, a label missed entirely Dice 0. A case then has one row per label (``label``: its name in the
dataset's ``labels``); a case's overall score is the mean over its labels (``mean_over_labels``), which is
what comparisons pair on (``bench.stats``). A single-label task keeps one row per case, without ``label``.

``worst_distance_mm`` defaults to the diagonal of the volume's extent
(``sqrt(sum((shape * spacing)**2))``), the largest distance two voxels of the
volume can have. Lesion rules with a zero denominator: precision is 1 if there
are no reference lesions and no predicted components, else 0; recall likewise.
The counts are exact: an empty prediction has FN = the number of reference
lesions, an empty reference FP = the number of predicted components.

Node-free scans (``nodefree_metrics``; scans with no node to find, scored
apart from the test set, ``bench/evaluation``): every predicted 26-connected
component is a false positive. ``fp_components`` counts them, ``fp_ml`` is the
predicted volume in ml; an empty prediction scores 0 and 0, never NaN. These
are ``lesion_fp`` and ``vol_pred_ml`` of ``case_metrics`` against an empty
reference, without the distance and overlap columns that mean nothing there.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

# Version of the definitions behind the columns. 1: ``nsd`` at a fixed 1 mm, and
# ``lesion_*`` the any-overlap rule (``METRICS_V1``). 2: the columns above.
# ``upgrade_v1`` renames a version-1 case; never compare versions under one name.
METRICS_VERSION = 2
METRICS_V1 = ("dice", "hd95", "assd", "nsd", "lesion_tp", "lesion_fp", "lesion_fn",
              "lesion_precision", "lesion_recall", "lesion_f1", "vol_pred_ml", "vol_ref_ml")
V1_NSD_TOLERANCE_MM = 1.0

_LESION_FIELDS = ("tp", "fp", "fn", "precision", "recall", "f1")
LESION_METRICS = tuple(f"lesion_{f}" for f in _LESION_FIELDS)
LESION_METRICS_ANY = tuple(f"lesion_{f}_any" for f in _LESION_FIELDS)
METRICS = ("dice", "hd95", "assd", "nsd", "nsd_voxel", "nsd_tol_mm", "nsd_voxel_tol_mm",
           *LESION_METRICS, *LESION_METRICS_ANY, "vol_pred_ml", "vol_ref_ml", "pred_empty", "ref_empty")
HIGHER_IS_BETTER = ("dice", "nsd", "nsd_voxel", "lesion_tp", "lesion_precision", "lesion_recall", "lesion_f1",
                    "lesion_tp_any", "lesion_precision_any", "lesion_recall_any", "lesion_f1_any")
LOWER_IS_BETTER = ("hd95", "assd", "lesion_fp", "lesion_fn", "lesion_fp_any", "lesion_fn_any")
# Integer-valued columns (counts and 0/1 flags), for typed tables.
INT_METRICS = ("lesion_tp", "lesion_fp", "lesion_fn", "lesion_tp_any", "lesion_fp_any", "lesion_fn_any",
               "pred_empty", "ref_empty")

# Used when the caller gives no tolerance; datasets state theirs (Dataset.nsd_tolerance_mm).
DEFAULT_NSD_TOLERANCE_MM = 2.0
HD_PERCENTILE = 95
# One-to-one lesion matching: a (reference, prediction) pair can be matched when
# its IoU reaches this value (inclusive). 0.1 accepts the loose overlap usual for
# small nodes, while a prediction that only grazes a node (a voxel of a node of
# more than ten voxels) is no match.
LESION_IOU_THRESHOLD = 0.1
LESION_STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def higher_is_better(metric: str) -> bool:
    """Direction of a score column; descriptive columns (volumes, tolerances, flags) have none."""
    if metric in HIGHER_IS_BETTER:
        return True
    if metric in LOWER_IS_BETTER:
        return False
    raise ValueError(f"{metric!r} is not a score with a direction; scores: "
                     f"{', '.join(HIGHER_IS_BETTER + LOWER_IS_BETTER)}")


def upgrade_v1(case: Mapping[str, float]) -> dict:
    """A case scored under metrics version 1, in today's columns: what version 1 measured keeps its value
    under its present name (its lesion counts are the any-overlap rule), what it did not measure is NaN."""
    missing = [k for k in METRICS_V1 if k not in case]
    if missing:
        raise ValueError(f"not a version-1 metrics record: missing {', '.join(missing)}")
    out = {k: math.nan for k in METRICS}
    out.update({k: case[k] for k in ("dice", "hd95", "assd", "nsd", "vol_pred_ml", "vol_ref_ml")})
    out.update({any_rule: case[old] for old, any_rule in zip(LESION_METRICS, LESION_METRICS_ANY)})
    out["nsd_tol_mm"] = V1_NSD_TOLERANCE_MM
    out["pred_empty"], out["ref_empty"] = int(case["vol_pred_ml"] == 0), int(case["vol_ref_ml"] == 0)
    return out


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                 nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                 worst_distance_mm: Optional[float] = None,
                 lesion_iou_threshold: float = LESION_IOU_THRESHOLD) -> dict:
    """All metrics of one case; see the module docstring for definitions and empty-mask rules.

    ``pred`` and ``ref`` are 3D arrays of the same shape (non-zero = foreground),
    ``spacing`` the voxel size in mm in the same axis order, ``nsd_tolerance_mm``
    the dataset's NSD tolerance.
    """
    pred, ref = np.asarray(pred) != 0, np.asarray(ref) != 0
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"pred and ref must be 3D arrays of the same shape, got {pred.shape} and {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not min(spacing) > 0:
        raise ValueError(f"spacing must be three positive numbers (mm), got {spacing}")
    if not nsd_tolerance_mm > 0:
        raise ValueError(f"nsd_tolerance_mm must be a positive number of mm, got {nsd_tolerance_mm}")
    if worst_distance_mm is None:
        worst_distance_mm = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing)))
    tolerances = {"nsd": float(nsd_tolerance_mm), "nsd_voxel": max(spacing)}

    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    out = {"nsd_tol_mm": tolerances["nsd"], "nsd_voxel_tol_mm": tolerances["nsd_voxel"],
           "pred_empty": int(n_pred == 0), "ref_empty": int(n_ref == 0)}
    if n_pred == 0 and n_ref == 0:
        out.update(dice=1.0, hd95=0.0, assd=0.0, **{k: 1.0 for k in tolerances})
    elif n_pred == 0 or n_ref == 0:
        out.update(dice=0.0, hd95=float(worst_distance_mm), assd=float(worst_distance_mm),
                   **{k: 0.0 for k in tolerances})
    else:
        out["dice"] = 2.0 * int(np.logical_and(pred, ref).sum()) / (n_pred + n_ref)
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        out["hd95"] = float(max(np.percentile(d_pr, HD_PERCENTILE), np.percentile(d_rp, HD_PERCENTILE)))
        both = np.concatenate([d_pr, d_rp])
        out["assd"] = float(both.mean())
        out.update({k: float(np.count_nonzero(both <= t) / both.size) for k, t in tolerances.items()})
    out.update(lesion_metrics(pred, ref, lesion_iou_threshold))
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    out["vol_pred_ml"] = n_pred * voxel_ml
    out["vol_ref_ml"] = n_ref * voxel_ml
    return {k: out[k] for k in METRICS}


NODEFREE_METRICS = ("fp_components", "fp_ml")


def nodefree_metrics(pred: np.ndarray, spacing: Sequence[float]) -> dict:
    """False positives of a prediction on a scan with nothing to find (module docstring)."""
    pred = np.asarray(pred) != 0
    spacing = tuple(float(s) for s in spacing)
    if pred.ndim != 3 or len(spacing) != 3 or not min(spacing) > 0:
        raise ValueError(f"expected a 3D prediction and three positive spacings (mm), got shape {pred.shape} "
                         f"and spacing {spacing}")
    comp = lesion_components(pred, np.zeros_like(pred))
    return {"fp_components": comp.n_pred,
            "fp_ml": int(pred.sum()) * spacing[0] * spacing[1] * spacing[2] / 1000.0}


def foreground_labels(dataset_json: Mapping) -> Dict[str, int]:
    """Name -> value of every foreground label of an nnU-Net ``dataset.json`` (``labels``), in value order."""
    labels = {str(k): int(v) for k, v in dataset_json["labels"].items() if not isinstance(v, (list, tuple))}
    return dict(sorted(((k, v) for k, v in labels.items() if v != 0), key=lambda kv: kv[1]))


def score_labels(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Mapping[str, int],
                 **kw) -> List[dict]:
    """Metric rows of one case: one row (no ``label``) for a single foreground label, as ``case_metrics``
    on non-zero voxels; else one row per label, ``label`` first, each label's voxels against the rest."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if len(labels) <= 1:
        return [case_metrics(pred != 0, ref != 0, spacing, **kw)]
    return [{"label": name, **case_metrics(pred == value, ref == value, spacing, **kw)}
            for name, value in labels.items()]


def mean_over_labels(rows: Sequence[Mapping]) -> List[dict]:
    """One row per ``case_id`` from rows of (case, label): every metric's mean over the case's labels."""
    by_case: Dict[str, List[Mapping]] = {}
    for r in rows:
        by_case.setdefault(r["case_id"], []).append(r)
    return [{"case_id": cid, **{k: float(np.mean([r[k] for r in rs])) for k in METRICS}}
            for cid, rs in by_case.items()]


def run_summary(cases: Sequence[Mapping]) -> dict:
    """A run's summary: ``<metric>_mean`` over cases of the per-case mean over labels, ``dice_median``; with
    several labels also ``label.<name>.<metric>_mean`` per label."""
    per_case = mean_over_labels(cases)
    out = {f"{k}_mean": float(np.mean([c[k] for c in per_case])) for k in METRICS}
    out["dice_median"] = float(np.median([c["dice"] for c in per_case]))
    for name in dict.fromkeys(c["label"] for c in cases if "label" in c):
        rows = [c for c in cases if c.get("label") == name]
        out.update({f"label.{name}.{k}_mean": float(np.mean([c[k] for c in rows])) for k in METRICS})
    return out


def surface_distances(pred: np.ndarray, ref: np.ndarray,
                      spacing: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred->ref, ref->pred) in mm; both masks must be non-empty."""
    # One voxel of margin: every surface voxel and its nearest partner lie inside,
    # so distances and erosion are unchanged, and the distance transforms run on
    # the small box instead of the whole CT volume.
    box = _union_box(pred, ref, margin=1)
    s_pred, s_ref = _surface(pred[box]), _surface(ref[box])
    # EDT of the complement gives, at every voxel, the distance to the nearest surface voxel.
    d_pr = ndimage.distance_transform_edt(~s_ref, sampling=spacing)[s_pred]
    d_rp = ndimage.distance_transform_edt(~s_pred, sampling=spacing)[s_ref]
    return d_pr, d_rp


def _union_box(pred: np.ndarray, ref: np.ndarray, margin: int) -> Tuple[slice, ...]:
    """Bounding box of pred | ref (which must not be empty), widened by ``margin`` voxels."""
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + 1 + margin) for i in np.nonzero(pred | ref))


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


class Components(NamedTuple):
    """Connected components of a case and their overlaps (labels start at 1)."""
    ref_sizes: np.ndarray    # voxels per reference lesion, index = label - 1
    pred_sizes: np.ndarray   # voxels per predicted component
    ref_ids: np.ndarray      # for each overlapping (reference, prediction) pair: the reference label
    pred_ids: np.ndarray     # ... the predicted label
    overlap: np.ndarray      # ... and the number of voxels they share

    @property
    def n_ref(self) -> int:
        return len(self.ref_sizes)

    @property
    def n_pred(self) -> int:
        return len(self.pred_sizes)

    def iou(self) -> np.ndarray:
        """IoU of each overlapping pair."""
        union = self.ref_sizes[self.ref_ids - 1] + self.pred_sizes[self.pred_ids - 1] - self.overlap
        return self.overlap / union


def lesion_components(pred: np.ndarray, ref: np.ndarray) -> Components:
    """26-connected components of two boolean masks and the voxel overlap of every touching pair."""
    if not (pred.any() or ref.any()):
        none = np.zeros(0, dtype=np.int64)
        return Components(none, none, none, none, none)
    # Components lie inside the union's bounding box: label the box, not the whole volume.
    box = _union_box(pred, ref, margin=0)
    pred_lab, n_pred = ndimage.label(pred[box], structure=LESION_STRUCTURE)
    ref_lab, n_ref = ndimage.label(ref[box], structure=LESION_STRUCTURE)
    both = (ref_lab > 0) & (pred_lab > 0)
    pairs, overlap = np.unique(np.stack([ref_lab[both], pred_lab[both]]), axis=1, return_counts=True)
    return Components(ref_sizes=np.bincount(ref_lab.ravel(), minlength=n_ref + 1)[1:],
                      pred_sizes=np.bincount(pred_lab.ravel(), minlength=n_pred + 1)[1:],
                      ref_ids=pairs[0].astype(np.int64), pred_ids=pairs[1].astype(np.int64),
                      overlap=overlap.astype(np.int64))


def match_one_to_one(comp: Components, iou_threshold: float = LESION_IOU_THRESHOLD) -> List[Tuple[int, int, float]]:
    """(reference label, predicted label, IoU) of the one-to-one matching with the largest total IoU
    among pairs with IoU >= ``iou_threshold``."""
    iou = comp.iou()
    ok = iou >= iou_threshold
    if not ok.any():
        return []
    # Dense matrix over the components that have an eligible pair; ineligible pairs
    # weigh 0, so the assignment never prefers them and they are dropped below.
    rows, r_idx = np.unique(comp.ref_ids[ok], return_inverse=True)
    cols, c_idx = np.unique(comp.pred_ids[ok], return_inverse=True)
    weight = np.zeros((len(rows), len(cols)))
    weight[r_idx, c_idx] = iou[ok]
    r, c = linear_sum_assignment(weight, maximize=True)
    return [(int(rows[i]), int(cols[j]), float(weight[i, j])) for i, j in zip(r, c) if weight[i, j] > 0]


def lesion_metrics(pred: np.ndarray, ref: np.ndarray, iou_threshold: float = LESION_IOU_THRESHOLD) -> dict:
    """Lesion-wise detection under the one-to-one (``lesion_*``) and any-overlap (``lesion_*_any``) rules."""
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"the lesion IoU threshold must be in (0, 1], got {iou_threshold}")
    comp = lesion_components(np.asarray(pred) != 0, np.asarray(ref) != 0)
    matched = len(match_one_to_one(comp, iou_threshold))
    one_to_one = _detection(matched, matched, comp.n_pred, comp.n_ref)
    # Any overlap: every touching pair counts; a component may serve several lesions.
    lenient = _detection(len(np.unique(comp.ref_ids)), len(np.unique(comp.pred_ids)), comp.n_pred, comp.n_ref)
    return {**dict(zip(LESION_METRICS, one_to_one)), **dict(zip(LESION_METRICS_ANY, lenient))}


def _detection(detected_ref: int, matched_pred: int, n_pred: int, n_ref: int) -> tuple:
    """(TP, FP, FN, precision, recall, F1) with the zero-denominator rules of the module docstring."""
    precision = matched_pred / n_pred if n_pred else float(n_ref == 0)
    recall = detected_ref / n_ref if n_ref else float(n_pred == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return (int(detected_ref), int(n_pred - matched_pred), int(n_ref - detected_ref),
            float(precision), float(recall), float(f1))
