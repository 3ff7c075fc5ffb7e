"""Paired statistics on the crossed design: how a p-value, a CI and a rank are computed.

The design. Every support repeat of a protocol is scored on the same test cases, so one dataset and
shots gives, per method, an R x C grid (repeat x case) that is *crossed*, not nested: a case that is
hard for a method is hard for it in every repeat, and a support set that suits a method suits it on
every case. A verdict is meant to hold for new test cases **and** new support draws, so both are random
factors. For a difference between two methods (or one method's values), the crossed two-way
random-effects model is d[r, c] = mu + u_c + v_r + e_rc, and the variance of the grid mean is

    Var(mean) = s2_case / C + s2_rep / R + s2_resid / (R C).

``crossed_mean`` estimates it from the two-way ANOVA mean squares as (MS_case + MS_rep) / (R C), whose
expectation is that variance plus s2_resid / (R C) (slightly conservative, never negative), and tests
with a t distribution whose degrees of freedom are 1 / (w_case^2 / (C-1) + w_rep / (R-1)), w the two
mean squares' shares. That is Satterthwaite's formula with the repeat term's share counted linearly
instead of squared: plain Satterthwaite is liberal when a 1-4 df repeat term carries much of the
variance (measured: 8.3 % at R = 2, C = 40), and this keeps df near R - 1 when support draws dominate
and near C - 1 when they do not. Vectorised over any leading axes.

Why this procedure. Tests over the R x C blocks as if independent (Wilcoxon, sign flips, Friedman)
reject a true null far more often than nominal (block-level Wilcoxon 16-41 % at 5 % in
``tests/test_calibration.py``); tests on per-case means over repeats (n = C) drop the repeat x method
component, which is anti-conservative when support draws matter (7-25 %); a crossed bootstrap with
2-5 repeats underestimates the repeat component. The procedure above holds 5 % in the calibration
test for R in {2, 5} and C in {10, 40} (case x method SD 0.05, repeat x method SD 0.02, noise 0.05);
with few repeats and a large support component it becomes liberal again (R = 2 and repeat x method
SD 0.05: 6-9 %), and a family of many tests needs at least 3 repeats (``MIN_REPEATS_FOR_FAMILIES``):
run all of a protocol's repeats.

What uses it.
- ``summary``: each method's mean with a crossed t CI (clipped to [0, 1] for scores bounded there); median with a crossed-bootstrap percentile CI
  (``crossed_bootstrap``: repeats drawn with replacement and one multiset of cases reused by every
  drawn repeat).
- ``pairwise``: mean difference a - b, its crossed t CI and two-sided p, Holm-corrected within the
  family (``vs_reference``: k-1 tests; ``all_pairs``: k(k-1)/2); effect size: matched-pairs
  rank-biserial correlation of the per-case mean differences.
- ``crossed_anova``: the omnibus test that all methods have equal means, a quasi-F on the same
  crossed footing (k = 2: the square of the crossed t).
- ``friedman_nemenyi``: Friedman test and Nemenyi critical difference (autorank, non-parametric) on
  per-case means over repeats (n = C test cases). Ranks of per-case means condition on the support
  sets drawn (the Friedman test rejects 7-39 % of crossed null data), so the report shows the mean
  ranks and the CD diagram as a description and no Friedman p-value; verdicts come from the crossed
  tests.
- Reference rows (zero-shot, oracle) are summarised but enter no test, rank or family (``analyse``).
- ``rank_stability``: share of crossed-bootstrap resamples in which each method has each rank by mean.
- ``claim_check``: the proposed method beats every baseline (``bench.methods.roles``) by more than the
  margin: a one-sided crossed t test of diff > margin per baseline, combined as an intersection-union
  test (p = the largest); ``claim_family`` Holm-corrects the claim over (dataset x shots) checks.

With a single repeat the support component cannot be estimated: intervals then condition on the one
support set (``Paired.note`` says so).

Several labels (nodes and organs of one case, ``label`` in the results table). The labels of a case share
its image, its support set and its method, so they are not independent blocks: every test above pairs on
the per-case mean over labels (``mean_over_labels``: one block per (repeat, case), as for a single label),
and a label's own comparison (``paired_table(..., label=...)``) keeps the same blocks. ``per_label``
compares methods label by label, Holm-corrected within its own family (labels x comparisons), apart from
the primary family on the mean. (case, label) rows are never counted as cases.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from scipy import stats

from bench.metrics import HIGHER_IS_BETTER

# Scores bounded to [0, 1]: a t interval of their mean is clipped there (coverage is unchanged, the true
# mean lies inside; with 2 repeats the interval can otherwise run far beyond a possible Dice).
UNIT_INTERVAL_METRICS = ("dice", "nsd", "nsd_voxel", "lesion_precision", "lesion_recall", "lesion_f1")
REFERENCE = "dgst"  # the proposed method (bench.methods.roles.PROPOSED)
CLAIM_MARGIN = 0.082  # "more than 8.2 Dice points"
N_BOOT = 2000
ALPHA = 0.05
# Families of tests (leaderboard markers, Holm over many pairs) need this many repeats: with 2, the repeat
# term's single df makes the t tails liberal and an all-pairs family of 8 methods rejects 16 % of null data
# (tests/test_calibration.py); from 3 repeats on it holds 5 %.
MIN_REPEATS_FOR_FAMILIES = 3


@dataclass
class Paired:
    """Wide paired table: index (repeat, case_id) covering a complete repeat x case grid, one column per
    method (sorted)."""
    values: pd.DataFrame
    dropped: int
    dataset: str
    shots: int
    metric: str
    label: Optional[str] = None     # one label's values; None: the mean over labels (or the only label)

    @property
    def methods(self) -> List[str]:
        return list(self.values.columns)

    @property
    def higher_is_better(self) -> bool:
        return self.metric in HIGHER_IS_BETTER

    @property
    def repeats(self) -> int:
        return self.values.index.get_level_values(0).nunique()

    @property
    def cases(self) -> int:
        return self.values.index.get_level_values(1).nunique()

    def grid(self, columns: Optional[Sequence[str]] = None) -> np.ndarray:
        """(R, C, k) array of the methods ``columns`` (default: all), repeats x cases."""
        cols = list(columns) if columns is not None else self.methods
        if len(self.values) != self.repeats * self.cases:
            raise ValueError(f"{self.dataset} {self.shots}-shot: the blocks are not a complete repeat x case grid "
                             f"({len(self.values)} blocks, {self.repeats} repeats, {self.cases} cases); build the "
                             "table with paired_table")
        return self.values[cols].to_numpy().reshape(self.repeats, self.cases, len(cols))

    def subset(self, methods: Sequence[str]) -> "Paired":
        return Paired(self.values[sorted(methods)], self.dropped, self.dataset, self.shots, self.metric, self.label)

    def case_means(self) -> pd.DataFrame:
        """Per-case means over repeats (C rows, one column per method)."""
        return self.values.groupby(level=1, sort=True).mean()

    @property
    def note(self) -> str:
        if self.repeats < 2:
            return "one support repeat: intervals and tests condition on that support set"
        if self.repeats < MIN_REPEATS_FOR_FAMILIES:
            return (f"{self.repeats} support repeats: single tests hold their level, but Holm families over many "
                    f"pairs do not (they need {MIN_REPEATS_FOR_FAMILIES}; see tests/test_calibration.py)")
        return ""


def check_equal_budgets(sub: pd.DataFrame, dataset: str, shots: int) -> None:
    """Refuse to pair results of different foundation checkpoints or protocol versions, methods trained
    for different numbers of iterations (reference rows aside) or batch sizes, or tuned against untuned
    ones: that compares set-ups, not methods. Values that are not recorded (snapshots that predate these
    columns) are not checked."""
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
        # Reference rows train on other cases (the oracle: the whole pool), so the dataset's budget gives
        # them their own iteration count (Dataset.budget); every compared method must share one.
        from bench.methods.roles import role
        compared = sub["method"].map(lambda m: role(m) != "reference")
        require_one(sub["iterations"].astype("Int64").where(compared), "training iterations", "--iterations N")
    if "batch_size" in sub.columns:
        require_one(sub["batch_size"].astype("Int64"), "batch size", None)
    if "params_source" in sub.columns:
        kinds = sub["params_source"].map(params_kind)
        require_one(kinds.where(kinds != "unknown"), "hyper-parameters (tuned vs default)", "--params default|tuned")


def labels_of(df: pd.DataFrame) -> List[str]:
    """The labels of a results table (sorted); one, ``SINGLE_LABEL``, for single-label results."""
    return sorted(df["label"].unique()) if "label" in df.columns else []


def mean_over_labels(sub: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (method, repeat, case_id): ``metric``'s mean over the case's labels; NaN where a label's
    row is missing (so the block is dropped as incomplete, not averaged over fewer labels). Every method must
    have been scored on the same label set."""
    if "label" not in sub.columns or sub["label"].nunique() <= 1:
        return sub
    sets = sub.groupby("method")["label"].agg(lambda v: tuple(sorted(set(v))))
    if sets.nunique() > 1:
        listing = "; ".join(f"{m}: {', '.join(v)}" for m, v in sets.items())
        raise ValueError(f"results differ in their label set ({listing}); a comparison needs every method scored "
                         "on the same labels (the same dataset preparation)")
    n_labels = len(sets.iloc[0])
    agg = sub.groupby(["method", "repeat", "case_id"])[metric].agg(["mean", "count"])
    agg[metric] = agg["mean"].where(agg["count"] == n_labels)
    return agg[[metric]].reset_index()


def paired_table(df: pd.DataFrame, dataset: str, shots: int, metric: str = "dice",
                 methods: Optional[Sequence[str]] = None, label: Optional[str] = None) -> Paired:
    """Blocks present for every method, reduced to a complete repeat x case grid (the crossed design).
    Several labels: a block is a case, valued by the mean over its labels, or by ``label``'s value alone."""
    sub = df[(df["dataset"] == dataset) & (df["shots"] == shots)]
    if label is not None:
        if label not in labels_of(sub):
            raise ValueError(f"no {dataset} {shots}-shot results for label {label!r}; labels: "
                             f"{', '.join(labels_of(sub)) or 'none'}")
        sub = sub[sub["label"] == label]
    if methods is not None:
        missing = sorted(set(methods) - set(sub["method"]))
        if missing:
            raise ValueError(f"no {dataset} {shots}-shot results for method(s) {', '.join(missing)}")
        sub = sub[sub["method"].isin(methods)]
    if sub.empty:
        raise ValueError(f"no results for dataset {dataset!r} with {shots} shots")
    check_equal_budgets(sub, dataset, shots)
    sub = mean_over_labels(sub, metric)
    wide = sub.pivot(index=["repeat", "case_id"], columns="method", values=metric)
    wide = wide.reindex(columns=sorted(wide.columns)).sort_index()
    wide.columns.name = None
    complete = wide.dropna()
    # A crossed grid: keep the cases that every remaining repeat has (normally all of them).
    n_rep = complete.index.get_level_values(0).nunique()
    per_case = complete.index.get_level_values(1).value_counts()
    complete = complete[complete.index.get_level_values(1).isin(per_case.index[per_case == n_rep])]
    dropped = len(wide) - len(complete)
    if dropped:
        warnings.warn(f"{dataset} {shots}-shot {metric}: dropped {dropped} of {len(wide)} (repeat, case) "
                      f"blocks that are not present for all of {', '.join(wide.columns)} in every repeat",
                      stacklevel=2)
    if complete.empty:
        raise ValueError(f"{dataset} {shots}-shot: no (repeat, case) block is present for all methods")
    return Paired(complete, dropped, dataset, int(shots), metric, label)


# --- the crossed random-effects mean ---------------------------------------------------------------

@dataclass
class CrossedMean:
    """Mean of R x C grids with its crossed-design standard error and Satterthwaite df (arrays over the
    leading axes)."""
    mean: np.ndarray
    se: np.ndarray
    df: np.ndarray

    def ci(self, alpha: float = ALPHA) -> Tuple[np.ndarray, np.ndarray]:
        half = stats.t.ppf(1 - alpha / 2, self.df) * self.se
        return self.mean - half, self.mean + half

    def p_value(self, null: float = 0.0, alternative: str = "two-sided") -> np.ndarray:
        """t test of mean = ``null``; ``greater``: H1 mean > null. A zero SE gives p 0 or 1."""
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (self.mean - null) / self.se
            sign_inf = np.sign(self.mean - null) * np.inf
        # zero SE: the sign decides (p 0 or 1); zero SE and mean == null: no evidence at all
        t = np.where(self.se > 0, t, np.where(self.mean == null, 0.0, sign_inf))
        if alternative == "greater":
            return stats.t.sf(t, self.df)
        if alternative == "two-sided":
            return np.minimum(1.0, 2 * stats.t.sf(np.abs(t), self.df))
        raise ValueError(f"alternative must be 'two-sided' or 'greater', not {alternative!r}")


def crossed_mean(x: np.ndarray) -> CrossedMean:
    """Crossed two-way random-effects inference on the mean of ``x`` (..., R, C): see the module
    docstring. R = 1 or C = 1 leave one factor, whose spread across the other is the only term."""
    x = np.asarray(x, dtype=float)
    R, C = x.shape[-2:]
    m = x.mean(axis=(-2, -1))
    if R < 2 or C < 2:
        flat = x.reshape(*x.shape[:-2], R * C)
        n = R * C
        var = flat.var(axis=-1, ddof=1) / n if n > 1 else np.full(m.shape, np.nan)
        return CrossedMean(m, np.sqrt(var), np.full(m.shape, float(n - 1)))
    rm, cm = x.mean(axis=-1), x.mean(axis=-2)
    ms_rep = C * ((rm - m[..., None]) ** 2).sum(-1) / (R - 1)
    ms_case = R * ((cm - m[..., None]) ** 2).sum(-1) / (C - 1)
    total = ms_case + ms_rep          # expectation: R C Var(mean) + s2_resid, never negative
    with np.errstate(divide="ignore", invalid="ignore"):
        w_case, w_rep = ms_case / total, ms_rep / total
        df = 1.0 / (w_case ** 2 / (C - 1) + w_rep / (R - 1))
    df = np.where(total > 0, df, float(min(R, C) - 1))
    return CrossedMean(m, np.sqrt(total / (R * C)), df)


@dataclass
class CrossedAnova:
    """Omnibus test that k methods have equal means on crossed grids (arrays over the leading axes)."""
    F: np.ndarray
    df1: int
    df2: np.ndarray
    pvalue: np.ndarray


def crossed_anova(grid: np.ndarray) -> CrossedAnova:
    """Quasi-F test of equal method means on (..., R, C, k) grids with random cases and repeats.

    Under the null E MS_method = s2_resid + R s2_method.case + C s2_method.repeat, so the denominator is
    MS_method.case + MS_method.repeat (conservative by s2_resid, as in ``crossed_mean``), with the same
    degrees-of-freedom rule. For k = 2 it is the square of the crossed t test of the difference."""
    x = np.asarray(grid, dtype=float)
    R, C, k = x.shape[-3:]
    if R < 2 or C < 2 or k < 2:
        raise ValueError(f"the crossed omnibus test needs at least 2 repeats, 2 cases and 2 methods "
                         f"(have {R}, {C}, {k})")
    grand = x.mean(axis=(-3, -2, -1))[..., None]
    m = x.mean(axis=(-3, -2))                                              # (..., k)
    ms_m = R * C * ((m - grand) ** 2).sum(-1) / (k - 1)
    mc, mr = x.mean(axis=-3), x.mean(axis=-2)                              # (..., C, k), (..., R, k)
    dev_c = mc - m[..., None, :] - mc.mean(-1, keepdims=True) + grand[..., None]
    dev_r = mr - m[..., None, :] - mr.mean(-1, keepdims=True) + grand[..., None]
    ms_mc = R * (dev_c ** 2).sum(axis=(-2, -1)) / ((k - 1) * (C - 1))
    ms_mr = C * (dev_r ** 2).sum(axis=(-2, -1)) / ((k - 1) * (R - 1))
    denom = ms_mc + ms_mr
    with np.errstate(divide="ignore", invalid="ignore"):
        F = np.where(denom > 0, ms_m / denom, np.where(ms_m > 0, np.inf, 0.0))
        w_c, w_r = ms_mc / denom, ms_mr / denom
        df2 = np.where(denom > 0, 1.0 / (w_c ** 2 / ((k - 1) * (C - 1)) + w_r / ((k - 1) * (R - 1))),
                       float((k - 1) * (min(R, C) - 1)))
    return CrossedAnova(F, k - 1, df2, stats.f.sf(F, k - 1, df2))


def crossed_bootstrap(grid: np.ndarray, func, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``func`` of (R, C, k) ``grid`` resampled crossed-wise: (n_boot, k).

    Each resample draws R repeats and C cases with replacement; every drawn repeat reuses the same
    case multiset, so a case's difficulty for a method enters once per resample, as in the data.
    ``func`` reduces axis 1 of an (n_boot, R*C, k) array (e.g. ``np.mean``, ``np.median``).
    """
    R, C, k = grid.shape
    rng = np.random.default_rng(seed)
    reps, cases = rng.integers(0, R, (n_boot, R)), rng.integers(0, C, (n_boot, C))
    drawn = grid[reps[:, :, None], cases[:, None, :]]          # (n_boot, R, C, k)
    return func(drawn.reshape(n_boot, R * C, k), axis=1)


def _ci(boot: np.ndarray, alpha: float) -> Tuple[np.ndarray, np.ndarray]:
    return tuple(np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0))


def summary(paired: Paired, n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA) -> pd.DataFrame:
    """Mean (crossed t CI) and median (crossed bootstrap CI) per method, best first."""
    grid = paired.grid()
    est = crossed_mean(np.moveaxis(grid, -1, 0))
    lo, hi = est.ci(alpha)
    if paired.metric in UNIT_INTERVAL_METRICS:
        lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)
    mlo, mhi = _ci(crossed_bootstrap(grid, np.median, n_boot, seed), alpha)
    out = pd.DataFrame({"method": paired.methods, "n": len(paired.values), "repeats": paired.repeats,
                        "cases": paired.cases, "mean": est.mean, "mean_lo": lo, "mean_hi": hi, "df": est.df,
                        "median": np.median(grid.reshape(-1, grid.shape[-1]), axis=0),
                        "median_lo": mlo, "median_hi": mhi})
    return out.sort_values(["mean", "method"], ascending=[not paired.higher_is_better, True],
                           ignore_index=True)


# --- pairwise tests -------------------------------------------------------------------------------

def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation (zero differences dropped, as in the Wilcoxon test)."""
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    r = stats.rankdata(np.abs(d))
    return float((r[d > 0].sum() - r[d < 0].sum()) / r.sum())


def holm(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Holm-adjusted p-values along ``axis`` (vectorised, so the calibration simulations can use it;
    checked against statsmodels in the tests)."""
    p = np.asarray(p, dtype=float)
    if p.size == 0:
        return p.copy()
    p = np.moveaxis(p, axis, -1)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1) * (m - np.arange(m))
    adjusted = np.minimum(1.0, np.maximum.accumulate(ranked, axis=-1))
    out = np.empty_like(adjusted)
    np.put_along_axis(out, order, adjusted, axis=-1)
    return np.moveaxis(out, -1, axis)


def pairwise(paired: Paired, pairs: Sequence[Tuple[str, str]], alpha: float = ALPHA) -> pd.DataFrame:
    """Crossed t tests of ``a`` vs ``b`` for each pair (difference = a - b), Holm-corrected across
    ``pairs``."""
    cols = ["a", "b", "n", "mean_diff", "diff_lo", "diff_hi", "df", "rank_biserial", "p", "p_holm"]
    if not pairs:
        return pd.DataFrame(columns=cols)
    grid = paired.grid()
    idx = {m: i for i, m in enumerate(paired.methods)}
    a_i, b_i = [idx[a] for a, _ in pairs], [idx[b] for _, b in pairs]
    est = crossed_mean(np.moveaxis(grid[..., a_i] - grid[..., b_i], -1, 0))
    lo, hi = est.ci(alpha)
    p = est.p_value()
    case_diff = paired.case_means()
    out = pd.DataFrame({"a": [a for a, _ in pairs], "b": [b for _, b in pairs], "n": len(paired.values),
                        "mean_diff": est.mean, "diff_lo": lo, "diff_hi": hi, "df": est.df,
                        "rank_biserial": [rank_biserial((case_diff[a] - case_diff[b]).to_numpy())
                                          for a, b in pairs],
                        "p": p, "p_holm": holm(p)})
    return out[cols]


def vs_reference(paired: Paired, reference: str = REFERENCE, **kw) -> pd.DataFrame:
    if reference not in paired.methods:
        raise ValueError(f"reference method {reference!r} has no results; have {', '.join(paired.methods)}")
    return pairwise(paired, [(reference, m) for m in paired.methods if m != reference], **kw)


def all_pairs(paired: Paired, methods: Optional[Sequence[str]] = None, **kw) -> pd.DataFrame:
    return pairwise(paired, list(itertools.combinations(methods or paired.methods, 2)), **kw)


def per_label(df: pd.DataFrame, dataset: str, shots: int, metric: str = "dice", reference: str = REFERENCE,
              alpha: float = ALPHA) -> pd.DataFrame:
    """Label-by-label comparisons of a multi-label task: per label, ``reference`` against every other
    non-reference method (all pairs without ``reference``), crossed t tests on that label's values in the
    same (repeat, case) blocks, Holm-corrected over the whole family (every label x comparison): a family
    of its own, apart from the primary comparison on the mean over labels. Rows: label, summary of a (mean
    and CI, ``a_mean``...) and the pairwise columns. Empty for a single-label table."""
    from bench.methods.roles import role

    sub = df[(df["dataset"] == dataset) & (df["shots"] == shots)]
    labels = labels_of(sub)
    if len(labels) < 2:
        return pd.DataFrame()
    tables = []
    for label in labels:
        paired = paired_table(sub, dataset, shots, metric, label=label)
        tested = paired.subset([m for m in paired.methods if role(m) != "reference"])
        if reference in tested.methods:
            pairs = [(reference, m) for m in tested.methods if m != reference]
        else:
            pairs = list(itertools.combinations(tested.methods, 2))
        tables.append(pairwise(tested, pairs, alpha=alpha).assign(label=label))
    out = pd.concat(tables, ignore_index=True)
    out["p_holm"] = holm(out["p"].to_numpy(dtype=float))
    return out[["label"] + [c for c in out.columns if c != "label"]]


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
    """Friedman test and Nemenyi CD (autorank, forced non-parametric) on per-case means over repeats."""
    from autorank import autorank

    x = paired.case_means().reset_index(drop=True)
    k, n = x.shape[1], x.shape[0]
    if k < 3 or n < 5:
        return Friedman(k, n, float("nan"), float("nan"), float("nan"), pd.Series(dtype=float),
                        note=f"needs at least 3 methods and 5 test cases (have {k} and {n})")
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
    """Share of crossed-bootstrap resamples in which each method has rank r.

    Ranks by mean (1 = best; tied methods share the best of their ranks); rows sorted by expected rank.
    """
    boot = crossed_bootstrap(paired.grid(), np.mean, n_boot, seed)
    ranks = stats.rankdata(-boot if paired.higher_is_better else boot, method="min", axis=1).astype(int)
    k = len(paired.methods)
    table = pd.DataFrame({r: (ranks == r).mean(axis=0) for r in range(1, k + 1)}, index=paired.methods)
    table.index.name = "method"
    return table.loc[(table * np.arange(1, k + 1)).sum(axis=1).sort_values(kind="stable").index]


# --- the paper's claim --------------------------------------------------------------------------------

def claim_tests(diffs: np.ndarray, margin: float = CLAIM_MARGIN) -> Tuple[CrossedMean, np.ndarray]:
    """One-sided crossed t tests of mean > ``margin`` for (..., k, R, C) difference grids: the estimates
    and the intersection-union p (the largest p over the k competitors)."""
    est = crossed_mean(diffs)
    return est, est.p_value(margin, alternative="greater")


def claim_p(diffs: np.ndarray, margin: float = CLAIM_MARGIN) -> np.ndarray:
    """Intersection-union p of "every competitor's mean difference exceeds ``margin``"."""
    return claim_tests(diffs, margin)[1].max(axis=-1)


def claim_check(paired: Paired, reference: str = REFERENCE, margin: float = CLAIM_MARGIN,
                alpha: float = ALPHA) -> Optional[dict]:
    """Does ``reference`` beat every baseline by more than ``margin`` in mean? None without baselines.

    The claim is about means against every existing method, so it holds only if each one-sided
    crossed t test of (reference - baseline) > margin rejects: an intersection-union test whose p is
    the largest (no correction across baselines is needed, none is favourable). ``p_holm`` and the
    verdict are finalised across (dataset x shots) checks by ``claim_family``.
    """
    from bench.methods.roles import competitors  # bench.methods loads every method: only when needed

    rivals = competitors(m for m in paired.methods if m != reference)
    if reference not in paired.methods or not rivals:
        return None
    grid = paired.grid()
    ref = grid[..., paired.methods.index(reference)]
    diffs = np.stack([ref - grid[..., paired.methods.index(m)] for m in rivals])
    est, p_each = claim_tests(diffs, margin)
    lo, hi = est.ci(alpha)
    worst = int(np.argmin(est.mean))  # the strongest baseline: the smallest mean difference
    p = float(p_each.max())
    return {"dataset": paired.dataset, "shots": paired.shots, "reference": reference,
            "competitors": ", ".join(rivals), "strongest": rivals[worst], "n": len(paired.values),
            "repeats": paired.repeats, "cases": paired.cases, "mean_diff": float(est.mean[worst]),
            "diff_lo": float(lo[worst]), "diff_hi": float(hi[worst]), "margin": margin,
            "p_value": p, "p_holm": p,
            "supported": bool(p < alpha), "verdict": ""}


def claim_family(claims: List[dict], synthetic: Dict[str, bool], alpha: float = ALPHA) -> List[dict]:
    """Holm across the (dataset x shots) claim checks, then each verdict in words. A synthetic dataset's
    verdict says it cannot support or refute a claim about real data."""
    adjusted = holm(np.array([c["p_value"] for c in claims]))
    out = []
    for c, p_holm in zip(claims, adjusted):
        c = {**c, "p_holm": float(p_holm), "supported": bool(p_holm < alpha)}
        pts = (f"{100 * c['mean_diff']:+.1f} points [{100 * c['diff_lo']:+.1f}, {100 * c['diff_hi']:+.1f}] "
               f"over {c['strongest']}, the strongest baseline")
        test = (f"one-sided crossed t test per baseline, largest p = {c['p_value']:.3g}, Holm over "
                f"{len(claims)} dataset x shots check(s): {c['p_holm']:.3g}")
        if c["supported"]:
            verdict = (f"SUPPORTED: {c['reference']} beats every baseline ({c['competitors']}) by more than "
                       f"{100 * c['margin']:.1f} Dice points: {pts} ({test})")
        elif c["diff_lo"] > 0:
            verdict = (f"NOT SUPPORTED: {c['reference']} beats {c['strongest']} ({pts}) but not shown to by more "
                       f"than {100 * c['margin']:.1f} points ({test}); baselines: {c['competitors']}")
        else:
            verdict = (f"NOT SUPPORTED: {c['reference']} is not shown to beat {c['strongest']} ({pts}; {test}); "
                       f"baselines: {c['competitors']}")
        if synthetic.get(c["dataset"], False):
            verdict = (f"{c['dataset']} is synthetic: this check exercises the procedure and cannot support or "
                       f"refute a claim about real data. {verdict}")
        out.append({**c, "verdict": verdict})
    return out


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
    omnibus: Optional[CrossedAnova] = None   # None: fewer than 2 repeats, cases or methods


def analyse(df: pd.DataFrame, dataset: str, shots: int, metric: str = "dice", reference: str = REFERENCE,
            n_boot: int = N_BOOT, seed: int = 0, alpha: float = ALPHA, synthetic: bool = False) -> Analysis:
    """All statistics of one dataset and shots; reference-based parts are None without the reference.
    Reference rows (zero-shot, oracle: ``bench.methods.roles``) get a summary but enter no test, rank or
    family. The claim (Dice only) is checked alone here; ``claim_family`` finalises it across checks."""
    from bench.methods.roles import role

    paired = paired_table(df, dataset, shots, metric)
    tested = paired.subset([m for m in paired.methods if role(m) != "reference"])
    has_ref = reference in tested.methods and len(tested.methods) > 1
    claim = claim_check(tested, reference, alpha=alpha) if has_ref and metric == "dice" else None
    return Analysis(
        paired=paired,
        summary=summary(paired, n_boot=n_boot, seed=seed, alpha=alpha),
        vs_reference=vs_reference(tested, reference, alpha=alpha) if has_ref else None,
        all_pairs=all_pairs(tested, alpha=alpha),
        friedman=friedman_nemenyi(tested, alpha),
        rank_stability=rank_stability(tested, n_boot, seed),
        claim=claim_family([claim], {dataset: synthetic}, alpha)[0] if claim else None,
        omnibus=crossed_anova(tested.grid()) if min(tested.repeats, tested.cases, len(tested.methods)) >= 2
        else None,
    )
