"""Several labels per case: metrics per label, the results table's ``label`` column, and statistics that
pair on the per-case mean over labels (labels are never counted as cases)."""
import json

import numpy as np
import pandas as pd
import pytest

from bench import stats
from bench.metrics import (INT_METRICS, METRICS, case_metrics, foreground_labels, mean_over_labels, run_summary,
                           score_labels)
from bench.results import SINGLE_LABEL, load_results, read_snapshot, synthetic_results, write_snapshot

FAST = dict(n_boot=200, seed=0)
LABELS = ("lymph_node", "gland", "vessel")


def multi_label(df: pd.DataFrame, labels=LABELS, seed: int = 1) -> pd.DataFrame:
    """A single-label table made multi-label: per label, the same blocks shifted by a label effect + noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i, name in enumerate(labels):
        part = df.assign(label=name)
        part["dice"] = np.clip(part["dice"] - 0.1 * i + rng.normal(0, 0.03, len(part)), 0, 1)
        out.append(part)
    return pd.concat(out, ignore_index=True)


# ---------------------------------------------------------------- metrics

def test_each_label_is_scored_alone_with_its_own_empty_mask_rules():
    ref = np.zeros((6, 8, 8), np.uint8)
    ref[1:3, 1:4, 1:4] = 1                       # nodes
    ref[3:5, 4:7, 4:7] = 2                       # gland; no vessel (3) in this case
    pred = ref.copy()
    pred[pred == 2] = 0                          # the gland is missed entirely
    rows = score_labels(pred, ref, (2.0, 1.0, 1.0), {"lymph_node": 1, "gland": 2, "vessel": 3})
    by = {r["label"]: r for r in rows}
    assert list(by) == ["lymph_node", "gland", "vessel"] and all(set(r) == {"label", *METRICS} for r in rows)
    assert by["lymph_node"]["dice"] == 1.0
    assert by["gland"]["dice"] == 0.0 and by["gland"]["pred_empty"] == 1 and by["gland"]["hd95"] > 0
    assert by["vessel"]["dice"] == 1.0 and by["vessel"]["ref_empty"] == by["vessel"]["pred_empty"] == 1
    assert by["gland"] == {"label": "gland", **case_metrics(pred == 2, ref == 2, (2.0, 1.0, 1.0))}
    # one foreground label: one row, no label, as before
    assert score_labels(pred, ref > 0, (2.0, 1.0, 1.0), {"lymph_node": 1}) == [case_metrics(pred > 0, ref > 0,
                                                                                            (2.0, 1.0, 1.0))]
    mean = mean_over_labels([{"case_id": "a", **r} for r in rows])
    assert len(mean) == 1 and mean[0]["dice"] == pytest.approx(2 / 3)
    summary = run_summary([{"case_id": "a", **r} for r in rows])
    assert summary["dice_mean"] == pytest.approx(2 / 3) and summary["label.gland.dice_mean"] == 0.0


def test_foreground_labels_in_value_order_without_background():
    meta = {"labels": {"background": 0, "vessel": 3, "lymph_node": 1, "gland": 2}}
    assert foreground_labels(meta) == {"lymph_node": 1, "gland": 2, "vessel": 3}


# ---------------------------------------------------------------- results table

def test_results_table_has_one_row_per_case_and_label(tmp_path):
    cases = [{"case_id": f"c{i}", "label": name, **{m: 0 if m in INT_METRICS else 0.5 for m in METRICS}}
             for i in range(2) for name in LABELS]
    res = {"schema_version": 3, "metrics_version": 2, "run_id": "r", "labels": list(LABELS),
           "spec": {"dataset": "phantom-multi", "method": "full", "shots": 3, "repeat": 0, "protocol_version": "v1",
                    "iterations": 60},
           "cost": {"train_seconds": 1.0, "peak_memory_mb": 1.0}, "params": {"trainable": 1, "changed": 1},
           "cases": cases}
    (tmp_path / "result.json").write_text(json.dumps(res))
    df = load_results(tmp_path)
    assert len(df) == 6 and sorted(set(df["label"])) == sorted(LABELS)
    back = read_snapshot(write_snapshot(df, tmp_path / "snap.csv"))
    assert list(back["label"]) == list(df["label"])
    old = synthetic_results().drop(columns="label")         # a snapshot written before the column existed
    old.to_csv(tmp_path / "old.csv", index=False)
    assert set(read_snapshot(tmp_path / "old.csv")["label"]) == {SINGLE_LABEL}


# ---------------------------------------------------------------- statistics

def test_primary_comparison_pairs_on_the_per_case_mean_over_labels():
    df = multi_label(synthetic_results())
    p = stats.paired_table(df, "phantom", 3)
    single = stats.paired_table(synthetic_results(), "phantom", 3)
    assert p.values.shape == single.values.shape                  # one block per (repeat, case), as before
    expected = df[df.shots == 3].groupby(["repeat", "case_id", "method"])["dice"].mean().unstack()
    pd.testing.assert_frame_equal(p.values, expected.rename_axis(columns=None), check_names=False)
    one = stats.paired_table(df, "phantom", 3, label="gland")
    assert one.label == "gland" and one.values.shape == single.values.shape
    with pytest.raises(ValueError, match="label 'liver'"):
        stats.paired_table(df, "phantom", 3, label="liver")


def test_duplicating_labels_does_not_shrink_the_interval():
    """Counting (case, label) rows as cases would shrink every CI by about sqrt(labels)."""
    df = multi_label(synthetic_results())
    copies = df.assign(label=df["label"] + "_copy")
    doubled = pd.concat([df, copies], ignore_index=True)
    a, b = stats.summary(stats.paired_table(df, "phantom", 3), **FAST), \
        stats.summary(stats.paired_table(doubled, "phantom", 3), **FAST)
    pd.testing.assert_frame_equal(a, b)
    pa = stats.vs_reference(stats.paired_table(df, "phantom", 3))
    pb = stats.vs_reference(stats.paired_table(doubled, "phantom", 3))
    pd.testing.assert_frame_equal(pa, pb)


def test_a_missing_label_row_drops_the_block_rather_than_averaging_fewer_labels():
    df = multi_label(synthetic_results())
    gone = (df.method == "lora") & (df.shots == 3) & (df.repeat == 0) & (df.case_id == "case_001") & \
        (df.label == "vessel")
    with pytest.warns(UserWarning, match="dropped"):
        p = stats.paired_table(df[~gone], "phantom", 3)
    assert "case_001" not in p.values.index.get_level_values(1)


def test_methods_scored_on_other_label_sets_are_not_compared():
    df = multi_label(synthetic_results())
    df = df[~((df.method == "lora") & (df.label == "vessel"))]
    with pytest.raises(ValueError, match="label set"):
        stats.paired_table(df, "phantom", 3)


def test_per_label_comparisons_form_their_own_holm_family():
    df = multi_label(synthetic_results())
    t = stats.per_label(df, "phantom", 3)
    assert sorted(set(t.label)) == sorted(LABELS) and len(t) == 3 * 2      # labels x (dgst vs full, lora)
    assert set(t.a) == {"dgst"} and np.allclose(t.p_holm, stats.holm(t.p.to_numpy()))
    for name in LABELS:                                                     # each label on its own blocks
        own = stats.vs_reference(stats.paired_table(df, "phantom", 3, label=name))
        rows = t[t.label == name]
        assert np.allclose(rows.mean_diff, own.mean_diff) and np.allclose(rows.p, own.p)
    assert stats.per_label(synthetic_results(), "phantom", 3).empty       # single label: no family
