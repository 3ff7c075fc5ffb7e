"""bench.stats: checked against scipy/statsmodels directly and on synthetic tables with known answers."""
import gc

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench import stats
from bench.results import synthetic_results

FAST = dict(n_boot=300, seed=0)


def table(values: dict, repeats: int = 2) -> stats.Paired:
    """Paired table from {method: values}, values in repeat-major order over a repeats x cases grid."""
    n = len(next(iter(values.values())))
    index = pd.MultiIndex.from_product([range(repeats), [f"c{i}" for i in range(n // repeats)]],
                                       names=["repeat", "case_id"])
    return stats.Paired(pd.DataFrame(values, index=index), 0, "synthetic", 3, "dice")


def test_paired_table_keeps_complete_blocks_and_says_how_many_were_dropped():
    df = synthetic_results()
    # one lora block missing: that case is dropped in every repeat, so the grid stays crossed
    df = df.drop(df.index[(df.method == "lora") & (df.shots == 3) & (df.case_id == "case_004") & (df.repeat == 1)])
    with pytest.warns(UserWarning, match="dropped 3 of 15"):
        p = stats.paired_table(df, "phantom", 3)
    assert p.dropped == 3 and len(p.values) == 12 and p.methods == ["dgst", "full", "lora"]
    assert (p.repeats, p.cases) == (3, 4) and p.grid().shape == (3, 4, 3)
    with pytest.raises(ValueError, match="no results"):
        stats.paired_table(df, "phantom", 5)


def test_crossed_variance_by_hand_and_against_brute_force_simulation():
    # By hand, a 2 x 3 grid: grand mean 2, repeat means 1, 3 (MS_rep = 3 * 2 * 1 / 1 = 6),
    # case means 1.5, 2, 2.5 (MS_case = 2 * 0.5 / 2 = 0.5): Var = (6 + 0.5) / 6.
    x = np.array([[0.5, 1.0, 1.5], [2.5, 3.0, 3.5]])
    est = stats.crossed_mean(x)
    assert est.mean == pytest.approx(2.0) and est.se ** 2 == pytest.approx(6.5 / 6)
    w_case, w_rep = 0.5 / 6.5, 6 / 6.5
    assert est.df == pytest.approx(1 / (w_case ** 2 / 2 + w_rep / 1))
    # Brute force: the estimate's mean is the true variance of the grid mean plus s2_resid / (R C),
    # with s2_case / C + s2_rep / R + s2_resid / (R C) the variance of the mean over simulations.
    R, C, sc, sr, se = 4, 12, 0.07, 0.03, 0.05
    rng = np.random.default_rng(0)
    sims = rng.normal(0, sc, (20000, 1, C)) + rng.normal(0, sr, (20000, R, 1)) + rng.normal(0, se, (20000, R, C))
    true_var = sc ** 2 / C + sr ** 2 / R + se ** 2 / (R * C)
    assert sims.mean(axis=(1, 2)).var() == pytest.approx(true_var, rel=0.03)
    assert np.mean(stats.crossed_mean(sims).se ** 2) == pytest.approx(true_var + se ** 2 / (R * C), rel=0.03)
    # one repeat: the spread over cases only
    one = stats.crossed_mean(x[:1])
    assert one.se == pytest.approx(np.std(x[0], ddof=1) / np.sqrt(3)) and one.df == 2


def test_crossed_anova_reduces_to_the_squared_t_for_two_methods_and_detects_a_difference():
    rng = np.random.default_rng(2)
    grid = rng.normal(0.6, 0.1, (3, 7, 2))
    a, t = stats.crossed_anova(grid), stats.crossed_mean(grid[..., 0] - grid[..., 1])
    assert a.F == pytest.approx((t.mean / t.se) ** 2) and a.df2 == pytest.approx(t.df)
    assert a.pvalue == pytest.approx(t.p_value())
    # a shift shared by every block of one method is found; a shift shared by every method changes nothing
    grid4 = rng.normal(0.6, 0.05, (4, 9, 4))
    shifted = grid4 + np.array([0.3, 0, 0, 0])
    assert stats.crossed_anova(shifted).pvalue < 1e-3
    assert stats.crossed_anova(grid4 + 0.2).F == pytest.approx(stats.crossed_anova(grid4).F)
    with pytest.raises(ValueError, match="at least 2 repeats"):
        stats.crossed_anova(grid4[:1])


def test_t_p_values_and_intervals():
    est = stats.CrossedMean(np.array([0.1, 0.0, 0.2]), np.array([0.05, 0.0, 0.0]), np.array([4.0, 4.0, 4.0]))
    p = est.p_value()
    assert p[0] == pytest.approx(2 * sps.t.sf(2.0, 4)) and p[1] == 1.0 and p[2] == 0.0
    assert est.p_value(0.05, "greater")[0] == pytest.approx(sps.t.sf(1.0, 4))
    lo, hi = est.ci(0.05)
    assert hi[0] - 0.1 == pytest.approx(sps.t.ppf(0.975, 4) * 0.05) and lo[0] < 0.1 < hi[0]
    with pytest.raises(ValueError, match="alternative"):
        est.p_value(alternative="less")


def test_pairwise_and_rank_biserial_on_fixed_sample():
    a = np.array([0.81, 0.72, 0.60, 0.93, 0.85, 0.70])
    b = np.array([0.80, 0.70, 0.63, 0.89, 0.80, 0.76])  # differences 1, 2, -3 | 4, 5, -6 (x 0.01)
    p = table({"a": a, "b": b}, repeats=2)
    res = stats.pairwise(p, [("a", "b")])
    est = stats.crossed_mean((a - b).reshape(2, 3))
    assert res.mean_diff[0] == pytest.approx(np.mean(a - b)) and res.p[0] == pytest.approx(est.p_value())
    assert res.diff_lo[0] == pytest.approx(est.ci()[0]) and res.p_holm[0] == res.p[0]
    # per-case mean differences 2.5, 3.5, -4.5: ranks 1, 2, 3 -> (1 + 2 - 3) / 6
    assert res.rank_biserial[0] == pytest.approx(0.0)
    assert stats.rank_biserial(np.array([0.01, 0.02, -0.03])) == pytest.approx((1 + 2 - 3) / 6)
    assert stats.rank_biserial(np.array([0.03, 0.02, -0.01])) == pytest.approx((3 + 2 - 1) / 6)


def test_holm_matches_statsmodels_and_is_vectorised():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(1)
    p = rng.uniform(0, 0.2, (8, 6))
    gc.freeze()  # statsmodels' Holm calls gc.collect(), slow with torch loaded; frozen objects make it cheap
    try:
        expected = np.stack([multipletests(row, method="holm")[1] for row in p])
        res_p = [0.01, 0.04, 0.03]
        reference = multipletests(res_p, method="holm")[1]
    finally:
        gc.unfreeze()
    np.testing.assert_allclose(stats.holm(p, axis=1), expected)
    np.testing.assert_allclose(stats.holm(p.T, axis=0), expected.T)
    assert stats.holm(np.array([])).size == 0
    base = rng.uniform(0.5, 0.8, 12)
    t = table({"m0": base, "m1": base - 0.05 + rng.normal(0, 0.02, 12), "m2": base + rng.normal(0, 0.02, 12)})
    res = stats.vs_reference(t, "m0")
    assert list(res.b) == ["m1", "m2"]
    np.testing.assert_allclose(stats.holm(np.array(res_p)), reference)
    np.testing.assert_allclose(res.p_holm, stats.holm(res.p.to_numpy()))
    assert len(stats.all_pairs(t)) == 3


def test_summary_is_deterministic_with_t_interval_for_the_mean():
    p = stats.paired_table(synthetic_results(), "phantom", 1)
    s1, s2 = stats.summary(p, **FAST), stats.summary(p, **FAST)
    pd.testing.assert_frame_equal(s1, s2)
    assert ((s1["mean_lo"] <= s1["mean"]) & (s1["mean"] <= s1["mean_hi"])).all()
    assert ((s1["median_lo"] <= s1["median"]) & (s1["median"] <= s1["median_hi"])).all()
    assert list(s1.method) == ["dgst", "full", "lora"]
    lo, hi = stats.crossed_mean(p.grid(["dgst"])[..., 0]).ci()
    assert (s1.mean_lo[0], s1.mean_hi[0]) == pytest.approx((lo, hi))
    assert not stats.summary(p, n_boot=300, seed=1).equals(s1)  # the median CI is a bootstrap
    # a bounded score's interval stays in [0, 1] (two repeats far apart: t with ~1 df runs beyond)
    wide = stats.summary(table({"m": np.array([0.05, 0.1, 0.08, 0.9, 0.95, 0.92])}, repeats=2))
    assert wide.mean_lo[0] == 0.0 and wide.mean_hi[0] == 1.0


def test_crossed_bootstrap_reuses_one_case_multiset_in_every_drawn_repeat():
    # value = 10 * repeat + case: a resample's values tell which repeat and case each came from
    grid = (10 * np.arange(3)[:, None] + np.arange(4)[None, :]).astype(float)[..., None]
    drawn = stats.crossed_bootstrap(grid, lambda v, axis: v, n_boot=50, seed=3)   # (50, R*C, 1)
    for sample in drawn[..., 0]:
        blocks = sample.reshape(3, 4)
        cases = blocks % 10
        assert (cases == cases[0]).all()                    # the same case multiset in every drawn repeat
        assert (blocks // 10 == (blocks // 10)[:, :1]).all()  # each row is one drawn repeat
    np.testing.assert_array_equal(drawn, stats.crossed_bootstrap(grid, lambda v, axis: v, n_boot=50, seed=3))


def test_friedman_nemenyi_one_method_clearly_best():
    p = stats.paired_table(synthetic_results({"dgst": 0.9, "full": 0.6, "lora": 0.58, "bitfit": 0.55},
                                             cases=12), "phantom", 3)
    f = stats.friedman_nemenyi(p)
    assert f.mean_ranks.index[0] == "dgst" and f.mean_ranks["dgst"] == 1.0
    x = p.case_means().to_numpy()  # the unit: test cases, averaged over repeats
    direct = sps.friedmanchisquare(*x.T)
    assert f.statistic == pytest.approx(direct.statistic) and f.pvalue == pytest.approx(direct.pvalue)
    assert f.pvalue < 1e-4
    k, n = 4, 12
    cd = sps.studentized_range.ppf(0.95, k, np.inf) / np.sqrt(2) * np.sqrt(k * (k + 1) / (6 * n))
    assert f.cd == pytest.approx(cd, rel=1e-4)
    assert f.n == 12
    assert "at least 3 methods" in stats.friedman_nemenyi(table({"a": x[:, 0], "b": x[:, 1]}, repeats=1)).note


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
def test_claim_check_against_every_baseline(gap, supported):
    # dgst-static (an ablation) and scratch (a control) are not competitors, however close they are
    df = synthetic_results({"dgst": 0.6 + gap, "full": 0.6, "lora": 0.5, "dgst-static": 0.6 + gap,
                            "scratch": 0.6 + gap}, repeats=5, cases=8, noise=0.02)
    paired = stats.paired_table(df, "phantom", 3)
    claim = stats.claim_check(paired)
    assert claim["competitors"] == "full, lora" and claim["strongest"] == "full"
    g = paired.grid(["dgst", "full", "lora"])
    _, p_each = stats.claim_tests(np.stack([g[..., 0] - g[..., 1], g[..., 0] - g[..., 2]]))
    assert claim["p_value"] == pytest.approx(p_each.max())  # intersection-union: every baseline must lose
    [claim] = stats.claim_family([claim], {"phantom": False})
    assert claim["supported"] is supported
    assert claim["verdict"].startswith("SUPPORTED" if supported else "NOT SUPPORTED")
    assert "full, lora" in claim["verdict"]
    assert claim["diff_lo"] <= claim["mean_diff"] <= claim["diff_hi"]
    assert claim["mean_diff"] == pytest.approx(gap, abs=0.03)


def test_claim_family_is_holm_corrected_and_phantom_verdict_says_synthetic():
    base = {"reference": "dgst", "competitors": "full", "strongest": "full", "mean_diff": 0.2, "diff_lo": 0.15,
            "diff_hi": 0.25, "margin": 0.082}
    claims = [{**base, "dataset": "phantom", "shots": 1, "p_value": 0.02},
              {**base, "dataset": "lnq2023", "shots": 1, "p_value": 0.03}]
    out = stats.claim_family(claims, {"phantom": True, "lnq2023": False})
    assert [c["p_holm"] for c in out] == pytest.approx([0.04, 0.04])
    assert out[0]["verdict"].startswith("phantom is synthetic") and "cannot support or refute" in out[0]["verdict"]
    assert out[1]["verdict"].startswith("SUPPORTED")
    three = stats.claim_family(claims + [{**base, "dataset": "lnq2023", "shots": 3, "p_value": 0.03}], {})
    assert [c["supported"] for c in three] == [False, False, False]  # 0.06, 0.06, 0.06 after Holm


def test_claim_needs_a_baseline():
    df = synthetic_results({"dgst": 0.8, "dgst-random": 0.7, "scratch": 0.3, "zero-shot": 0.2})
    assert stats.claim_check(stats.paired_table(df, "phantom", 1)) is None


def test_roles():
    from bench.methods.roles import competitors, role

    assert [role(m) for m in ("dgst", "dgst-random", "dgst-released", "scratch", "zero-shot", "oracle",
                              "lora", "my-new-method")] == ["proposed", "ablation", "ablation", "control",
                                                            "reference", "reference", "baseline", "baseline"]
    assert competitors(["full", "dgst", "dgst-static", "scratch", "oracle", "bitfit"]) == ["bitfit", "full"]
    assert role("scratch-light") == "control" and competitors(["scratch-light", "full"]) == ["full"]


def test_reference_rows_are_summarised_but_never_tested():
    df = synthetic_results({"dgst": 0.8, "full": 0.7, "oracle": 0.95, "zero-shot": 0.2}, repeats=3, cases=6)
    a = stats.analyse(df, "phantom", 1, n_boot=200)
    assert set(a.summary.method) == {"dgst", "full", "oracle", "zero-shot"}
    assert list(a.vs_reference.b) == ["full"] and len(a.all_pairs) == 1
    assert list(a.rank_stability.index) == ["dgst", "full"] and a.claim["competitors"] == "full"


def test_analyse_without_reference():
    df = synthetic_results({"full": 0.7, "lora": 0.6, "bitfit": 0.5})
    a = stats.analyse(df, "phantom", 1, n_boot=200)
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
