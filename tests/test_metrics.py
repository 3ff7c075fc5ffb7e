"""bench.metrics: hand-made known answers, MONAI and brute force on random anisotropic cases, empty masks,
one-to-one and any-overlap lesion detection."""
import itertools
import math

import numpy as np
import pytest
import torch
from monai.metrics import (compute_average_surface_distance, compute_hausdorff_distance,
                           compute_surface_dice)
from scipy import ndimage
from scipy.spatial.distance import cdist

from bench.metrics import (DEFAULT_NSD_TOLERANCE_MM, HIGHER_IS_BETTER, INT_METRICS, LOWER_IS_BETTER, METRICS,
                           METRICS_V1, case_metrics, higher_is_better, lesion_components, match_one_to_one,
                           upgrade_v1)

SPACING = (2.5, 0.7, 0.9)  # z, y, x: thick slices as in head-and-neck CT
LESIONS = ("tp", "fp", "fn", "precision", "recall", "f1")


def cube(shape=(10, 10, 10), lo=2, hi=6):
    m = np.zeros(shape, bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def random_blobs(rng, shape=(14, 18, 20)):
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    return noise > np.quantile(noise, 0.8)  # ~20 % foreground, several blobs, touching the border


def brute_force(pred, ref, spacing, tols):
    """Independent reference: surfaces by 6-neighbour test, all pairwise distances."""
    def surface_points(m):
        padded = np.pad(m, 1)
        inner = np.ones_like(m)
        for ax in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis=ax)[1:-1, 1:-1, 1:-1]
        return np.argwhere(m & ~inner) * np.asarray(spacing)
    d = cdist(surface_points(pred), surface_points(ref))
    d_pr, d_rp = d.min(1), d.min(0)
    both = np.concatenate([d_pr, d_rp])
    return {"hd95": max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)),
            "assd": both.mean(), **{k: np.mean(both <= t) for k, t in tols.items()}}


def lesions(m, rule=""):
    """The six lesion numbers of a metrics dict, one-to-one ('') or any-overlap ('_any')."""
    return tuple(m[f"lesion_{f}{rule}"] for f in LESIONS)


def line_case(length, ref_runs, pred_runs):
    """Masks on one row of voxels (z = y = 1): runs are half-open [start, stop) along x."""
    ref, pred = np.zeros((3, 3, length), bool), np.zeros((3, 3, length), bool)
    for mask, runs in ((ref, ref_runs), (pred, pred_runs)):
        for a, b in runs:
            mask[1, 1, a:b] = True
    return pred, ref


def test_keys_types_and_directions():
    m = case_metrics(cube(), cube(), SPACING)
    assert tuple(m) == METRICS
    for k, v in m.items():
        assert isinstance(v, int if k in INT_METRICS else float), k
    assert not set(HIGHER_IS_BETTER) & set(LOWER_IS_BETTER)
    assert set(HIGHER_IS_BETTER) | set(LOWER_IS_BETTER) < set(METRICS)
    assert higher_is_better("nsd_voxel") and higher_is_better("lesion_f1_any") and not higher_is_better("lesion_fp")
    with pytest.raises(ValueError, match="not a score"):
        higher_is_better("vol_pred_ml")


def test_identical_masks():
    m = case_metrics(cube(), cube(), SPACING)
    assert m["dice"] == 1 and m["hd95"] == 0 and m["assd"] == 0 and m["nsd"] == 1 and m["nsd_voxel"] == 1
    assert m["vol_pred_ml"] == m["vol_ref_ml"] == pytest.approx(64 * 2.5 * 0.7 * 0.9 / 1000)
    assert (m["pred_empty"], m["ref_empty"]) == (0, 0)
    assert lesions(m) == lesions(m, "_any") == (1, 0, 0, 1, 1, 1)


def test_shifted_cube_dice():
    # 4^3 cube shifted by one voxel: overlap 48 of 64 voxels each -> Dice 2*48/128.
    m = case_metrics(cube(), np.roll(cube(), 1, axis=2), SPACING)
    assert m["dice"] == pytest.approx(0.75)


def test_parallel_plates_known_distances():
    # Two one-voxel-thick plates 3 slices apart: every surface voxel is 3 * 2.5 mm from the other.
    ref, pred = np.zeros((8, 6, 6), bool), np.zeros((8, 6, 6), bool)
    ref[2], pred[5] = True, True
    m = case_metrics(pred, ref, SPACING, nsd_tolerance_mm=7.0)
    assert m["dice"] == 0 and m["hd95"] == pytest.approx(7.5) and m["assd"] == pytest.approx(7.5)
    assert m["nsd"] == 0
    assert case_metrics(pred, ref, SPACING, nsd_tolerance_mm=7.5)["nsd"] == 1  # tolerance is inclusive


def test_voxel_sized_nsd_tolerance_is_the_largest_spacing():
    # Plates one slice (2.5 mm) apart: within the voxel-sized tolerance, outside a 2 mm one.
    ref, pred = np.zeros((8, 6, 6), bool), np.zeros((8, 6, 6), bool)
    ref[2], pred[3] = True, True
    m = case_metrics(pred, ref, SPACING, nsd_tolerance_mm=2.0)
    assert (m["nsd"], m["nsd_tol_mm"]) == (0, 2.0)
    assert (m["nsd_voxel"], m["nsd_voxel_tol_mm"]) == (1, 2.5)
    pred[3], pred[4] = False, True  # two slices apart: outside both
    assert case_metrics(pred, ref, SPACING, nsd_tolerance_mm=2.0)["nsd_voxel"] == 0
    # the voxel tolerance follows the case's spacing, whichever axis is coarsest
    assert case_metrics(pred, ref, (1.0, 3.0, 0.5))["nsd_voxel_tol_mm"] == 3.0


def test_single_voxels_anisotropic_distance():
    ref, pred = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    ref[1, 1, 1], pred[2, 3, 1] = True, True  # offset (1, 2, 0) voxels
    expected = math.hypot(1 * SPACING[0], 2 * SPACING[1])
    m = case_metrics(pred, ref, SPACING)
    assert m["hd95"] == pytest.approx(expected) and m["assd"] == pytest.approx(expected)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecation inside its own code
@pytest.mark.parametrize("seed", range(4))
def test_random_cases_match_monai_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred, ref = random_blobs(rng), random_blobs(rng)
    tols = {"nsd": 1.5, "nsd_voxel": max(SPACING)}
    ours = case_metrics(pred, ref, SPACING, nsd_tolerance_mm=tols["nsd"])
    p, r = (torch.from_numpy(x[None, None].astype(np.float32)) for x in (pred, ref))
    monai = {
        "hd95": compute_hausdorff_distance(p, r, percentile=95, spacing=SPACING).item(),
        "assd": compute_average_surface_distance(p, r, symmetric=True, spacing=SPACING).item(),
        **{k: compute_surface_dice(p, r, class_thresholds=[t], include_background=True, spacing=SPACING).item()
           for k, t in tols.items()},
    }
    brute = brute_force(pred, ref, SPACING, tols)
    for k in ("hd95", "assd", *tols):
        assert ours[k] == pytest.approx(monai[k], rel=1e-5), k
        assert ours[k] == pytest.approx(brute[k], rel=1e-9), k
    assert 0 < ours["nsd"] < ours["nsd_voxel"] < 1  # the two tolerances give different, non-trivial numbers
    assert ours["dice"] == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))


def test_empty_masks():
    empty, full = np.zeros((6, 7, 8), bool), cube((6, 7, 8), 1, 4)
    both = case_metrics(empty, empty, SPACING)
    assert (both["dice"], both["nsd"], both["nsd_voxel"], both["hd95"], both["assd"]) == (1, 1, 1, 0, 0)
    assert lesions(both) == lesions(both, "_any") == (0, 0, 0, 1, 1, 1)
    assert (both["pred_empty"], both["ref_empty"]) == (1, 1)
    diagonal = math.sqrt((6 * 2.5) ** 2 + (7 * 0.7) ** 2 + (8 * 0.9) ** 2)
    for pred, ref in ((empty, full), (full, empty)):
        m = case_metrics(pred, ref, SPACING)
        assert (m["dice"], m["nsd"], m["nsd_voxel"]) == (0, 0, 0)
        assert m["hd95"] == m["assd"] == pytest.approx(diagonal)
        for rule in ("", "_any"):
            assert (m[f"lesion_precision{rule}"], m[f"lesion_recall{rule}"], m[f"lesion_f1{rule}"]) == (0, 0, 0)
        assert (m["pred_empty"], m["ref_empty"]) == (int(pred is empty), int(ref is empty))
        assert not any(math.isnan(v) for v in m.values())
        assert (m["nsd_tol_mm"], m["nsd_voxel_tol_mm"]) == (DEFAULT_NSD_TOLERANCE_MM, 2.5)  # recorded even if unused
    assert case_metrics(empty, full, SPACING, worst_distance_mm=99.0)["hd95"] == 99.0


def test_empty_side_counts_every_lesion():
    two = np.zeros((6, 6, 10), bool)
    two[1:3, 1:3, 1:3] = two[1:3, 1:3, 6:8] = True
    empty = np.zeros_like(two)
    for rule in ("", "_any"):
        assert lesions(case_metrics(empty, two, SPACING), rule) == (0, 0, 2, 0, 0, 0)
        assert lesions(case_metrics(two, empty, SPACING), rule) == (0, 2, 0, 0, 0, 0)


def test_merged_blob_over_two_nodes():
    # Nodes of 4 voxels at x 1..4 and 6..9; one predicted run x 1..9 covers both: IoU 4/9 each.
    pred, ref = line_case(12, [(1, 5), (6, 10)], [(1, 10)])
    m = case_metrics(pred, ref, SPACING)
    assert lesions(m) == (1, 0, 1, 1.0, 0.5, pytest.approx(2 / 3))
    assert lesions(m, "_any") == (2, 0, 0, 1.0, 1.0, 1.0)


def test_split_prediction_of_one_node():
    # One node x 1..9 predicted as two runs x 1..4 and 6..9 (IoU 4/9 each).
    pred, ref = line_case(12, [(1, 10)], [(1, 5), (6, 10)])
    m = case_metrics(pred, ref, SPACING)
    assert lesions(m) == (1, 1, 0, 0.5, 1.0, pytest.approx(2 / 3))
    assert lesions(m, "_any") == (1, 0, 0, 1.0, 1.0, 1.0)


def test_tiny_spurious_component_is_a_false_positive():
    ref, pred = cube((10, 10, 10), 2, 5), cube((10, 10, 10), 2, 5)
    pred[8, 8, 8] = True
    m = case_metrics(pred, ref, SPACING)
    assert lesions(m) == lesions(m, "_any") == (1, 1, 0, 0.5, 1.0, pytest.approx(2 / 3))


def test_graze_below_the_iou_threshold():
    # Node of 10 voxels touched by a 2-voxel prediction on 1 voxel: IoU 1/11 < 0.1.
    pred, ref = line_case(14, [(1, 11)], [(10, 12)])
    m = case_metrics(pred, ref, SPACING)
    assert lesions(m) == (0, 1, 1, 0.0, 0.0, 0.0)
    assert lesions(m, "_any") == (1, 0, 0, 1.0, 1.0, 1.0)
    # The threshold is inclusive and can be changed: here IoU = 1/11 exactly.
    assert case_metrics(pred, ref, SPACING, lesion_iou_threshold=1 / 11)["lesion_tp"] == 1


def test_matching_maximises_total_iou_not_greedy():
    # ref1 = x 0..9, ref2 = x 11..14; pred B = x 0..2 overlaps ref1 (IoU 3/10); pred A = x 4..13 overlaps
    # ref1 (IoU 6/14) and ref2 (IoU 3/11). Greedy on the best IoU pairs A with ref1 and leaves B and ref2
    # unmatched (total 0.43); the optimal assignment pairs B-ref1 and A-ref2 (total 0.57).
    pred, ref = line_case(16, [(0, 10), (11, 15)], [(0, 3), (4, 14)])
    pairs = match_one_to_one(lesion_components(pred, ref))
    assert sorted((r, p) for r, p, _ in pairs) == [(1, 1), (2, 2)]  # labels in raster (x) order
    assert sorted(iou for *_, iou in pairs) == [pytest.approx(3 / 11), pytest.approx(3 / 10)]
    assert lesions(case_metrics(pred, ref, SPACING)) == (2, 0, 0, 1.0, 1.0, 1.0)


def paint(shape, corners, sizes):
    m = np.zeros(shape, bool)
    for lo, size in zip(corners, sizes):
        m[tuple(slice(a, a + n) for a, n in zip(lo, size))] = True
    return m


def random_lesion_case(rng, shape=(5, 12, 12), n=5):
    """Reference: n random boxes (some touch and merge); prediction: the same boxes moved and resized by up
    to one voxel, so pairs overlap, some below the IoU threshold, some components overlap several."""
    corners = np.stack([rng.integers(0, s - 1, n) for s in shape], axis=1)
    sizes = rng.integers(1, 5, (n, 3))
    ref = paint(shape, corners, sizes)
    pred = paint(shape, np.clip(corners + rng.integers(-1, 2, corners.shape), 0, None),
                 np.clip(sizes + rng.integers(-1, 2, sizes.shape), 1, None))
    return pred, ref


def brute_force_lesions(pred, ref, threshold=0.1):
    """All IoUs by explicit masks; the best matching by enumerating every injection of the smaller side."""
    s = np.ones((3, 3, 3))
    ref_lab, n_ref = ndimage.label(ref, s)
    pred_lab, n_pred = ndimage.label(pred, s)
    iou = np.zeros((n_ref, n_pred))
    for i, j in itertools.product(range(n_ref), range(n_pred)):
        a, b = ref_lab == i + 1, pred_lab == j + 1
        iou[i, j] = (a & b).sum() / (a | b).sum()
    weight = np.where(iou >= threshold, iou, 0.0)
    w = weight if n_ref <= n_pred else weight.T
    best, best_count = 0.0, 0
    for cols in itertools.permutations(range(w.shape[1]), w.shape[0]):
        vals = w[np.arange(w.shape[0]), list(cols)]
        if vals.sum() > best + 1e-12:
            best, best_count = vals.sum(), int(np.count_nonzero(vals))
    touched = iou > 0
    return {"best_iou_sum": best, "tp": best_count, "n_ref": n_ref, "n_pred": n_pred,
            "tp_any": int(touched.any(1).sum()), "fp_any": int((~touched.any(0)).sum())}


@pytest.mark.parametrize("seed", range(8))
def test_random_lesions_match_brute_force(seed):
    pred, ref = random_lesion_case(np.random.default_rng(seed))
    brute = brute_force_lesions(pred, ref)
    assert brute["best_iou_sum"] > 0  # the case has something to match
    pairs = match_one_to_one(lesion_components(pred, ref))
    assert sum(iou for *_, iou in pairs) == pytest.approx(brute["best_iou_sum"], rel=1e-12)
    assert len({r for r, *_ in pairs}) == len({p for _, p, _ in pairs}) == len(pairs)  # one-to-one
    m = case_metrics(pred, ref, SPACING)
    assert lesions(m)[:3] == (brute["tp"], brute["n_pred"] - brute["tp"], brute["n_ref"] - brute["tp"])
    assert (m["lesion_tp_any"], m["lesion_fp_any"], m["lesion_fn_any"]) == (
        brute["tp_any"], brute["fp_any"], brute["n_ref"] - brute["tp_any"])


def test_lesion_counting_any_overlap():
    ref, pred = np.zeros((12, 12, 12), bool), np.zeros((12, 12, 12), bool)
    ref[1:3, 1:3, 1:3] = True          # lesion A: well covered
    ref[6:8, 6:8, 6:8] = True          # lesion B: touched by a single predicted voxel
    ref[1:3, 8:10, 8:10] = True        # lesion C: missed
    ref[10, 10, 10] = ref[11, 11, 11] = True  # lesion D: corner-touching voxels are one 26-connected lesion
    pred[1:3, 1:3, 1:3] = True
    pred[5, 5, 5] = pred[6, 6, 6] = True  # one component (diagonal), overlapping B by one voxel
    pred[10:12, 1:3, 1:3] = True       # false positive
    pred[11, 11, 11] = True            # hits D
    m = case_metrics(pred, ref, SPACING)
    assert (m["lesion_tp_any"], m["lesion_fn_any"], m["lesion_fp_any"]) == (3, 1, 1)
    assert m["lesion_recall_any"] == pytest.approx(3 / 4)
    assert m["lesion_precision_any"] == pytest.approx(3 / 4)  # 3 of 4 predicted components matched
    assert m["lesion_f1_any"] == pytest.approx(0.75)


def test_dataset_tolerances():
    from bench.datasets import DATASETS
    for name in DATASETS:
        tol = DATASETS.get(name).nsd_tolerance_mm
        assert isinstance(tol, float) and tol > 0, name
        assert case_metrics(cube(), cube(), SPACING, nsd_tolerance_mm=tol)["nsd_tol_mm"] == tol


def test_version_1_records_keep_what_they_measured():
    # What version 1 recorded for the merged-blob case: NSD at 1 mm, lesions under the any-overlap rule.
    pred, ref = line_case(12, [(1, 5), (6, 10)], [(1, 10)])
    now = case_metrics(pred, ref, SPACING)
    v1 = {**{k: now[k] for k in ("dice", "hd95", "assd", "vol_pred_ml", "vol_ref_ml")},
          "nsd": case_metrics(pred, ref, SPACING, nsd_tolerance_mm=1.0)["nsd"],
          **{f"lesion_{f}": now[f"lesion_{f}_any"] for f in LESIONS}}
    assert set(v1) == set(METRICS_V1)
    up = upgrade_v1(v1)
    assert tuple(up) == METRICS
    unknown = {"nsd_voxel", "nsd_voxel_tol_mm", *(f"lesion_{f}" for f in LESIONS)}  # one-to-one: not measured
    assert {k for k, v in up.items() if math.isnan(v)} == unknown
    assert {k: v for k, v in up.items() if k not in unknown} == {
        **{k: v1[k] for k in ("dice", "hd95", "assd", "nsd", "vol_pred_ml", "vol_ref_ml")}, "nsd_tol_mm": 1.0,
        **{f"lesion_{f}_any": v1[f"lesion_{f}"] for f in LESIONS}, "pred_empty": 0, "ref_empty": 0}
    assert v1["lesion_tp"] == 2 and now["lesion_tp"] == 1  # the renaming matters here
    assert upgrade_v1({**v1, "vol_pred_ml": 0.0})["pred_empty"] == 1
    with pytest.raises(ValueError, match="missing lesion_f1"):
        upgrade_v1({k: v for k, v in v1.items() if k != "lesion_f1"})


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), SPACING)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), (1.0, 1.0))
    with pytest.raises(ValueError, match="nsd_tolerance_mm"):
        case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), SPACING, nsd_tolerance_mm=0)
    with pytest.raises(ValueError, match="IoU threshold"):
        case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), SPACING, lesion_iou_threshold=0)
