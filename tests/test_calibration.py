"""Calibration of the verdicts on crossed null data (every repeat scores the same test cases).

Simulated Dice per (repeat, case, method): a case effect shared by the methods (SD 0.15), a case x method
interaction that is the same in every repeat (SD 0.05), a repeat x method effect (support draw, SD 0.02)
and noise (SD 0.05). With no true difference, a test at 5 % must reject at most 5 % + Monte-Carlo error;
the block-level Wilcoxon the suite used before must fail that bound, or this test could not fail.
"""
import numpy as np
import pytest
from scipy import stats as sps

from bench import stats

N_SIM = 2000
ALPHA = 0.05
# One-sided bound: nominal + 2.3 binomial SEs at 2000 simulations (about 1 point).
BOUND = ALPHA + 2.3 * np.sqrt(ALPHA * (1 - ALPHA) / N_SIM)
SETTINGS = [(2, 10), (2, 40), (5, 10), (5, 40)]


def simulate(R, C, k=2, diff=0.0, n=N_SIM, seed=0):
    """(n, R, C, k) Dice-like values; method 0 is ``diff`` better than the others."""
    rng = np.random.default_rng(seed)
    y = (0.6 + rng.normal(0, 0.15, (n, 1, C, 1)) + rng.normal(0, 0.05, (n, 1, C, k))
         + rng.normal(0, 0.02, (n, R, 1, k)) + rng.normal(0, 0.05, (n, R, C, k)))
    y[..., 0] += diff
    return y


def rate(p):
    return float(np.mean(p < ALPHA))


@pytest.mark.parametrize("R, C", SETTINGS)
def test_false_positive_rates_hold_on_crossed_null_data(R, C):
    y = simulate(R, C, seed=R * 100 + C)
    d = y[..., 0] - y[..., 1]
    new = rate(stats.crossed_mean(d).p_value())                   # the leaderboard's / report's pairwise test
    old = rate(sps.wilcoxon(d.reshape(N_SIM, -1), axis=1, method="approx").pvalue)  # R x C blocks as independent
    at_margin = simulate(R, C, diff=stats.CLAIM_MARGIN, seed=R * 100 + C + 1)
    claim = rate(stats.claim_p((at_margin[..., 0] - at_margin[..., 1])[:, None]))
    print(f"\nR={R} C={C}: false positives at 5 %: crossed t {100 * new:.1f} %, claim check at diff = margin "
          f"{100 * claim:.1f} %, old block-level Wilcoxon {100 * old:.1f} %")
    assert new <= BOUND and claim <= BOUND
    assert old > 2 * ALPHA  # the old procedure fails calibration


@pytest.mark.parametrize("R, C", [(5, 10), (5, 40)])
def test_leaderboard_family_holds_its_error_rate(R, C):
    """Four methods, no differences: any marker (all pairs, Holm) is a false positive."""
    y = simulate(R, C, k=4, n=N_SIM, seed=7 * C + R)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    d = np.stack([y[..., i] - y[..., j] for i, j in pairs], axis=1)
    fwer = rate(stats.holm(stats.crossed_mean(d).p_value(), axis=-1).min(axis=1))
    print(f"\nR={R} C={C}: family-wise false-positive rate of the leaderboard's markers (4 methods) "
          f"{100 * fwer:.1f} %")
    assert fwer <= BOUND


def test_two_repeats_are_too_few_for_a_family_so_the_leaderboard_gives_no_markers():
    """With 2 repeats the repeat term has 1 df: single tests hold (above), a Holm family over 28 pairs does
    not, which is why the leaderboard needs ``MIN_REPEATS_FOR_FAMILIES`` repeats for its markers."""
    from bench.leaderboard import leaderboard_table
    from bench.results import synthetic_results

    fwer = {}
    for R in (2, stats.MIN_REPEATS_FOR_FAMILIES):
        y = simulate(R, 40, k=8, seed=17 + R)
        pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)]
        d = np.stack([y[..., i] - y[..., j] for i, j in pairs], axis=1)
        fwer[R] = rate(stats.holm(stats.crossed_mean(d).p_value(), axis=-1).min(axis=1))
    print(f"\nC=40, 8 methods: family-wise false-positive rate {100 * fwer[2]:.1f} % with 2 repeats, "
          f"{100 * fwer[3]:.1f} % with 3")
    assert fwer[2] > BOUND >= fwer[3]
    clear = synthetic_results({"dgst": 0.9, "lora": 0.3}, shots=(1,), repeats=2, cases=10, noise=0.01)
    assert set(leaderboard_table(clear, "phantom", n_boot=100).marker) == {"leader", ""}


@pytest.mark.parametrize("R, C", SETTINGS)
def test_omnibus_test_holds_its_error_rate(R, C):
    """The report's "all methods equal?" test (crossed quasi-F), four methods; the Friedman test on
    per-case means, which conditions on the support draws, is printed for comparison."""
    y = simulate(R, C, k=4, seed=13 * C + R)
    omnibus = rate(stats.crossed_anova(y).pvalue)
    ranks = sps.rankdata(y.mean(axis=1), axis=-1)                          # per-case means, ranked per case
    friedman = sps.chi2.sf(12 / (C * 4 * 5) * (ranks.sum(axis=1) ** 2).sum(-1) - 3 * C * 5, 3)
    print(f"\nR={R} C={C}: omnibus crossed quasi-F {100 * omnibus:.1f} %, Friedman on per-case means "
          f"{100 * rate(friedman):.1f} %")
    assert omnibus <= BOUND


@pytest.mark.parametrize("C", [10, 40])
def test_power_at_a_three_point_difference(C):
    R = 5
    null, planted = simulate(R, C, seed=11), simulate(R, C, diff=0.03, seed=12)
    power = rate(stats.crossed_mean(planted[..., 0] - planted[..., 1]).p_value())
    size = rate(stats.crossed_mean(null[..., 0] - null[..., 1]).p_value())
    print(f"\nR={R} C={C}: power at a 3-point difference {100 * power:.1f} % (size {100 * size:.1f} %)")
    assert power > size  # the test sees a planted difference more often than none
