"""Paired statistics: how a p-value, a CI and a rank are computed.

Every comparison is paired. ``paired_table`` turns the long results table
(``bench.results``) of one dataset and shots into a wide table with one row per
block (repeat, test case) and one column per method, keeping only the blocks
present for every compared method (and saying how many were dropped). All
other functions take that ``Paired`` table; ``analyse`` runs them all.

- Confidence intervals: two-level percentile bootstrap. Each resample draws
  the support repeats with replacement, then the test cases with replacement
  within each drawn repeat, so both sources of variation (which support set,
  which test case) are in the interval. Seeded; the same seed gives the same
  resamples in every function, so CIs of means and of differences agree.
- Pairwise tests: Wilcoxon signed-rank (``scipy.stats.wilcoxon``, zero
  differences dropped, two-sided) and a paired sign-flip permutation test of the
  mean difference (``scipy.stats.permutation_test``, ``permutation_type=
  'samples'``), each Holm-corrected (``statsmodels`` ``multipletests``) within
  its family: "vs reference" (k-1 tests) or "all pairs" (k(k-1)/2 tests).
  Effect sizes: mean paired difference with its bootstrap CI, and the
  matched-pairs rank-biserial correlation (R+ - R-) / (R+ + R-).
- Friedman test over blocks and Nemenyi critical difference with average ranks
  (rank 1 = best), through ``autorank`` (forced non-parametric), which also
  draws the CD diagram.
- Rank stability: the share of bootstrap resamples in which each method takes
  each rank by mean.
- ``claim_check``: the paper's claim that DGST beats the best other method by
  more than 8.2 Dice points, as a one-sided paired test of diff > margin.

Caveat stated in the report: blocks share support repeats, so they are not
fully independent; the bootstrap CIs account for that, the rank tests do not.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import io
import itertools
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from bench.metrics import HIGHER_IS_BETTER

REFERENCE = "dgst"
CLAIM_MARGIN = 0.082  # "more than 8.2 Dice points"
N_BOOT = 2000
N_PERMUTATIONS = 9999
ALPHA = 0.05


@dataclass
class Paired:
    """Wide paired table: index (repeat, case_id), one column per method (sorted)."""
    values: pd.DataFrame
    dropped: int
    dataset: str
    shots: int
    metric: str

    @property
    def methods(self) -> List[str]:
        return list(self.values.columns)

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER


def check_equal_budgets(sub: pd.DataFrame, dataset: str, shots: int) -> None:
    """Refuse to pair results of different foundation checkpoints or protocol versions, methods trained
    for different numbers of iterations or batch sizes, or tuned against untuned ones: that compares
    set-ups, not methods. Values that are not recorded (snapshots that predate these columns) are not
    checked."""
    from bench.results import UNKNOWN, params_kind

    def require_one(values: pd.Series, what: str, option: Optional[str]) -> None:
        """Every method must have the same single value (missing values are not checked)."""
        per_method = values.dropna().groupby(sub["method"]).agg(lambda v: sorted(set(v)))
        if len({tuple(v) for v in per_method}) > 1 or any(len(v) > 1 for v in per_method):
            listing = "; ".join(f"{m}: {', '.join(map(str, v))}" for m, v in per_method.items())
            raise ValueError(f"{dataset} {shots}-shot: results differ in {what} ({listing}); a comparison needs "
                             f"one set-up and equal budgets. "
                             + (f"Keep one with `{option}` (bench leaderboard / bench report), or re-run "
                                f"the cells alike." if option else "Re-run the cells alike."))

    def known(column: str) -> pd.Series:  # a string column, "unknown" as missing
        return sub[column].where(sub[column] != UNKNOWN)
    if "foundation_sha256" in sub.columns:
        require_one(known("foundation_sha256").str[:12], "foundation checkpoint (sha256)",
                    "--foundation NAME|SHA256-PREFIX")
    if "protocol_version" in sub.columns:
        require_one(known("protocol_version"), "protocol version", "--protocol VERSION")
    if "iterations" in sub.columns:
        require_one(sub["iterations"].astype("Int64"), "training iterations", "--iterations N")
    if "batch_size" in sub.columns:
        require_one(sub["batch_size"].astype("Int64"), "batch size", None)
    if "params_source" in sub.columns:
        kinds = sub["params_source"].map(params_kind)
        require_one(kinds.where(kinds != "unknown"), "hyper-parameters (tuned vs default)", "--params default|tuned")


def paired_table(df: pd.DataFrame, dataset: str, shots: int, metric: str = "dice",
                 methods: Optional[Sequence[str]] = None) -> Paired:
    sub = df[(df["dataset"] == dataset) & (df["shots"] == shots)]
    if methods is not None:
        missing = sorted(set(methods) - set(sub["method"]))
        if missing:
            raise ValueError(f"no {dataset} {shots}-shot results for method(s) {', '.join(missing)}")
        sub = sub[sub["method"].isin(methods)]
    if sub.empty:
        raise ValueError(f"no results for dataset {dataset!r} with {shots} shots")
    check_equal_budgets(sub, dataset, shots)
    wide = sub.pivot(index=["repeat", "case_id"], columns="method", values=metric)
    wide = wide.reindex(columns=sorted(wide.columns)).sort_index()
    wide.columns.name = None
    complete = wide.dropna()
    dropped = len(wide) - len(complete)
    if dropped:
        warnings.warn(f"{dataset} {shots}-shot {metric}: dropped {dropped} of {len(wide)} (repeat, case) "
                      f"blocks that are not present for all of {', '.join(wide.columns)}", stacklevel=2)
    if complete.empty:
        raise ValueError(f"{dataset} {shots}-shot: no (repeat, case) block is present for all methods")
    return Paired(complete, dropped, dataset, int(shots), metric)


# --- bootstrap -------------------------------------------------------------------------------------

def bootstrap_samples(index: pd.MultiIndex, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Row positions of two-level resamples: (n_boot, size) array, -1 = padding.

    Each resample draws the repeats (first index level) with replacement, then
    as many cases as the drawn repeat has, with replacement, within it. Rows
    must be grouped by repeat (``Paired.values`` is sorted). Resamples are
    padded with -1 to a common length when repeats differ in size.
    """
    repeats = index.get_level_values(0).to_numpy()
    _, starts, sizes = np.unique(repeats, return_index=True, return_counts=True)
    return _resample_positions(tuple(starts), tuple(sizes), n_boot, seed).copy()


@functools.lru_cache(maxsize=32)
def _resample_positions(starts: tuple, sizes: tuple, n_boot: int, seed: int) -> np.ndarray:
    starts, sizes = np.asarray(starts), np.asarray(sizes)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(sizes), (n_boot, len(sizes)))             # repeats drawn
    n = sizes[drawn][..., None]                                            # their sizes
    pos = starts[drawn][..., None] + (rng.random((*drawn.shape, sizes.max())) * n).astype(int)
    pos[np.arange(sizes.max()) >= n] = -1                                  # beyond a short repeat
    return pos.reshape(n_boot, -1)


def _boot(paired: Paired, func, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, methods) array of ``func`` (np.nanmean / np.nanmedian) over each resample."""
    pos = bootstrap_samples(paired.values.index, n_boot, seed)
    out = []
    for col in paired.values.to_numpy().T:  # one method at a time keeps memory at n_boot x size
        v = col[pos]
        v[pos < 0] = np.nan
        out.append(func(v, axis=1))
    return np.stack(out, axis=1)


def _ci(boot: np.ndarray, alpha: float) -> Tuple[np.ndarray, np.ndarray]:
    return tuple(np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0))


def summary(paired: Paired, n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA) -> pd.DataFrame:
    """Mean and median per method with two-level bootstrap CIs, best first."""
    x = paired.values
    out = pd.DataFrame({"method": paired.methods, "n": len(x)})
    for name, func in (("mean", np.nanmean), ("median", np.nanmedian)):
        lo, hi = _ci(_boot(paired, func, n_boot, seed), alpha)
        out[name], out[f"{name}_lo"], out[f"{name}_hi"] = func(x.to_numpy(), axis=0), lo, hi
    return out.sort_values(["mean", "method"], ascending=[not paired.higher_is_better, True],
                           ignore_index=True)


# --- pairwise tests -------------------------------------------------------------------------------

def wilcoxon_p(d: np.ndarray, alternative: str = "two-sided") -> float:
    """Wilcoxon signed-rank p of paired differences; 1.0 when every difference is zero."""
    if not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d, alternative=alternative).pvalue)


def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (zero differences dropped, as in the Wilcoxon test)."""
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    r = stats.rankdata(np.abs(d))
    return float((r[d > 0].sum() - r[d < 0].sum()) / r.sum())


def permutation_p(a: np.ndarray, b: np.ndarray, n_resamples: int = N_PERMUTATIONS, seed: int = 0) -> float:
    """Paired permutation test (random sign flips) of the mean difference, two-sided."""
    res = stats.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis),
                                 permutation_type="samples", vectorized=True,
                                 n_resamples=n_resamples, rng=seed)
    return float(res.pvalue)


def pairwise(paired: Paired, pairs: Sequence[Tuple[str, str]], n_boot: int = N_BOOT, seed: int = 0,
             alpha: float = ALPHA, n_resamples: int = N_PERMUTATIONS) -> pd.DataFrame:
    """Tests of ``a`` vs ``b`` for each pair (difference = a - b), Holm-corrected across ``pairs``."""
    x = paired.values
    boot = pd.DataFrame(_boot(paired, np.nanmean, n_boot, seed), columns=paired.methods)
    rows = []
    for a, b in pairs:
        d = (x[a] - x[b]).to_numpy()
        lo, hi = _ci((boot[a] - boot[b]).to_numpy(), alpha)
        rows.append({"a": a, "b": b, "n": len(d), "mean_diff": d.mean(), "diff_lo": lo, "diff_hi": hi,
                     "rank_biserial": rank_biserial(d), "p_wilcoxon": wilcoxon_p(d),
                     "p_permutation": permutation_p(x[a].to_numpy(), x[b].to_numpy(), n_resamples, seed)})
    out = pd.DataFrame(rows, columns=["a", "b", "n", "mean_diff", "diff_lo", "diff_hi", "rank_biserial",
                                      "p_wilcoxon", "p_permutation"])
    for col in ("p_wilcoxon", "p_permutation"):
        out[f"{col}_holm"] = holm(out[col].to_numpy())
    return out


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values (statsmodels ``multipletests(method='holm')``)."""
    if len(p) == 0:
        return np.array([])
    # statsmodels' Holm branch calls gc.collect(), ~0.5 s with torch loaded; objects frozen
    # out of the collector's view make that call nearly free (nothing else changes).
    gc.freeze()
    try:
        return multipletests(p, method="holm")[1]
    finally:
        gc.unfreeze()


def vs_reference(paired: Paired, reference: str = REFERENCE, **kw) -> pd.DataFrame:
    if reference not in paired.methods:
        raise ValueError(f"reference method {reference!r} has no results; have {', '.join(paired.methods)}")
    return pairwise(paired, [(reference, m) for m in paired.methods if m != reference], **kw)


def all_pairs(paired: Paired, **kw) -> pd.DataFrame:
    return pairwise(paired, list(itertools.combinations(paired.methods, 2)), **kw)


# --- ranks -------------------------------------------------------------------------------------------

@dataclass
class Friedman:
    k: int
    n: int
    statistic: float
    pvalue: float
    cd: float                       # Nemenyi critical difference of average ranks
    mean_ranks: pd.Series           # method -> average rank, 1 = best, best first
    rank_result: object = field(default=None, repr=False)  # autorank.RankResult, for plot_stats
    note: str = ""


def friedman_nemenyi(paired: Paired, alpha: float = ALPHA) -> Friedman:
    """Friedman test over blocks and Nemenyi CD (autorank, forced non-parametric)."""
    from autorank import autorank

    x = paired.values.reset_index(drop=True)
    k, n = x.shape[1], x.shape[0]
    if k < 3 or n < 5:
        return Friedman(k, n, float("nan"), float("nan"), float("nan"), pd.Series(dtype=float),
                        note=f"needs at least 3 methods and 5 blocks (have {k} and {n})")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        # autorank also runs normality/variance tests (unused when forced) that warn on ties; it prints.
        warnings.simplefilter("ignore")
        statistic = stats.friedmanchisquare(*x.T.to_numpy()).statistic
        res = autorank(x, alpha=alpha, force_mode="nonparametric",
                       order="descending" if paired.higher_is_better else "ascending")
    ranks = res.rankdf["meanrank"].astype(float)
    ranks = ranks.sort_values(kind="stable").rename_axis("method")
    return Friedman(k, n, float(statistic), float(res.pvalue), float(res.cd), ranks, res)


def rank_stability(paired: Paired, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Share of bootstrap resamples in which each method has rank r.

    Ranks by mean (1 = best; tied methods share the best of their ranks); rows sorted by expected rank.
    """
    boot = _boot(paired, np.nanmean, n_boot, seed)
    ranks = stats.rankdata(-boot if paired.higher_is_better else boot, method="min", axis=1).astype(int)
    k = len(paired.methods)
    table = pd.DataFrame({r: (ranks == r).mean(axis=0) for r in range(1, k + 1)}, index=paired.methods)
    table.index.name = "method"
    return table.loc[(table * np.arange(1, k + 1)).sum(axis=1).sort_values(kind="stable").index]


# --- the paper's claim --------------------------------------------------------------------------------

def claim_check(paired: Paired, reference: str = REFERENCE, margin: float = CLAIM_MARGIN,
                n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA) -> dict:
    """Does ``reference`` beat the best other method (by mean) by more than ``margin``?

    One-sided paired Wilcoxon test of (reference - best) - margin > 0 (a test of
    the differences' location, i.e. their pseudo-median); the verdict also gives
    the mean difference and its two-level bootstrap CI. The competitor is the
    strongest other method on the same data, which makes the test harder for the
    claim, not easier.
    """
    if reference not in paired.methods or len(paired.methods) < 2:
        raise ValueError(f"the claim needs {reference!r} and at least one other method; have "
                         f"{', '.join(paired.methods)}")
    x = paired.values
    means = x.drop(columns=reference).mean()
    best = str(means.idxmax() if paired.higher_is_better else means.idxmin())
    d = (x[reference] - x[best]).to_numpy()
    boot = pd.DataFrame(_boot(paired, np.nanmean, n_boot, seed), columns=paired.methods)
    lo, hi = _ci((boot[reference] - boot[best]).to_numpy(), alpha)
    p = wilcoxon_p(d - margin, alternative="greater")
    pts = f"{100 * d.mean():+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    if p < alpha:
        verdict = (f"SUPPORTED: {reference} beats {best} by {pts}, more than {100 * margin:.1f} "
                   f"(one-sided Wilcoxon p = {p:.3g})")
    elif lo > 0:
        verdict = (f"NOT SUPPORTED: {reference} beats {best} ({pts}) but not by more than "
                   f"{100 * margin:.1f} points (p = {p:.3g})")
    else:
        verdict = f"NOT SUPPORTED: {reference} is not shown to beat {best} ({pts}; p = {p:.3g})"
    return {"reference": reference, "best_other": best, "n": len(d), "mean_diff": float(d.mean()),
            "diff_lo": float(lo), "diff_hi": float(hi), "margin": margin, "p_value": p,
            "supported": bool(p < alpha), "verdict": verdict}


# --- everything at once -----------------------------------------------------------------------------

@dataclass
class Analysis:
    paired: Paired
    summary: pd.DataFrame
    vs_reference: Optional[pd.DataFrame]
    all_pairs: pd.DataFrame
    friedman: Friedman
    rank_stability: pd.DataFrame
    claim: Optional[dict]


def analyse(df: pd.DataFrame, dataset: str, shots: int, metric: str = "dice", reference: str = REFERENCE,
            n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA,
            n_resamples: int = N_PERMUTATIONS) -> Analysis:
    """All statistics of one dataset and shots; reference-based parts are None without the reference."""
    paired = paired_table(df, dataset, shots, metric)
    kw = dict(n_boot=n_boot, seed=seed, alpha=alpha)
    has_ref = reference in paired.methods and len(paired.methods) > 1
    return Analysis(
        paired=paired,
        summary=summary(paired, **kw),
        vs_reference=vs_reference(paired, reference, n_resamples=n_resamples, **kw) if has_ref else None,
        all_pairs=all_pairs(paired, n_resamples=n_resamples, **kw),
        friedman=friedman_nemenyi(paired, alpha),
        rank_stability=rank_stability(paired, n_boot, seed),
        claim=claim_check(paired, reference, **kw) if has_ref and metric == "dice" else None,
    )
