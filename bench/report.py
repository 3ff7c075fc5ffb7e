"""Statistics report: ``report.md`` with tables and figures per dataset and shots.

For every dataset and shots it runs ``bench.stats.analyse`` on Dice and writes
the tables (Markdown in the report, CSV under ``tables/``) and figures (PNG
under ``figures/``): Dice per method (box + points), Dice versus shots with
crossed t CIs (reference rows dashed), the Nemenyi critical-difference diagram
and a heatmap of Holm-corrected pairwise crossed t p-values. Runs evaluated by
``bench evaluate`` add target Dice versus forgetting and a false-positive
table per dataset (``bench.evaluation.summary``). The paper's claim
is Holm-corrected across every (dataset x shots) check of the report. Each
dataset's section opens with what produced its results (``provenance``). Same
input, same files: seeds are fixed, no timestamps, and PNGs carry no software
metadata.

A multi-label task (nodes and organs, ``label`` in the results table) is reported on the per-case mean
Dice over labels (the figures and every test above), then label by label: each label's mean Dice with its
crossed t CI, and the per-label comparisons as one Holm family of their own (``bench.stats.per_label``).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Dict, List, Optional

from bench.figures import palette, save_figure  # first: selects the Agg backend
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench.captions import is_synthetic, provenance  # noqa: E402
from bench.formatting import fmt, fmt_ci, fmt_p, markdown_table, p_text  # noqa: E402
from bench.evaluation.summary import report_lines as extra_report_lines  # noqa: E402
from bench.methods.roles import role  # noqa: E402

from bench.augment import augmented_pairs  # noqa: E402
from bench.stats import (ALPHA, CLAIM_MARGIN, N_BOOT, REFERENCE, Analysis, analyse, claim_family,  # noqa: E402
                         labels_of, paired_table, pairwise, per_label, summary)

CSV_FLOAT = "%.6g"


@contextlib.contextmanager
def _seeded_global_rng(seed: int):
    # seaborn's stripplot jitter draws from numpy's global RNG; seed it, then restore it.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


# --- the report ------------------------------------------------------------------------------------

def write_report(df: pd.DataFrame, out_dir, dataset: Optional[str] = None, reference: str = REFERENCE,
                 tracking: Optional[str] = None, n_boot: int = N_BOOT, seed: int = 0) -> Path:
    """Write ``out_dir/report.md`` (+ ``tables/``, ``figures/``); log to MLflow if ``tracking`` is a URI."""
    out_dir = Path(out_dir)
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    if df.empty:
        raise ValueError("no results to report")
    datasets = sorted(df["dataset"].unique())
    if dataset is not None:
        if dataset not in datasets:
            raise ValueError(f"no results for dataset {dataset!r}; have {', '.join(datasets)}")
        datasets = [dataset]

    intro = _METHODS_TEXT.format(reference=reference, n_boot=n_boot, seed=seed, alpha=ALPHA,
                                 margin=100 * CLAIM_MARGIN)
    lines = ["# lnbench statistics report", "", intro, ""]
    analyses = {ds: {int(s): analyse(df[df["dataset"] == ds], ds, int(s), reference=reference, n_boot=n_boot,
                                     seed=seed)
                     for s in sorted(df.loc[df["dataset"] == ds, "shots"].unique())} for ds in datasets}
    _finalise_claims(analyses)
    metrics: Dict[str, float] = {}
    for ds in datasets:
        sub = df[df["dataset"] == ds]
        lines += [f"## {ds}", "", *[f"- {line}" for line in provenance(df, ds)], ""]
        for fig_path, caption in _dataset_figures(_case_means(sub), analyses[ds], out_dir / "figures", ds, seed):
            lines += [f"![{caption}](figures/{fig_path.name})", ""]
        for shots, a in analyses[ds].items():
            lines += _section(a, out_dir, reference)
            lines += _label_section(sub, ds, shots, out_dir, reference, n_boot, seed)
            metrics.update(_key_numbers(a))
        lines += extra_report_lines(sub, out_dir / "figures", out_dir / "tables", ds)  # only if evaluated
    report = out_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n")
    if tracking:
        _log_to_mlflow(out_dir, metrics, tracking, run_name=f"report-{dataset or 'all'}")
    return report


def _finalise_claims(analyses: Dict[str, Dict[int, Analysis]]) -> None:
    """Holm across every (dataset x shots) claim check of the report; verdicts name synthetic data."""
    checks = [a for per_shots in analyses.values() for a in per_shots.values() if a.claim]
    final = claim_family([a.claim for a in checks], {ds: bool(is_synthetic(ds)) for ds in analyses})
    for a, claim in zip(checks, final):
        a.claim = claim


_METHODS_TEXT = """\
Generated by `bench report`. All comparisons are paired on a crossed design: every support repeat is
scored on the same test cases, so each method has a repeat x case grid (only blocks present for every
method of a table are used; the number dropped is stated). A verdict should hold for new test cases
and new support draws, so both are random: means and mean differences get a t interval and test whose
variance is the crossed random-effects one, (MS_case + MS_repeat) / (R C) from the two-way ANOVA, with
conservative Satterthwaite-type degrees of freedom (`bench/stats.py` says why; its false-positive
rate is measured by simulation in `tests/test_calibration.py`). Pairwise tests are Holm-corrected
within their family (versus `{reference}`, or all pairs); significance level {alpha}. Effect sizes:
mean difference (a - b) with its CI, and the matched-pairs rank-biserial correlation of the per-case
mean differences. Medians and rank stability use a crossed bootstrap ({n_boot} resamples, seed {seed}:
repeats drawn with replacement, one case multiset reused by every drawn repeat). Whether the methods
differ at all: a crossed quasi-F test on the same footing. Mean ranks and the Nemenyi critical-difference
diagram rank per-case means over repeats (n = test cases): they describe the ranking given the support
sets drawn and are not a test for new support draws (a Friedman test on them rejects 7-39 % of crossed
null data in `tests/test_calibration.py`, so no Friedman p-value is reported); verdicts on differences
come from the crossed t tests.
Paper claim checked: `{reference}` beats every existing method (role `baseline`: not its own ablations,
not scratch, not reference rows) by more than {margin:.1f} Dice points in mean: a one-sided crossed t
test of difference > margin per baseline, all of which must reject (intersection-union), Holm-corrected
across the report's (dataset x shots) checks."""


def _section(a: Analysis, out_dir: Path, reference: str) -> List[str]:
    p, tag = a.paired, f"{a.paired.dataset}_{a.paired.shots}shot"
    lines = [f"### {p.dataset}, {p.shots}-shot", "",
             f"{p.repeats} repeats x {p.cases} test cases ({len(p.values)} blocks); {p.dropped} incomplete blocks "
             f"dropped; methods: {', '.join(p.methods)}." + (f" Note: {p.note}." if p.note else ""), ""]

    s = a.summary
    lines += ["**Dice per method**", "", markdown_table(pd.DataFrame({
        "method": s.method, "repeats x cases": [f"{r} x {c}" for r, c in s[["repeats", "cases"]].to_numpy()],
        "mean [95% CI]": _cis(s, "mean", "mean_lo", "mean_hi"),
        "median [95% CI]": _cis(s, "median", "median_lo", "median_hi")})), ""]
    _csv(s, out_dir, tag, "summary")

    tables = [(f"**Versus `{reference}`** (difference = {reference} - method)", a.vs_reference, "vs_reference"),
              ("**All pairs** (difference = a - b)", a.all_pairs, "all_pairs")]
    augmented = augmented_pairs(p.methods)
    if augmented:  # each augmented row against its plain method, on the same blocks (Holm within these)
        tables.append(("**Augmentation** (difference = a - b: the method with `--augment` minus without)",
                       pairwise(p, augmented), "augmentation"))
    for title, table, name in tables:
        if table is None:
            lines += [f"{title}: `{reference}` has no results here.", ""]
            continue
        _csv(table, out_dir, tag, name)
        lines += [title, "", markdown_table(pd.DataFrame({
            "a": table.a, "b": table.b, "mean diff [95% CI]": _cis(table, "mean_diff", "diff_lo", "diff_hi"),
            "df": table.df.map(lambda v: fmt(v, 1)),
            "rank-biserial": table.rank_biserial.map(lambda v: fmt(v, 2)),
            "crossed t p (Holm)": [f"{fmt_p(p)} ({fmt_p(h)})" for p, h in table[["p", "p_holm"]].to_numpy()]})),
            ""]
    if len(a.all_pairs):
        heat = _pvalue_heatmap(a, out_dir / "figures" / f"{tag}_pvalues.png")
        lines += [f"![Holm-corrected crossed t p-values, {tag}](figures/{heat.name})", ""]

    o = a.omnibus
    if o is not None:
        lines += ["**All methods equal?** (crossed quasi-F, test cases and support draws random)", "",
                  f"F = {float(o.F):.2f} on {o.df1} and {float(o.df2):.1f} df, {p_text(float(o.pvalue))}.", ""]
    f = a.friedman
    lines += ["**Mean ranks and Nemenyi CD** (per-case means over repeats; descriptive, given these support sets)",
              ""]
    if f.note:
        lines += [f"Not computed: {f.note}.", ""]
    else:
        ranks = f.mean_ranks.rename("mean_rank").reset_index()
        _csv(ranks, out_dir, tag, "mean_ranks")
        cd = _cd_diagram(f, out_dir / "figures" / f"{tag}_cd.png")
        lines += [f"{f.k} methods ranked on {f.n} test cases; Nemenyi CD = {f.cd:.3f} (mean ranks further apart "
                  f"differ beyond the critical difference for these support sets; not a verdict for new ones).", "",
                  markdown_table(pd.DataFrame({"method": ranks.method, "mean rank": ranks.mean_rank.map(fmt)})),
                  "", f"![Critical difference diagram, {tag}](figures/{cd.name})", ""]

    rs = a.rank_stability
    _csv(rs.reset_index(), out_dir, tag, "rank_stability")
    shares = {f"rank {r}": rs[r].map(lambda v: f"{100 * v:.0f}%") for r in rs.columns}
    lines += ["**Rank stability** (share of crossed-bootstrap resamples with each rank, by mean Dice)", "",
              markdown_table(pd.DataFrame({"method": rs.index, **shares})), ""]
    if a.claim:
        _csv(pd.DataFrame([a.claim]), out_dir, tag, "claim")
        lines += ["**Paper claim**", "", a.claim["verdict"], ""]
    return lines


def _case_means(sub: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, shots, repeat, case): Dice averaged over the case's labels."""
    if len(labels_of(sub)) <= 1:
        return sub
    return sub.groupby(["method", "shots", "repeat", "case_id"], as_index=False)["dice"].mean()


def _label_section(sub: pd.DataFrame, ds: str, shots: int, out_dir: Path, reference: str, n_boot: int,
                   seed: int) -> List[str]:
    """Per-label Dice and comparisons of a multi-label task; nothing for a single label."""
    labels = labels_of(sub[sub["shots"] == shots])
    if len(labels) <= 1:
        return []
    tag = f"{ds}_{shots}shot"
    means = pd.concat([summary(paired_table(sub, ds, shots, label=name), n_boot=n_boot, seed=seed).assign(label=name)
                       for name in labels], ignore_index=True)
    _csv(means, out_dir, tag, "per_label_summary")
    wide = means.assign(ci=_cis(means, "mean", "mean_lo", "mean_hi")).pivot(index="method", columns="label",
                                                                             values="ci")
    lines = [f"**Dice per label** ({', '.join(labels)}; the tables above use the per-case mean over them)", "",
             markdown_table(wide[labels].reset_index()), ""]
    tests = per_label(sub, ds, shots, reference=reference)
    _csv(tests, out_dir, tag, "per_label_tests")
    lines += ["**Per-label comparisons** (difference = a - b; crossed t tests on each label's values, Holm over "
              f"the {len(tests)} label x comparison tests, a family apart from the mean's)", "",
              markdown_table(pd.DataFrame({
                  "label": tests.label, "a": tests.a, "b": tests.b,
                  "mean diff [95% CI]": _cis(tests, "mean_diff", "diff_lo", "diff_hi"),
                  "crossed t p (Holm)": [f"{fmt_p(p)} ({fmt_p(h)})" for p, h in tests[["p", "p_holm"]].to_numpy()]})),
              ""]
    return lines


def _cis(t: pd.DataFrame, est: str, lo: str, hi: str) -> List[str]:
    return [fmt_ci(*r) for r in t[[est, lo, hi]].to_numpy()]


def _key_numbers(a: Analysis) -> Dict[str, float]:
    tag = f"{a.paired.dataset}.{a.paired.shots}shot"
    out = {f"{tag}.{r.method}.dice_mean": float(r.mean) for r in a.summary.itertuples()}
    if a.omnibus is not None:
        out[f"{tag}.omnibus_p"] = float(a.omnibus.pvalue)
    if a.claim:
        out[f"{tag}.claim_diff"] = a.claim["mean_diff"]
        out[f"{tag}.claim_p"] = a.claim["p_value"]
        out[f"{tag}.claim_p_holm"] = a.claim["p_holm"]
    return out


def _csv(table: pd.DataFrame, out_dir: Path, tag: str, name: str) -> Path:
    path = out_dir / "tables" / f"{tag}_{name}.csv"
    table.to_csv(path, index=False, float_format=CSV_FLOAT, lineterminator="\n")
    return path


# --- figures -----------------------------------------------------------------------------------------

def _dataset_figures(sub: pd.DataFrame, analyses: Dict[int, Analysis], fig_dir: Path, ds: str, seed: int):
    methods = sorted(sub["method"].unique())
    colours = palette(methods)

    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(methods) + 2), 4.5))
    with warnings.catch_warnings():  # seaborn 0.13 passes matplotlib 3.11's deprecated `vert`
        warnings.filterwarnings("ignore", message="vert: bool was deprecated")
        sns.boxplot(data=sub, x="method", y="dice", hue="shots", order=methods, showfliers=False, ax=ax,
                    palette="Blues")
    with _seeded_global_rng(seed):
        sns.stripplot(data=sub, x="method", y="dice", hue="shots", order=methods, dodge=True, size=2.5,
                      palette={s: "0.25" for s in sub["shots"].unique()}, alpha=0.6, legend=False, ax=ax)
    ax.set(xlabel="", ylabel="Dice", title=f"{ds}: Dice per test case (all repeats)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), title="shots")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    yield save_figure(fig, fig_dir / f"{ds}_dice_box.png"), f"Dice per method and shots, {ds}"

    fig, ax = plt.subplots(figsize=(9.0, 4.8))
    curves = pd.concat([a.summary.assign(shots=s) for s, a in analyses.items()], ignore_index=True)
    contenders = [m for m in methods if role(m) != "reference"]
    for m in methods:
        c = curves[curves.method == m].sort_values("shots")
        if role(m) == "reference":  # a bound on the task, not a contender: a dashed line, no error bars
            ax.plot(c.shots, c["mean"], linestyle="--", color=colours[m], label=f"{m} (reference)")
            continue
        # each method a little to the side of the shot count, so that overlapping intervals stay readable
        dodge = 0.25 * (contenders.index(m) / max(len(contenders) - 1, 1) - 0.5)
        ax.errorbar(c.shots + dodge, c["mean"], yerr=[c["mean"] - c.mean_lo, c.mean_hi - c["mean"]],
                    marker="o", capsize=2, label=m, color=colours[m])
    ax.set(xlabel="labelled support cases (shots)", ylabel="mean Dice (95% crossed t CI)",
           xticks=sorted(analyses), title=f"{ds}: Dice versus shots")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    yield save_figure(fig, fig_dir / f"{ds}_dice_vs_shots.png"), f"Dice versus shots, {ds}"


def _cd_diagram(f, path: Path) -> Path:
    """autorank's CD diagram; it writes method names outside its axes, so the canvas grows to them."""
    from autorank import plot_stats
    ax = plot_stats(f.rank_result, allow_insignificant=True, width=8)
    return save_figure(ax.figure, path, tight=True)


def _pvalue_heatmap(a: Analysis, path: Path) -> Path:
    methods = sorted(set(a.all_pairs.a) | set(a.all_pairs.b))
    mat = pd.DataFrame(np.nan, index=methods, columns=methods)
    for r in a.all_pairs.itertuples():
        mat.loc[r.a, r.b] = mat.loc[r.b, r.a] = r.p_holm
    size = max(4.0, 0.6 * len(methods) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    # Colour on a log scale (p-values that matter are small); annotate with the p-values themselves.
    sns.heatmap(np.log10(mat.clip(lower=1e-4)), vmin=-4, vmax=0, cmap="rocket", square=True,
                annot=mat.map(fmt_p) if len(methods) <= 12 else False, fmt="",
                cbar_kws={"label": "log10 Holm-corrected crossed t p"}, ax=ax)
    ax.set_title(f"{a.paired.dataset}, {a.paired.shots}-shot: pairwise p-values")
    fig.tight_layout()
    return save_figure(fig, path)


# --- MLflow --------------------------------------------------------------------------------------------

def _log_to_mlflow(out_dir: Path, metrics: Dict[str, float], tracking: str, run_name: str) -> None:
    from bench.tracking import log_artifacts, log_metrics, start_run
    with start_run(run_name, {"kind": "report"}, tracking):
        log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        log_artifacts(str(out_dir))
