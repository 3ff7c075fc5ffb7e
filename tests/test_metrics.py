"""bench.metrics: hand-made known answers, MONAI and brute force on random anisotropic cases, empty masks."""
import math

import numpy as np
import pytest
import torch
from monai.metrics import (compute_average_surface_distance, compute_hausdorff_distance,
                           compute_surface_dice)
from scipy import ndimage
from scipy.spatial.distance import cdist

from bench.metrics import METRICS, case_metrics

SPACING = (2.5, 0.7, 0.9)  # z, y, x: thick slices as in head-and-neck CT


def cube(shape=(10, 10, 10), lo=2, hi=6):
    m = np.zeros(shape, bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def random_blobs(rng, shape=(14, 18, 20)):
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    return noise > np.quantile(noise, 0.8)  # ~20 % foreground, several blobs, touching the border


def brute_force(pred, ref, spacing, tol):
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
            "assd": both.mean(), "nsd": np.mean(both <= tol)}


def test_keys_and_types():
    m = case_metrics(cube(), cube(), SPACING)
    assert tuple(m) == METRICS
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_identical_masks():
    m = case_metrics(cube(), cube(), SPACING)
    assert m["dice"] == 1 and m["hd95"] == 0 and m["assd"] == 0 and m["nsd"] == 1
    assert m["vol_pred_ml"] == m["vol_ref_ml"] == pytest.approx(64 * 2.5 * 0.7 * 0.9 / 1000)


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
    tol = 1.5
    ours = case_metrics(pred, ref, SPACING, nsd_tolerance_mm=tol)
    p, r = (torch.from_numpy(x[None, None].astype(np.float32)) for x in (pred, ref))
    monai = {
        "hd95": compute_hausdorff_distance(p, r, percentile=95, spacing=SPACING).item(),
        "assd": compute_average_surface_distance(p, r, symmetric=True, spacing=SPACING).item(),
        "nsd": compute_surface_dice(p, r, class_thresholds=[tol], include_background=True,
                                    spacing=SPACING).item(),
    }
    brute = brute_force(pred, ref, SPACING, tol)
    for k in ("hd95", "assd", "nsd"):
        assert ours[k] == pytest.approx(monai[k], rel=1e-5), k
        assert ours[k] == pytest.approx(brute[k], rel=1e-9), k
    assert ours["dice"] == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))


def test_empty_masks():
    empty, full = np.zeros((6, 7, 8), bool), cube((6, 7, 8), 1, 4)
    both = case_metrics(empty, empty, SPACING)
    assert (both["dice"], both["nsd"], both["hd95"], both["assd"]) == (1, 1, 0, 0)
    assert (both["lesion_precision"], both["lesion_recall"], both["lesion_f1"]) == (1, 1, 1)
    diagonal = math.sqrt((6 * 2.5) ** 2 + (7 * 0.7) ** 2 + (8 * 0.9) ** 2)
    for pred, ref in ((empty, full), (full, empty)):
        m = case_metrics(pred, ref, SPACING)
        assert (m["dice"], m["nsd"]) == (0, 0)
        assert m["hd95"] == m["assd"] == pytest.approx(diagonal)
        assert (m["lesion_precision"], m["lesion_recall"], m["lesion_f1"]) == (0, 0, 0)
        assert not any(math.isnan(v) for v in m.values())
    assert case_metrics(empty, full, SPACING, worst_distance_mm=99.0)["hd95"] == 99.0
    assert case_metrics(empty, full, SPACING)["lesion_fn"] == 1
    assert case_metrics(full, empty, SPACING)["lesion_fp"] == 1


def test_lesion_counting():
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
    assert (m["lesion_tp"], m["lesion_fn"], m["lesion_fp"]) == (3, 1, 1)
    assert m["lesion_recall"] == pytest.approx(3 / 4)
    assert m["lesion_precision"] == pytest.approx(3 / 4)  # 3 of 4 predicted components matched
    assert m["lesion_f1"] == pytest.approx(0.75)


def test_one_component_over_two_lesions_is_not_a_false_positive():
    ref, pred = np.zeros((6, 6, 10), bool), np.zeros((6, 6, 10), bool)
    ref[2:4, 2:4, 1:3] = ref[2:4, 2:4, 6:8] = True
    pred[2:4, 2:4, 1:8] = True
    m = case_metrics(pred, ref, SPACING)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"], m["lesion_f1"]) == (2, 0, 0, 1.0)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), SPACING)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), (1.0, 1.0))
