"""Leaderboards: ``leaderboards/<dataset>.{md,csv,png,html}``, generated, never edited by hand.

One leaderboard per (dataset, foundation): results of different foundations are never ranked together.
The default phantom foundation's table, and a dataset's only foundation's, is ``<dataset>``; every other
foundation's is ``<dataset>@<foundation>`` (``board_name``; a suite recipe such as ``phantom-stunet-v1``
always is), titled with the foundation.

Per dataset and shots, methods are ranked by mean Dice over the paired repeat x case grid, with a 95 %
crossed t CI (``bench.stats``: both test cases and support draws are random). Reference rows (role
``reference`` in ``bench.methods.roles``: zero-shot, oracle) are shown and marked but are never the
leader and never in a test family. The leader is the best of the other rows; ``*`` marks a method
significantly worse than the leader by the crossed t test, Holm-corrected over **all pairs** of the
non-reference methods: the leader is chosen from the data, so only a family that covers every pair
holds its error rate whichever method leads (``tests/test_calibration.py``). NSD, HD95 and lesion F1
are means over the same blocks; trainable, changed parameters, train seconds and peak memory are
means over runs. Forgetting and false positives on node-free scans (``bench evaluate``) are means over
the evaluated runs (``bench.evaluation.summary``), ``—`` where none was. The caption says what produced the
table (``bench.captions.provenance``). A multi-label task is ranked on the per-case mean Dice over its labels
(``bench.stats.mean_over_labels``); columns ``dice[<label>]`` add each label's mean Dice over the same blocks.

Byte-for-byte reproducible: fixed seed, sorted rows, fixed number formats, no timestamps, PNGs without
software metadata.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from bench.figures import palette, save_figure  # first: selects the Agg backend
import matplotlib.pyplot as plt  # noqa: E402
from bench.captions import provenance  # noqa: E402
from bench.evaluation import summary as extra_eval  # noqa: E402
from bench.formatting import fmt, fmt_ci, markdown_table, p_text  # noqa: E402
from bench.methods.roles import role  # noqa: E402
from bench.stats import (ALPHA, MIN_REPEATS_FOR_FAMILIES, N_BOOT, all_pairs, labels_of, paired_table,  # noqa: E402
                         summary)

LEADER, WORSE, REFERENCE_ROW = "leader", "*", "reference"
DICE_COLUMN = "Dice [95% CI]"
COLUMNS = ["shots", "rank", "method", "role", "marker", "dice_mean", "dice_lo", "dice_hi", "p_vs_leader_holm",
           "nsd", "nsd_tol_mm", "hd95", "lesion_f1", "lesion_f1_any", "trainable_params", "updated_per_step", "changed_params", "train_seconds",
           "peak_memory_mb", "empty_pred", "repeats", "cases", "protocol_version", "iterations", "params_source",
           *extra_eval.LEADERBOARD_COLUMNS]


def leader_tests(paired, ranked: List[str], alpha: float = ALPHA) -> pd.DataFrame:
    """Leader (best non-reference method of ``ranked``, best first) against every other non-reference
    method: rows b, p_holm (Holm over all pairs of non-reference methods), worse (p_holm < alpha). No
    rows with fewer than ``MIN_REPEATS_FOR_FAMILIES`` repeats: such a family does not hold its level."""
    contenders = [m for m in ranked if role(m) != "reference"]
    if len(contenders) < 2 or paired.repeats < MIN_REPEATS_FOR_FAMILIES:
        return pd.DataFrame({"b": [], "p_holm": [], "worse": []})
    leader = contenders[0]
    pairs = all_pairs(paired, methods=sorted(contenders), alpha=alpha)
    with_leader = pairs[(pairs.a == leader) | (pairs.b == leader)]
    other = np.where(with_leader.a == leader, with_leader.b, with_leader.a)
    return pd.DataFrame({"b": other, "p_holm": with_leader.p_holm.to_numpy(),
                         "worse": with_leader.p_holm.to_numpy() < alpha})


def leaderboard_table(df: pd.DataFrame, dataset: str, n_boot: int = N_BOOT, seed: int = 0,
                      alpha: float = ALPHA) -> pd.DataFrame:
    """One row per (shots, method) of ``dataset``, best first within each shots."""
    tables = []
    data = df[df["dataset"] == dataset]
    for shots in sorted(data["shots"].unique()):
        paired = paired_table(data, dataset, int(shots))
        s = summary(paired, n_boot=n_boot, seed=seed, alpha=alpha)
        t = pd.DataFrame({"shots": int(shots), "method": s.method, "role": s.method.map(role),
                          "dice_mean": s["mean"], "dice_lo": s.mean_lo, "dice_hi": s.mean_hi,
                          "repeats": paired.repeats, "cases": paired.cases})
        contender = t.role != "reference"
        t["rank"] = t.dice_mean.where(contender).rank(ascending=False, method="min").astype("Int64")
        t["p_vs_leader_holm"] = np.nan
        t["marker"] = np.where(contender, "", REFERENCE_ROW)
        tests = leader_tests(paired, list(s.method), alpha).set_index("b")
        if contender.any():
            t = t.set_index("method")
            t.loc[tests.index, "p_vs_leader_holm"] = tests.p_holm
            t.loc[tests.index[tests.worse], "marker"] = WORSE
            t.loc[t.index[contender.to_numpy()][0], "marker"] = LEADER
            t = t.reset_index()

        # Secondary metrics on the same blocks; costs once per run (they repeat on every case row).
        rows = data[data["shots"] == shots].set_index(["repeat", "case_id"])
        rows = rows[rows.index.isin(paired.values.index)].reset_index()
        for c in ("nsd_tol_mm", "lesion_f1_any"):   # results that predate these columns
            if c not in rows.columns:
                rows[c] = np.nan
        per_case = rows.groupby("method")[["nsd", "nsd_tol_mm", "hd95", "lesion_f1", "lesion_f1_any"]].mean()
        if "pred_empty" in rows.columns and rows.pred_empty.notna().any():
            per_case["empty_pred"] = rows.groupby("method")["pred_empty"].sum().astype(int)
        else:
            per_case["empty_pred"] = pd.NA
        runs = rows.drop_duplicates(["method", "repeat"])
        if "updated_per_step" not in runs.columns:   # results that predate the column
            runs = runs.assign(updated_per_step=np.nan)
        counts = ["trainable_params", "updated_per_step", "changed_params", "train_seconds", "peak_memory_mb"]
        per_run = runs[counts].astype(float).groupby(runs["method"]).mean()
        listed = runs.groupby("method")[["protocol_version", "params_source"]].agg(lambda v: ",".join(sorted(set(v))))
        budget = runs.groupby("method")["iterations"].agg(
            lambda v: ",".join(str(int(x)) for x in sorted(set(v.dropna()))) or "n/a")
        if len(labels_of(rows)) > 1:   # several labels: each one's mean Dice on the same blocks
            per_label = rows.pivot_table(index="method", columns="label", values="dice", aggfunc="mean")
            per_case = per_case.join(per_label.rename(columns=lambda c: f"dice[{c}]"))
        tables.append(t.join(per_case, on="method").join(per_run, on="method").join(listed, on="method")
                      .join(budget, on="method").join(extra_eval.leaderboard_columns(runs, rows), on="method"))
    if not tables:
        raise ValueError(f"no results for dataset {dataset!r}")
    out = pd.concat(tables, ignore_index=True)
    out = out[COLUMNS + sorted(c for c in out.columns if c.startswith("dice["))]
    for c in ("trainable_params", "updated_per_step", "changed_params"):
        out[c] = out[c].astype(float)
    out["empty_pred"] = out["empty_pred"].astype("Int64")
    return out


def board_name(dataset: str, foundation: str, foundations: Sequence[str]) -> str:
    """The file stem of ``foundation``'s leaderboard of ``dataset``, whose results hold ``foundations``:
    ``<dataset>`` for the default phantom foundation and for a dataset's only foundation (unless that is
    another suite recipe), else ``<dataset>@<foundation>``."""
    from bench.foundation import PHANTOM_RECIPE, RECIPES
    if foundation == PHANTOM_RECIPE["name"] or (len(foundations) == 1 and foundation not in RECIPES):
        return dataset
    return f"{dataset}@{foundation}"


def boards(df: pd.DataFrame) -> List[Tuple[str, str, str, pd.DataFrame]]:
    """(dataset, file stem, title, rows) per (dataset, foundation) in ``df``, sorted by dataset and stem."""
    out = []
    for dataset in sorted(df["dataset"].unique()):
        data = df[df["dataset"] == dataset]
        foundations = sorted(data["foundation"].astype(str).unique())
        for foundation in foundations:
            name = board_name(dataset, foundation, foundations)
            rows = data if len(foundations) == 1 else data[data["foundation"].astype(str) == foundation]
            out.append((dataset, name, dataset if name == dataset else f"{dataset}, foundation {foundation}", rows))
    return sorted(out, key=lambda b: (b[0], b[1]))


def write_leaderboards(df: pd.DataFrame, out_dir="leaderboards", n_boot: int = N_BOOT,
                       seed: int = 0, reports=None, stale_report: Optional[Callable[[str], None]] = None
                       ) -> List[Path]:
    """Write ``<name>.md``, ``.csv``, ``.png`` and ``.html`` for every (dataset, foundation) in ``df``
    (``boards``); returns the paths. The HTML page embeds the figures of ``<reports>/<name>-report/`` (a
    ``bench report`` directory; ``reports`` defaults to ``out_dir``) when there is one; one made from other
    results is refused before that leaderboard's files are written, or, given ``stale_report``, told to it
    and left out of the page (freshly collected results: their report comes next)."""
    from bench.leaderboard_html import Figure, check_report, report_figures, write_page

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset, name, title, rows in boards(df):
        table = leaderboard_table(rows, dataset, n_boot=n_boot, seed=seed)
        report = Path(reports if reports is not None else out_dir) / f"{name}-report"
        from_report = []
        if (report / "report.md").is_file():  # its figures go into the page: refused if made from other results
            try:
                check_report(report, table, dataset)
                from_report = report_figures(report, dataset)
            except ValueError as e:
                if stale_report is None:
                    raise
                stale_report(f"{e}; the page is written without its figures until then (then `bench leaderboard "
                             "--from-snapshot`)")
        csv = out_dir / f"{name}.csv"
        table.to_csv(csv, index=False, float_format="%.6g", na_rep="", lineterminator="\n")
        md = out_dir / f"{name}.md"
        caption = provenance(rows, dataset)
        md.write_text(_markdown(table, title, caption))
        png = _figure(table, title, out_dir / f"{name}.png")
        figures = [Figure(png, f"Mean Dice with its 95% CI per method and shots, {title}", None), *from_report]
        written += [md, csv, png, write_page(table, title, caption, figures, out_dir / f"{name}.html")]
    return written


def _count(v) -> str:
    return "n/a" if pd.isna(v) else f"{v:,.0f}"


HEADER = "Generated by `bench leaderboard` from `leaderboards/results.csv`; do not edit by hand."


AUGMENTED_TEXT = (", `augmented` (`<method>+<augmentation>`, e.g. `dgst+synth`: the method trained with "
                  "`--augment`, the same budget and support cases; paired with the plain rows on the same blocks). ")


def legend(table: pd.DataFrame) -> str:
    """What the columns and markers mean (Markdown inline code in backticks); the same on every page."""
    tolerances = sorted(set(table.nsd_tol_mm.dropna()))
    nsd_at = f"at {', '.join(f'{t:g}' for t in tolerances)} mm" if tolerances else "(tolerance not recorded)"
    return ("Dice: mean over the repeat x test case grid that every method has, with a 95 % CI from the crossed "
            "random-effects t procedure of `bench/stats.py` (test cases and support draws both random, so the "
            f"interval and the tests generalise to new cases and new support sets; clipped to [0, 1]). `{LEADER}`: highest mean Dice "
            f"among the non-reference methods; `{WORSE}`: significantly worse than the leader (crossed t test, "
            f"Holm-corrected over all pairs of non-reference methods, p < {ALPHA}); `{REFERENCE_ROW}`: a bound on "
            "the task (zero-shot, oracle), never the leader nor tested. Role: `proposed` (DGST), `ablation` "
            "(DGST's variants), `baseline` (the existing methods the claim is about), `control` (from scratch)"
            + (AUGMENTED_TEXT if (table.role == "augmented").any() else ". ") +
            f"NSD {nsd_at}, HD95 in mm and lesion F1 (one-to-one matching; `any`: the any-overlap rule) are "
            "means over the same blocks; "
            "`empty pred`: blocks whose prediction was empty (scored by the empty-mask rules). Trainable: "
            "parameters the method lets the optimizer update; updated per step: entries a step may change (DGST "
            "selects a few per kernel); changed: entries that differ from the foundation after training (what "
            "the method actually updated in total); these, training time and peak memory are means over runs. "
            + extra_eval.MARKDOWN_NOTE + _labels_legend(table))


def _labels_legend(table: pd.DataFrame) -> str:
    labels = [c[5:-1] for c in table.columns if c.startswith("dice[")]
    if not labels:
        return ""
    return (f" Several labels ({', '.join(labels)}): Dice is the per-case mean over them, one block per case "
            "(labels are never counted as cases); `Dice <label>` columns give each label's mean over the same "
            "blocks (per-label tests: `bench report`); `empty pred` counts (case, label) pairs.")


def shots_note(t: pd.DataFrame) -> Optional[str]:
    """Why one shots' table has no markers, if it has none by design."""
    if t.repeats.min() < MIN_REPEATS_FOR_FAMILIES:
        return (f"No `{WORSE}` markers: {t.repeats.min()} support repeats are too few for a family of tests "
                f"to hold its error rate (at least {MIN_REPEATS_FOR_FAMILIES}; `tests/test_calibration.py`).")
    return None


def shown_columns(t: pd.DataFrame) -> pd.DataFrame:
    """One shots' rows as the pages show them: formatted cells, one column per shown quantity (the
    Markdown table and the HTML page both render this frame, so a column added here appears in both)."""
    return pd.DataFrame({
        "rank": t["rank"].map(lambda r: "-" if pd.isna(r) else str(r)),
        "method": t.method,
        "role": t.role,
        DICE_COLUMN: [fmt_ci(*r) for r in t[["dice_mean", "dice_lo", "dice_hi"]].values],
        **{f"Dice {c[5:-1]}": t[c].map(fmt) for c in t.columns if c.startswith("dice[")},
        "vs leader": [f"{m} ({p_text(p)})" if m == WORSE else m
                      for m, p in t[["marker", "p_vs_leader_holm"]].values],
        "NSD": t.nsd.map(fmt),
        "HD95 (mm)": t.hd95.map(lambda v: fmt(v, 2)),
        "lesion F1": t.lesion_f1.map(fmt),
        "lesion F1 any": t.lesion_f1_any.map(fmt),
        "empty pred": t.empty_pred.map(lambda v: "n/a" if pd.isna(v) else str(v)),
        "trainable params": t.trainable_params.map(_count),
        "updated per step": t.updated_per_step.map(_count),
        "changed params": t.changed_params.map(_count),
        "train s": t.train_seconds.map(lambda v: fmt(v, 1)),
        "peak MB": t.peak_memory_mb.map(lambda v: fmt(v, 0)),
        "repeats x cases": [f"{r} x {c}" for r, c in t[["repeats", "cases"]].values],
        "protocol": t.protocol_version,
        "iterations": t.iterations,
        "hyper-parameters": t.params_source,
        **extra_eval.markdown_columns(t)})


def _markdown(table: pd.DataFrame, title: str, caption: List[str]) -> str:
    lines = [f"# Leaderboard: {title}", "", HEADER, "", *[f"- {line}" for line in caption], "",
             legend(table), ""]
    for shots, t in table.groupby("shots", sort=True):
        lines += [f"## {shots}-shot", ""]
        note = shots_note(t)
        if note:
            lines += [note, ""]
        lines += [markdown_table(shown_columns(t)), ""]
    return "\n".join(lines)


def _figure(table: pd.DataFrame, title: str, path: Path) -> Path:
    """Mean Dice with CI per method, one panel per shots, best on top; reference rows hollow and grey."""
    shots = sorted(table["shots"].unique())
    colours = palette(list(table.method.unique()))
    n_methods = table.groupby("shots").size().max()
    fig, axes = plt.subplots(1, len(shots), figsize=(3.6 * len(shots) + 1.2, 0.35 * n_methods + 1.4),
                             squeeze=False, sharex=True)
    for ax, s in zip(axes[0], shots):
        t = table[table.shots == s].iloc[::-1]  # best at the top
        y = np.arange(len(t))
        for yi, r in zip(y, t.itertuples()):
            ref = r.marker == REFERENCE_ROW
            ax.errorbar(r.dice_mean, yi, xerr=[[r.dice_mean - r.dice_lo], [r.dice_hi - r.dice_mean]],
                        fmt="o", capsize=3, color="0.5" if ref else colours[r.method], mfc="none" if ref else None,
                        linestyle="none")
        ax.set_yticks(y, [f"{r.method} ({r.marker})" if r.marker in (LEADER, REFERENCE_ROW)
                          else f"{r.method} {r.marker}".strip() for r in t.itertuples()])
        ax.set(title=f"{s}-shot", xlabel="mean Dice (95% CI)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{title} leaderboard ({WORSE} = significantly worse than the leader)")
    fig.tight_layout()
    return save_figure(fig, path)
