"""Collect per-run ``result.json`` files into one long table (one row per test case).

Sources are directories (searched recursively for ``result.json``), single
``.json`` result files, or ``.csv`` snapshots written by ``write_snapshot``.
Results evaluated on the tuning split (``"evaluated": "tune"``) are skipped:
only test-set results are compared. Each row carries its training budget
(``iterations``) and where its hyper-parameters came from (``params_source``:
``default`` or the Optuna study); ``load_results(..., iterations=N)`` keeps one
budget. A multi-label task (result schema 3) has one row per (test case, label), ``label`` naming it;
single-label results have ``label`` = ``SINGLE_LABEL``. Statistics pair on the per-case mean over labels
(``bench.stats``), never on (case, label) rows as if they were cases. Each row also carries its
provenance: foundation name and checkpoint sha256, protocol version, optimizer, lr, weight decay, batch and patch size,
seed, hyper-parameters, code version and git commit, package versions, device.
A cell is (dataset, method, shots, repeat) of one foundation checkpoint and one
protocol version (``RUN_KEY``); when several sources hold the same cell, the
newest file (by modification time) wins and a warning names the files involved.
Each row also carries its run's auxiliary evaluations (``extra_eval.json``, ``bench evaluate``):
source-domain Dice of the export and of its foundation, forgetting, and false positives per node-free
scan (components, ml); NaN (sets: ``none``) where a run was never evaluated, never 0.
Results of different foundations or protocol versions are never merged:
``select_budget(foundation=..., protocol_version=...)`` keeps one, and pairing
refuses to mix them (``bench.stats.check_equal_budgets``).

The snapshot CSV is the committed, deterministic form of that table: rows
sorted by cell and case, a fixed column order and fixed float formatting, so
that the same results always give the same bytes.
"""
from __future__ import annotations

import itertools
import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Iterable, List, Optional, Union

import numpy as np
import pandas as pd

from bench.evaluation.extra import NOT_EVALUATED, RUN_COLUMNS as EXTRA_COLUMNS, SET_COLUMNS, run_columns
from bench.metrics import INT_METRICS, METRICS, upgrade_v1

SCHEMA_VERSIONS = (1, 2, 3)   # 3: several labels (bench.runner.MULTI_LABEL_SCHEMA_VERSION)
CELL = ["dataset", "method", "shots", "repeat"]
RUN_KEY = CELL + ["foundation_sha256", "protocol_version"]   # what "the same cell" means for newest-wins
KEY = CELL + ["case_id", "label"]
SINGLE_LABEL = "foreground"   # the label of single-label results (they record none)
PROVENANCE_COLUMNS = ["foundation", "foundation_sha256", "optimizer", "lr", "weight_decay", "batch_size",
                      "patch_size", "seed", "hparams", "updated_per_step", "code_version", "git_commit",
                      "packages", "device_name"]
COLUMNS = KEY + ["run_id", "protocol_version", "iterations", "params_source", *METRICS,
                 "total_params", "trainable_params", "changed_params", "train_seconds", "peak_memory_mb",
                 "device", *PROVENANCE_COLUMNS, *SET_COLUMNS, *EXTRA_COLUMNS]
STRING_COLUMNS = ["dataset", "method", "case_id", "label", "run_id", "protocol_version", "params_source", "device",
                  "foundation", "foundation_sha256", "optimizer", "patch_size", "hparams", "code_version",
                  "git_commit", "packages", "device_name", *SET_COLUMNS]
INT_COLUMNS = ["shots", "repeat"]
# integers that may be unknown (metric counts: a version-1 result has no one-to-one lesion counts)
COUNT_COLUMNS = ["iterations", "total_params", "trainable_params", "changed_params", "batch_size", "seed", "updated_per_step",
                 *INT_METRICS]
UNKNOWN = "unknown"
# Columns that older snapshots lack, with the value they are read as.
LATER_COLUMNS = {"label": SINGLE_LABEL, "iterations": "nan", "total_params": "nan", "params_source": UNKNOWN,
                 **{c: UNKNOWN if c in STRING_COLUMNS else "nan" for c in PROVENANCE_COLUMNS},
                 # per-run extra evaluations (bench.evaluation; `bench evaluate`): missing = not evaluated
                 **{c: NOT_EVALUATED for c in SET_COLUMNS}, **{c: "nan" for c in EXTRA_COLUMNS}}
FLOAT_FORMAT = "%.6g"

Source = Union[str, Path]


def params_kind(source: str) -> str:
    """``default``, ``tuned`` (the name of the Optuna study that produced the parameters) or ``unknown``."""
    return source if source in ("default", "unknown") else "tuned"


def _check_params(params: Optional[str]) -> None:
    if params not in (None, "default", "tuned"):
        raise ValueError(f"params must be 'default' or 'tuned', not {params!r}")


def select_budget(df: pd.DataFrame, iterations: Optional[int] = None, params: Optional[str] = None,
                  foundation: Optional[str] = None, protocol_version: Optional[str] = None) -> pd.DataFrame:
    """Rows trained for ``iterations`` iterations, with ``params`` (``default`` / ``tuned``)
    hyper-parameters, from ``foundation`` (its name, or a prefix of its checkpoint sha256) and
    ``protocol_version``; ``None`` keeps every value."""
    _check_params(params)
    if iterations is not None:
        df = df[df["iterations"].astype("Int64") == int(iterations)]
    if params is not None:
        df = df[df["params_source"].map(params_kind) == params]
    if foundation is not None:
        df = df[(df["foundation"] == foundation) | df["foundation_sha256"].str.startswith(str(foundation))]
    if protocol_version is not None:
        df = df[df["protocol_version"] == protocol_version]
    return df


def load_results(paths_or_dirs: Union[Source, Iterable[Source]], iterations: Optional[int] = None,
                 params: Optional[str] = None, foundation: Optional[str] = None,
                 protocol_version: Optional[str] = None) -> pd.DataFrame:
    """One row per (dataset, method, shots, repeat, foundation, protocol version, case_id), columns
    ``COLUMNS``. The keyword arguments keep one budget / foundation / protocol (``select_budget``),
    selected before duplicates of a cell are resolved."""
    _check_params(params)  # before any file is read
    if isinstance(paths_or_dirs, (str, Path)):
        paths_or_dirs = [paths_or_dirs]
    candidates = defaultdict(list)  # cell key -> [(mtime, file, rows), ...]
    for file in _expand(paths_or_dirs):
        table = read_snapshot(file) if file.suffix == ".csv" else _read_result(file)
        if table is None:
            continue
        table = select_budget(table, iterations, params, foundation, protocol_version)
        mtime = file.stat().st_mtime
        for key, rows in table.groupby(RUN_KEY, sort=False):
            candidates[key].append((mtime, str(file), rows))
    kept = []
    for key, cands in candidates.items():
        *older, newest = sorted(cands, key=lambda c: c[:2])
        if older:
            warnings.warn(f"{len(cands)} results for {dict(zip(RUN_KEY, key))}: keeping the newest, {newest[1]}; "
                          f"ignoring {', '.join(c[1] for c in older)}", stacklevel=2)
        kept.append(newest[2])
    if not kept:
        return _typed(pd.DataFrame(columns=COLUMNS))
    return _typed(pd.concat(kept, ignore_index=True)).sort_values(KEY, ignore_index=True)


def _expand(sources: Iterable[Source]) -> List[Path]:
    files = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            files += sorted(src.rglob("result.json"))
        elif src.is_file():
            files.append(src)
        else:
            raise FileNotFoundError(f"no results at {src} (expected a directory, a result.json "
                                    "or a snapshot .csv)")
    return files


def _read_result(file: Path):
    """Rows of one ``result.json`` as a DataFrame, or None for a tuning-split result."""
    try:
        res = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    version = res.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        raise ValueError(f"{file}: unknown result schema_version {version!r} (this bench reads "
                         f"{', '.join(map(str, SCHEMA_VERSIONS))}); upgrade bench or re-run the cell")
    try:
        spec, cost, params = res["spec"], res["cost"], res["params"]
        if res.get("evaluated", spec.get("evaluate_on", "test")) != "test":
            return None
        run = {"dataset": spec["dataset"], "method": spec["method"], "shots": spec["shots"],
               "repeat": spec["repeat"], "run_id": res["run_id"], "protocol_version": spec["protocol_version"],
               "iterations": spec["iterations"], "params_source": spec.get("params_source", "default"),
               "total_params": params.get("total"), "trainable_params": params["trainable"],
               "changed_params": params["changed"], "train_seconds": cost["train_seconds"], "peak_memory_mb": cost["peak_memory_mb"],
               "device": cost.get("device", spec.get("device")), **_provenance_columns(res),
               **run_columns(file.parent)}
        version_1 = res.get("metrics_version", 1) == 1
        rows = [{**run, "case_id": c["case_id"], "label": c.get("label", SINGLE_LABEL),
                 **(upgrade_v1(c) if version_1 else {m: c[m] for m in METRICS})}
                for c in res["cases"]]
    except KeyError as e:
        raise ValueError(f"{file}: result is missing the field {e}") from None
    return pd.DataFrame(rows, columns=COLUMNS)


def _provenance_columns(res: dict) -> dict:
    """The provenance columns of one result; schema 1 results lack most of it (``unknown`` / nan)."""
    spec, prov = res["spec"], res.get("provenance")
    if prov is None:
        return {**{c: UNKNOWN if c in STRING_COLUMNS else np.nan for c in PROVENANCE_COLUMNS},
                "foundation": spec.get("foundation", UNKNOWN), "code_version": res.get("code_version", UNKNOWN),
                "hparams": json.dumps(spec.get("hparams", {}), sort_keys=True)}
    budget, recipe = prov["budget"], prov["recipe"]
    return {"foundation": prov["foundation"]["name"], "foundation_sha256": prov["foundation"]["sha256"],
            "optimizer": recipe["optimizer"], "lr": recipe["lr"], "weight_decay": recipe["weight_decay"],
            "batch_size": budget["batch_size"], "patch_size": "x".join(map(str, budget["patch_size"])),
            "seed": prov["seed"]["value"], "hparams": json.dumps(prov["hyperparameters"]["values"], sort_keys=True),
            "updated_per_step": prov["updated_per_step"] if prov["updated_per_step"] is not None else np.nan,
            "code_version": prov["code"]["version"], "git_commit": prov["code"]["git_commit"] or "n/a",
            "packages": json.dumps(prov["versions"], sort_keys=True), "device_name": prov["device"]["name"]}


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    # tables built before the extra evaluations existed (or without them): not evaluated
    df = df.assign(**{c: NOT_EVALUATED if c in SET_COLUMNS else np.nan
                      for c in (*SET_COLUMNS, *EXTRA_COLUMNS) if c not in df.columns})
    df = df[COLUMNS].copy()
    for c in COLUMNS:
        if c in STRING_COLUMNS:
            df[c] = df[c].astype(str)
        elif c in INT_COLUMNS:
            df[c] = df[c].astype("int64")
        elif c in COUNT_COLUMNS:
            df[c] = df[c].astype("Int64")
        else:
            df[c] = df[c].astype("float64")
    return df


def write_snapshot(df: pd.DataFrame, path: Source) -> Path:
    """Write the table as a deterministic CSV (sorted rows, fixed columns and float format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = _typed(df).sort_values(KEY, ignore_index=True)
    df.to_csv(path, index=False, float_format=FLOAT_FORMAT, na_rep="nan", lineterminator="\n")
    return path


def read_snapshot(path: Source) -> pd.DataFrame:
    path = Path(path)
    # Strings stay strings (a case id "NA" is not a missing value); only "nan" (or an empty field, as
    # pandas writes NaN by default) is missing, in numbers.
    df = pd.read_csv(path, dtype={c: str for c in STRING_COLUMNS}, keep_default_na=False,
                     na_values={c: ["nan", ""] for c in COLUMNS if c not in STRING_COLUMNS})
    if "nsd_voxel" not in df.columns:  # written under metrics version 1
        df = pd.concat([df.drop(columns=[c for c in METRICS if c in df.columns]),
                        pd.DataFrame([upgrade_v1(r) for r in df.to_dict("records")], index=df.index)], axis=1)
    for c, value in LATER_COLUMNS.items():
        if c not in df.columns:
            df[c] = np.nan if value == "nan" else value
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a results snapshot (missing columns {', '.join(missing)})")
    return _typed(df).sort_values(KEY, ignore_index=True)


SYNTHETIC_PROVENANCE = {"foundation": "synthetic", "foundation_sha256": "0" * 64, "optimizer": "adamw",
                        "lr": 3e-3, "weight_decay": 3e-5, "batch_size": 2, "patch_size": "32x64x64", "seed": 0,
                        "hparams": "{}", "updated_per_step": np.nan, "code_version": "synthetic",
                        "git_commit": "n/a", "packages": "{}", "device_name": "synthetic"}


def synthetic_results(effects=None, shots=(1, 3), repeats: int = 3, cases: int = 5,
                      dataset: str = "phantom", noise: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """A made-up results table (mean Dice per method in ``effects``), for tests and for trying reports.

    Dice = effect + 0.02 * shots + a shared case difficulty + per-run noise, clipped to [0, 1];
    the other metrics are simple functions of Dice.
    """
    effects = effects or {"dgst": 0.80, "full": 0.70, "lora": 0.65}
    rng = np.random.default_rng(seed)
    rows = []
    for s, r in itertools.product(shots, range(repeats)):
        difficulty = rng.normal(0, 0.05, cases)
        for method, effect in effects.items():
            dice = np.clip(effect + 0.02 * s + difficulty + rng.normal(0, noise, cases), 0, 1)
            for c, d in enumerate(dice):
                rows.append({
                    "dataset": dataset, "method": method, "shots": s, "repeat": r, "case_id": f"case_{c:03d}",
                    "label": SINGLE_LABEL,
                    "run_id": f"{method}-{s}-{r}", "protocol_version": "v1", "iterations": 60,
                    "params_source": "default", "dice": d, "hd95": 20 * (1 - d),
                    "assd": 5 * (1 - d), "nsd": min(1.0, d + 0.05), "nsd_voxel": min(1.0, d + 0.1),
                    "nsd_tol_mm": 2.0, "nsd_voxel_tol_mm": 2.5,
                    **{f"lesion_{k}{rule}": v for rule in ("", "_any") for k, v in (
                        ("tp", 2), ("fp", int(d < 0.7)), ("fn", int(d < 0.8)),
                        ("precision", 1 / (1 + int(d < 0.7))), ("recall", 2 / (2 + int(d < 0.8))), ("f1", d))},
                    "vol_pred_ml": 2 * d, "vol_ref_ml": 2.0, "pred_empty": 0, "ref_empty": 0,
                    "total_params": 20000, "trainable_params": 1000 * (1 + len(method)),
                    "changed_params": 900 * (1 + len(method)), "train_seconds": 30.0 + s,
                    "peak_memory_mb": 800.0, "device": "cpu", **SYNTHETIC_PROVENANCE})
    return _typed(pd.DataFrame(rows)).sort_values(KEY, ignore_index=True)
