"""Leaderboard columns and report section of the auxiliary evaluations (``bench.evaluation.extra``).

Forgetting and node-free false positives are measured once per run (not per test case), so their
uncertainty is across support repeats: mean over the runs that were evaluated, with a t interval over
repeats (n - 1 df; none with one run). A method with no evaluated run shows ``—`` (not evaluated),
never 0. False positives per test scan come from the test cases' one-to-one lesion matching
(``lesion_fp`` of ``bench.metrics``), averaged over the same blocks as Dice.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pandas as pd
from scipy import stats as sps

from bench.evaluation.extra import RUN_COLUMNS

NOT_EVALUATED = "—"
LEADERBOARD_COLUMNS = ["forgetting", "forgetting_lo", "forgetting_hi", "forgetting_runs", "fp_test",
                       "fp_nodefree", "fp_nodefree_ml", "nodefree_runs"]
CONFIDENCE = 0.95


def mean_ci(values) -> tuple:
    """(mean, lo, hi, n) of the non-NaN values; t interval over them, NaN bounds for n < 2."""
    v = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce").dropna(), float)
    if len(v) == 0:
        return np.nan, np.nan, np.nan, 0
    m = float(v.mean())
    if len(v) < 2:
        return m, np.nan, np.nan, 1
    half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half, len(v)


def _runs_with_extra(runs: pd.DataFrame) -> pd.DataFrame:
    missing = {c: np.nan for c in RUN_COLUMNS if c not in runs.columns}   # tables that predate them
    return runs.assign(**missing)


def leaderboard_columns(runs: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Per method (index): ``LEADERBOARD_COLUMNS`` from one row per run (``runs``) and the case rows of
    the paired blocks (``rows``)."""
    runs = _runs_with_extra(runs)
    out = {}
    for method, r in runs.groupby("method"):
        f = mean_ci(r["forgetting"])
        nf = r["nodefree_fp"].dropna()
        out[method] = {"forgetting": f[0], "forgetting_lo": f[1], "forgetting_hi": f[2], "forgetting_runs": f[3],
                       "fp_nodefree": nf.mean() if len(nf) else np.nan,
                       "fp_nodefree_ml": r["nodefree_fp_ml"].dropna().mean() if len(nf) else np.nan,
                       "nodefree_runs": len(nf)}
    table = pd.DataFrame.from_dict(out, orient="index", columns=[c for c in LEADERBOARD_COLUMNS if c != "fp_test"])
    table["fp_test"] = _fp_per_scan(rows).groupby(rows["method"]).mean()
    return table[LEADERBOARD_COLUMNS]


def _fp_per_scan(rows: pd.DataFrame) -> pd.Series:
    """``lesion_fp`` as floats, NaN where unknown (metrics version 1 has no one-to-one counts)."""
    fp = rows["lesion_fp"] if "lesion_fp" in rows.columns else pd.Series(np.nan, index=rows.index)
    return pd.to_numeric(fp, errors="coerce").astype(float)


def _num(v, digits: int) -> str:
    return NOT_EVALUATED if pd.isna(v) else f"{v:.{digits}f}"


def fmt_forgetting(mean, lo, hi) -> str:
    if pd.isna(mean):
        return NOT_EVALUATED
    return f"{mean:+.3f}" + ("" if pd.isna(lo) else f" [{lo:+.3f}, {hi:+.3f}]")


def markdown_columns(t: pd.DataFrame) -> dict:
    """The leaderboard's markdown columns for these rows (``LEADERBOARD_COLUMNS``)."""
    return {"forgetting [95% CI]": [fmt_forgetting(*r) for r in t[["forgetting", "forgetting_lo",
                                                                   "forgetting_hi"]].to_numpy()],
            "FP/test scan": t.fp_test.map(lambda v: _num(v, 2)),
            "FP/node-free scan": t.fp_nodefree.map(lambda v: _num(v, 2)),
            "FP ml/node-free scan": t.fp_nodefree_ml.map(lambda v: _num(v, 2))}


MARKDOWN_NOTE = (
    "Forgetting: the foundation's mean Dice on its own source domain (the retention set) minus the "
    "fine-tuned model's, in Dice (positive: source skill lost; `bench evaluate`), mean over the evaluated "
    "repeats with a t interval across them. FP/test scan: unmatched predicted components per test case "
    "(one-to-one matching). FP/node-free scan and FP ml: predicted components and their volume on scans with "
    f"no node (the node-free set), mean over evaluated runs. `{NOT_EVALUATED}`: no run of the row was evaluated "
    "on that set.")


# --- report ------------------------------------------------------------------------------------------------

def per_run(sub: pd.DataFrame) -> pd.DataFrame:
    """One row per run (method, shots, repeat): target Dice (mean over its test cases), the extra columns."""
    sub = _runs_with_extra(sub)
    keys = ["method", "shots", "repeat"]
    dice = sub.groupby(keys)["dice"].mean().rename("target_dice")
    fp = _fp_per_scan(sub).groupby([sub[k] for k in keys]).mean().rename("fp_test")
    extra = sub.drop_duplicates(keys).set_index(keys)[list(RUN_COLUMNS)]
    return pd.concat([dice, fp, extra], axis=1).reset_index()


def method_shots_table(sub: pd.DataFrame) -> pd.DataFrame:
    """Per (method, shots): target Dice, forgetting and FP with t intervals across repeats."""
    out = []
    for (m, s), r in per_run(sub).groupby(["method", "shots"]):
        d, f = mean_ci(r.target_dice), mean_ci(r.forgetting)
        nf = mean_ci(r.nodefree_fp)
        out.append({"method": m, "shots": int(s), "runs": len(r), "dice": d[0], "dice_lo": d[1], "dice_hi": d[2],
                    "forgetting": f[0], "forgetting_lo": f[1], "forgetting_hi": f[2], "forgetting_runs": f[3],
                    "fp_test": float(r.fp_test.mean()), "fp_nodefree": nf[0], "fp_nodefree_lo": nf[1],
                    "fp_nodefree_hi": nf[2], "fp_nodefree_ml": mean_ci(r.nodefree_fp_ml)[0], "nodefree_runs": nf[3]})
    return pd.DataFrame(out)


def report_lines(sub: pd.DataFrame, fig_dir: Path, tables_dir: Path, ds: str) -> List[str]:
    """The report's forgetting / false-positive part of one dataset; nothing when no run was evaluated
    (a report of older results stays as it was)."""
    from bench.figures import palette, save_figure
    import matplotlib.pyplot as plt
    from bench.formatting import markdown_table

    t = method_shots_table(sub)
    if t.empty or (t.forgetting_runs.sum() == 0 and t.nodefree_runs.sum() == 0):
        return []
    t.to_csv(tables_dir / f"{ds}_forgetting_fp.csv", index=False, float_format="%.6g", lineterminator="\n")
    lines = [f"### {ds}: forgetting and false positives", "",
             "Run-level means over support repeats with 95 % t intervals across them. " + MARKDOWN_NOTE, ""]
    f = t[t.forgetting_runs > 0]
    if len(f):
        colours = palette(sorted(t.method.unique()))
        markers = dict(zip(sorted(t.shots.unique()), "osD^vP*X"))
        fig, ax = plt.subplots(figsize=(7.5, 5.0))
        for r in f.itertuples():
            xerr = None if pd.isna(r.forgetting_lo) else [[r.forgetting - r.forgetting_lo], [r.forgetting_hi - r.forgetting]]
            yerr = None if pd.isna(r.dice_lo) else [[r.dice - r.dice_lo], [r.dice_hi - r.dice]]
            ax.errorbar(r.forgetting, r.dice, xerr=xerr, yerr=yerr, marker=markers[r.shots], color=colours[r.method],
                        capsize=3, linestyle="none", label=f"{r.method}, {r.shots}-shot")
        ax.axvline(0.0, color="0.6", linewidth=0.8)
        ax.set(xlabel="forgetting (source Dice: foundation - fine-tuned)", ylabel="target Dice",
               title=f"{ds}: target Dice versus forgetting (95% t CIs over repeats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
        path = save_figure(fig, fig_dir / f"{ds}_dice_vs_forgetting.png", tight=True)
        lines += [f"![Target Dice versus forgetting, {ds}](figures/{path.name})", ""]
    lines += [markdown_table(pd.DataFrame({
        "method": t.method, "shots": t.shots,
        "target Dice [95% CI]": [f"{d:.3f}" + ("" if pd.isna(lo) else f" [{lo:.3f}, {hi:.3f}]")
                                 for d, lo, hi in t[["dice", "dice_lo", "dice_hi"]].to_numpy()],
        "forgetting [95% CI]": [fmt_forgetting(*r) for r in t[["forgetting", "forgetting_lo", "forgetting_hi"]].to_numpy()],
        "FP/test scan": t.fp_test.map(lambda v: _num(v, 2)),
        "FP/node-free scan": t.fp_nodefree.map(lambda v: _num(v, 2)),
        "FP ml/node-free scan": t.fp_nodefree_ml.map(lambda v: _num(v, 2)),
        "runs (forgetting evaluated)": [f"{n} ({k})" for n, k in t[["runs", "forgetting_runs"]].to_numpy()]})), ""]
    return lines
