"""bench.stats: checked against scipy/statsmodels directly and on synthetic tables with known answers."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench import stats
from bench.results import synthetic_results

FAST = dict(n_boot=300, seed=0)


def table(values: dict, repeats=None) -> stats.Paired:
    """Paired table from {method: values}; blocks are (repeat, case)."""
    n = len(next(iter(values.values())))
    repeats = repeats if repeats is not None else [i % 3 for i in range(n)]
    index = pd.MultiIndex.from_arrays([repeats, [f"c{i}" for i in range(n)]], names=["repeat", "case_id"])
    return stats.Paired(pd.DataFrame(values, index=index), 0, "synthetic", 3, "dice")


def test_paired_table_keeps_complete_blocks_and_says_how_many_were_dropped():
    df = synthetic_results()
    df = df.drop(df.index[(df.method == "lora") & (df.shots == 3) & (df.case_id == "case_004")])
    with pytest.warns(UserWarning, match="dropped 3 of 15"):
        p = stats.paired_table(df, "phantom", 3)
    assert p.dropped == 3 and len(p.values) == 12 and p.methods == ["dgst", "full", "lora"]
    with pytest.raises(ValueError, match="no results"):
        stats.paired_table(df, "phantom", 5)


def test_wilcoxon_and_rank_biserial_on_fixed_sample():
    a = np.array([0.81, 0.72, 0.60, 0.93, 0.85, 0.70])
    b = np.array([0.80, 0.70, 0.63, 0.89, 0.80, 0.64])  # differences 1, 2, -3, 4, 5, 6 (x 0.01)
    res = stats.pairwise(table({"a": a, "b": b}), [("a", "b")], **FAST)
    assert res.p_wilcoxon[0] == pytest.approx(sps.wilcoxon(a, b).pvalue)
    assert res.rank_biserial[0] == pytest.approx((21 - 2 * 3) / 21)  # (R+ - R-) / (R+ + R-), R- = 3
    assert res.mean_diff[0] == pytest.approx(np.mean(a - b))


def test_permutation_test_is_exact_for_small_samples():
    # 6 positive differences: 2^6 sign flips, only "all +" and "all -" are as extreme -> p = 2/64.
    a = np.arange(6) + 1.0
    assert stats.permutation_p(a, np.zeros(6)) == pytest.approx(2 / 64)
    assert stats.permutation_p(a, a) == 1.0
    assert stats.wilcoxon_p(np.zeros(5)) == 1.0


def test_holm_correction_across_the_family():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 0.8, 12)
    p = table({"m0": base, "m1": base - 0.05 + rng.normal(0, 0.02, 12),
               "m2": base - 0.01 + rng.normal(0, 0.02, 12), "m3": base + rng.normal(0, 0.02, 12)})
    res = stats.vs_reference(p, "m0", **FAST)
    assert list(res.b) == ["m1", "m2", "m3"]
    raw = res.p_wilcoxon.to_numpy()
    # Holm by hand: sort, multiply by (m - i), running maximum, cap at 1.
    order = np.argsort(raw)
    adj = np.minimum(1, np.maximum.accumulate(raw[order] * (3 - np.arange(3))))
    expected = np.empty(3)
    expected[order] = adj
    np.testing.assert_allclose(res.p_wilcoxon_holm, expected)
    assert len(stats.all_pairs(p, **FAST)) == 6


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    p = stats.paired_table(synthetic_results(), "phantom", 1)
    s1, s2 = stats.summary(p, **FAST), stats.summary(p, **FAST)
    pd.testing.assert_frame_equal(s1, s2)
    assert ((s1["mean_lo"] <= s1["mean"]) & (s1["mean"] <= s1["mean_hi"])).all()
    assert ((s1["median_lo"] <= s1["median"]) & (s1["median"] <= s1["median_hi"])).all()
    assert list(s1.method) == ["dgst", "full", "lora"]
    assert not stats.summary(p, n_boot=300, seed=1).equals(s1)


def test_two_level_bootstrap_resamples_repeats_then_cases():
    index = pd.MultiIndex.from_arrays([[0, 0, 0, 1, 1, 2], list("abcdef")])
    repeat_of = index.get_level_values(0).to_numpy()
    pos = stats.bootstrap_samples(index, n_boot=50, seed=3)
    assert pos.shape == (50, 3 * 3)  # 3 repeats drawn, each padded to the largest repeat (3 cases)
    for chunk in pos.reshape(-1, 3):  # one drawn repeat
        rows = chunk[chunk >= 0]
        assert len(set(repeat_of[rows])) == 1  # cases come from the drawn repeat only
        assert len(rows) == {0: 3, 1: 2, 2: 1}[repeat_of[rows[0]]]  # as many as it has
    np.testing.assert_array_equal(pos, stats.bootstrap_samples(index, n_boot=50, seed=3))
    # Only the repeat effect varies: the interval must still be wide.
    p = table({"m": np.array([0.5, 0.5, 0.5, 0.9, 0.9, 0.9])}, repeats=[0, 0, 0, 1, 1, 1])
    s = stats.summary(p, **FAST)
    assert s.mean_lo[0] == pytest.approx(0.5) and s.mean_hi[0] == pytest.approx(0.9)


def test_friedman_nemenyi_one_method_clearly_best():
    p = stats.paired_table(synthetic_results({"dgst": 0.9, "full": 0.6, "lora": 0.58, "bitfit": 0.55}),
                           "phantom", 3)
    f = stats.friedman_nemenyi(p)
    assert f.mean_ranks.index[0] == "dgst" and f.mean_ranks["dgst"] == 1.0
    x = p.values.to_numpy()
    direct = sps.friedmanchisquare(*x.T)
    assert f.statistic == pytest.approx(direct.statistic) and f.pvalue == pytest.approx(direct.pvalue)
    assert f.pvalue < 1e-4
    k, n = 4, len(x)
    cd = sps.studentized_range.ppf(0.95, k, np.inf) / np.sqrt(2) * np.sqrt(k * (k + 1) / (6 * n))
    assert f.cd == pytest.approx(cd, rel=1e-4)
    assert "at least 3 methods" in stats.friedman_nemenyi(table({"a": x[:, 0], "b": x[:, 1]})).note


def test_rank_stability_is_a_distribution():
    p = stats.paired_table(synthetic_results(), "phantom", 3)
    r = stats.rank_stability(p, **FAST)
    np.testing.assert_allclose(r.sum(axis=1), 1.0)
    np.testing.assert_allclose(r.sum(axis=0), 1.0)  # no ties between bootstrap means here
    assert r.index[0] == "dgst" and r.loc["dgst", 1] > 0.9


def test_lower_is_better_metric_ranks_smallest_first():
    p = stats.paired_table(synthetic_results(), "phantom", 3, metric="hd95")
    assert stats.summary(p, **FAST).method[0] == "dgst"
    assert stats.friedman_nemenyi(p).mean_ranks.index[0] == "dgst"


@pytest.mark.parametrize("gap, supported", [(0.20, True), (0.06, False)])
def test_claim_check(gap, supported):
    df = synthetic_results({"dgst": 0.6 + gap, "full": 0.6, "lora": 0.5}, repeats=5, cases=8, noise=0.02)
    claim = stats.claim_check(stats.paired_table(df, "phantom", 3), **FAST)
    assert claim["best_other"] == "full"
    assert claim["supported"] is supported
    assert claim["verdict"].startswith("SUPPORTED" if supported else "NOT SUPPORTED")
    assert claim["diff_lo"] <= claim["mean_diff"] <= claim["diff_hi"]
    assert claim["mean_diff"] == pytest.approx(gap, abs=0.03)


def test_analyse_without_reference():
    df = synthetic_results({"full": 0.7, "lora": 0.6, "bitfit": 0.5})
    a = stats.analyse(df, "phantom", 1, n_boot=200, n_resamples=999)
    assert a.vs_reference is None and a.claim is None and len(a.all_pairs) == 3


def test_unequal_budgets_are_refused_and_one_budget_can_be_selected(tmp_path):
    from bench.results import load_results, read_snapshot, write_snapshot

    df = synthetic_results(repeats=2, cases=3)
    df.loc[df.method == "lora", "iterations"] = 30
    with pytest.raises(ValueError, match=r"training iterations \(dgst: 60; full: 60; lora: 30\).*--iterations"):
        stats.paired_table(df, "phantom", 1)
    snap = write_snapshot(df, tmp_path / "mixed.csv")
    kept = load_results(snap, iterations=60)
    assert set(kept.method) == {"dgst", "full"} and (kept.iterations == 60).all()
    assert len(stats.paired_table(kept, "phantom", 1).values) == 2 * 3
    # a snapshot written before the budget columns existed still loads; its budget is unknown, not checked
    old = tmp_path / "old.csv"
    pd.read_csv(snap).drop(columns=["iterations", "params_source"]).to_csv(old, index=False)
    legacy = read_snapshot(old)
    assert legacy.iterations.isna().all() and (legacy.params_source == "unknown").all()
    stats.paired_table(legacy, "phantom", 1)


def test_tuned_and_default_hyper_parameters_are_not_compared(tmp_path):
    from bench.results import load_results, write_snapshot

    df = synthetic_results(repeats=2, cases=3)
    df.loc[df.method == "lora", "params_source"] = "lora-phantom-1shot-v1"
    with pytest.raises(ValueError, match=r"tuned vs default\) \(dgst: default; full: default; lora: tuned\).*--params"):
        stats.paired_table(df, "phantom", 1)
    snap = write_snapshot(df, tmp_path / "mixed.csv")
    assert set(load_results(snap, params="default").method) == {"dgst", "full"}
    assert set(load_results(snap, params="tuned").method) == {"lora"}
