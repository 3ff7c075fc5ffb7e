"""Score a finished run's exported model on the auxiliary sets (``bench.evaluation.sets``).

Results go to ``extra_eval.json`` next to the run's ``result.json``, keyed by the set's key
(``retention/phantom-source@v1-g2``), so ``result.json``, the run id and the protocol stay as they were.
Each record holds the per-case scores, a summary and ``eval_version``; a run that already holds a set's
key at the current ``EXTRA_EVAL_VERSION`` is skipped (``force`` recomputes).

Forgetting = (foundation's mean Dice on the retention set) - (the export's), in Dice points: positive
when fine-tuning lost source skill. The foundation is scored with the run's own plans and dataset.json
(the plans ``bench run`` transferred to the target; its architecture, as the export without a method's
extra modules), so the difference is the weights' alone; those scores are computed once per
(foundation checkpoint, set, plans) and cached in ``$BENCH_HOME/extra_eval/foundations/``. An export
whose weights equal the foundation's (zero-shot) is the foundation: its forgetting is exactly 0.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from bench import progress
from bench.evaluation.sets import AXES, EvalSet

EXTRA_FILE = "extra_eval.json"
EXTRA_EVAL_VERSION = 1  # bump when what a record holds or how it is computed changes


def parse_axes(text) -> tuple:
    axes = tuple(a for a in (text.split(",") if isinstance(text, str) else text) if a)
    bad = [a for a in axes if a not in AXES]
    if bad or not axes:
        raise ValueError(f"--extra takes a comma list of {', '.join(AXES)}; got {text!r}")
    return axes


def read_extra(run_folder) -> Dict[str, dict]:
    path = Path(run_folder) / EXTRA_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["sets"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not an extra-evaluation file ({e}); delete it and run `bench evaluate`") from None


def _write_extra(run_folder: Path, sets: Dict[str, dict]) -> None:
    tmp = run_folder / f"{EXTRA_FILE}.tmp"
    tmp.write_text(json.dumps({"schema_version": 1, "sets": sets}, indent=1))
    os.replace(tmp, run_folder / EXTRA_FILE)


# --- which sets a run gets -----------------------------------------------------------------------------

def foundation_folder(result: dict, foundation_dir: Optional[str] = None) -> Path:
    """The folder of the run's foundation, found by its checkpoint's sha256: ``foundation_dir`` if given,
    else where the run recorded it, else a suite phantom foundation (rebuilt or shipped) when it matches."""
    from bench.foundation import RECIPES, _find_checkpoint, existing_phantom_foundation_dir
    from bench.provenance import checkpoint_sha256
    want = result["provenance"]["foundation"]["sha256"]
    recorded = Path(result["provenance"]["foundation"]["checkpoint"])
    candidates = [Path(foundation_dir).expanduser()] if foundation_dir else []
    candidates += [recorded.parent.parent if recorded.parent.name.startswith("fold_") else recorded.parent,
                   *(existing_phantom_foundation_dir(r) for r in RECIPES.values())]
    for folder in candidates:
        try:
            if folder is not None and checkpoint_sha256(_find_checkpoint(folder)) == want:
                return folder
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"the foundation of run {result['run_id']} (checkpoint sha256 {want[:12]}..., "
                            f"recorded at {recorded}) is not found; pass its folder with --foundation-dir DIR")


def is_phantom_foundation(folder: Path) -> bool:
    """Built by ``bench.foundation.build_phantom_foundation`` (pretrained on phantom-source)."""
    info = folder / "bench.json"
    return info.is_file() and "recipe" in json.loads(info.read_text())


def sets_for_run(result: dict, foundation: Path, axes: Sequence[str],
                 retention: Optional[str] = None) -> Dict[str, "EvalSet | str"]:
    """Per axis, the set this run is scored on, or why it has none."""
    from bench.evaluation.sets import dataset_retention_set, phantom_set, protocol_nodefree_set
    spec, out = result["spec"], {}
    if "retention" in axes:
        if retention:
            out["retention"] = dataset_retention_set(retention)
        elif is_phantom_foundation(foundation):
            out["retention"] = phantom_set("retention")
        else:
            out["retention"] = (f"foundation {foundation.name} is not the phantom's: name its source data with "
                                "--retention DATASET[:CASE,...]")
    if "nodefree" in axes:
        if spec["dataset"] == "phantom":
            out["nodefree"] = phantom_set("nodefree")
        else:
            out["nodefree"] = (protocol_nodefree_set(spec["dataset"], spec["protocol_version"])
                               or f"protocol {spec['dataset']}/{spec['protocol_version']} lists no node_free cases")
    return out


# --- scoring -------------------------------------------------------------------------------------------

def _read_label(path: str) -> np.ndarray:
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(path)) > 0


def source_label_values(source_json: dict, model_json: dict) -> Dict[str, int]:
    """The model's label values for the source's structures, matched by name (a multi-label export's other
    structures are not the source's); empty when it segments none of them."""
    theirs = {n for n, v in source_json["labels"].items() if int(v) != 0}
    return {n: int(v) for n, v in model_json["labels"].items() if n in theirs}


def score_set(predictor, s: EvalSet, foreground: Optional[Sequence[int]] = None) -> List[dict]:
    """Per-case scores of one set: all ``case_metrics`` (retention) or ``nodefree_metrics`` (node-free).
    ``foreground``: the label values a retention case scores (default: any foreground label)."""
    from bench.engine.predict import predict_case
    from bench.metrics import case_metrics, nodefree_metrics
    rows = []
    for case in progress.track(s.cases, f"scoring {s.key}"):
        seg, spacing = predict_case(predictor, list(case.images))
        if s.axis == "retention":
            pred = np.isin(seg, list(foreground)) if foreground else seg > 0
            rows.append({"case_id": case.case_id, **case_metrics(pred, _read_label(case.label), spacing,
                                                                  nsd_tolerance_mm=s.nsd_tolerance_mm)})
            continue
        if case.label is not None and _read_label(case.label).any():
            raise ValueError(f"node-free case {case.case_id} of {s.key} has a non-empty label ({case.label}); "
                             "list only label-empty cases under the protocol's node_free")
        rows.append({"case_id": case.case_id, "group": case.group, **nodefree_metrics(seg > 0, spacing)})
    return rows


def nodefree_summary(rows: List[dict]) -> dict:
    fp, ml = np.array([r["fp_components"] for r in rows], float), np.array([r["fp_ml"] for r in rows], float)
    out = {"scans": len(rows), "fp_per_scan": float(fp.mean()), "fp_ml_per_scan": float(ml.mean()),
           "scans_with_fp": int((fp > 0).sum()), "groups": {}}
    for g in sorted({r["group"] for r in rows}):
        sel = np.array([r["group"] == g for r in rows])
        out["groups"][g] = {"scans": int(sel.sum()), "fp_per_scan": float(fp[sel].mean()),
                            "fp_ml_per_scan": float(ml[sel].mean())}
    return out


def _plans_digest(plans: dict, dataset_json: dict, configuration: str) -> str:
    blob = json.dumps([plans, dataset_json, configuration], sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def foundation_scores(foundation, s: EvalSet, plans: dict, dataset_json: dict, device, log: Callable) -> dict:
    """The foundation's per-case retention scores under ``plans`` (cached: computed once)."""
    from bench.engine.predict import make_predictor
    from bench.home import subdir
    from bench.metrics import METRICS_VERSION
    from bench.provenance import checkpoint_sha256
    from bench.foundation import _find_checkpoint
    sha = checkpoint_sha256(_find_checkpoint(foundation.folder))
    key = f"{sha[:16]}_{s.key.replace('/', '_').replace('@', '_')}_{_plans_digest(plans, dataset_json, foundation.configuration)}"
    path = subdir("extra_eval", "foundations") / f"{key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("eval_version") == EXTRA_EVAL_VERSION and cached.get("metrics_version") == METRICS_VERSION:
            return cached
    log(f"  scoring foundation {foundation.name} on {s.key} once (cached in {path.parent})")
    predictor = make_predictor(plans, dataset_json, foundation.configuration, foundation.state_dict, device)
    rows = score_set(predictor, s)
    record = {"eval_version": EXTRA_EVAL_VERSION, "metrics_version": METRICS_VERSION, "foundation_sha256": sha,
              "set": s.key, "cases": rows, "dice_mean": float(np.mean([r["dice"] for r in rows]))}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return record


def _same_weights(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _is_current(record: Optional[dict], result: dict) -> bool:
    """Made by this evaluation and metrics version; for a multi-label run's retention, also scored on the
    source's own labels (records made before then counted any foreground label)."""
    from bench.metrics import METRICS_VERSION
    return bool(record) and record.get("eval_version") == EXTRA_EVAL_VERSION \
        and record.get("metrics_version") == METRICS_VERSION \
        and not (record.get("axis") == "retention" and "labels" in result and "labels_scored" not in record)


def model_folder(run_folder: Path, result: dict) -> Path:
    """The run's exported model: ``model/`` next to result.json (results may have moved), else as recorded."""
    local = run_folder / "model"
    return local if local.is_dir() else Path(result["model_dir"])


def evaluate_run(run_folder, axes: Sequence[str] = AXES, retention: Optional[str] = None,
                 foundation_dir: Optional[str] = None, device: str = "auto", force: bool = False,
                 log: Callable = print) -> dict:
    """Score one run on its auxiliary sets; returns {"status": "done"|"skipped"|"not applicable", ...}.
    One predictor per run (the exported model's), every set through it."""
    from bench.engine.predict import make_predictor
    from bench.engine.preprocess import transfer_plans
    from bench.engine.train import resolve_device
    from bench.foundation import load_foundation
    from bench.home import configure_nnunet_env
    from bench.metrics import METRICS_VERSION

    run_folder = Path(run_folder)
    result = json.loads((run_folder / "result.json").read_text())
    if result.get("evaluated", "test") != "test":
        return {"status": "not applicable", "why": "a tuning trial (evaluated on the tuning split)"}
    if result.get("schema_version", 1) < 2:
        return {"status": "not applicable", "why": "result schema 1 records no foundation checksum"}
    sets = read_extra(run_folder)
    foundation_path = foundation_folder(result, foundation_dir)
    wanted = sets_for_run(result, foundation_path, axes, retention)
    missing = {a: w for a, w in wanted.items() if isinstance(w, str)}
    todo = [w for w in wanted.values()
            if not isinstance(w, str) and (force or not _is_current(sets.get(w.key), result))]
    if not todo:
        return {"status": "skipped", "why": "; ".join(missing.values()) or "up to date", "sets": sets}
    configure_nnunet_env()
    t0 = time.time()
    dev = resolve_device(device)
    model = load_foundation(model_folder(run_folder, result))
    predictor = make_predictor(model.plans, model.dataset_json, model.configuration, model.state_dict, dev)
    for s in todo:
        record = {"eval_version": EXTRA_EVAL_VERSION, "metrics_version": METRICS_VERSION, "axis": s.axis,
                  "set": s.name, "version": s.version, "description": s.description}
        ts = time.time()
        if s.axis == "retention":
            foundation = load_foundation(foundation_path)
            plans = transfer_plans(foundation.plans, model.plans["dataset_name"])
            # the foundation with its own head (a multi-label run's export has another)
            before = foundation_scores(foundation, s, plans, foundation.dataset_json, dev, log)
            same = plans == model.plans and _same_weights(model.state_dict, foundation.state_dict)
            shared = source_label_values(foundation.dataset_json, model.dataset_json)
            if not shared:
                missing[s.axis] = (f"retention not applicable: the model segments none of the source's "
                                   f"structures ({', '.join(foundation.dataset_json['labels'])})")
                continue
            rows = before["cases"] if same else score_set(predictor, s, foreground=sorted(shared.values()))
            after = float(np.mean([r["dice"] for r in rows]))
            record.update(cases=rows, dice=after, dice_foundation=before["dice_mean"], labels_scored=sorted(shared),
                          forgetting=before["dice_mean"] - after, weights_equal_foundation=same)
        else:
            rows = score_set(predictor, s)
            record.update(cases=rows, **nodefree_summary(rows))
        record["seconds"] = round(time.time() - ts, 3)
        sets[s.key] = record
    _write_extra(run_folder, sets)
    return {"status": "done", "seconds": time.time() - t0, "sets": sets,
            "why": "; ".join(missing.values())}


# --- many runs -----------------------------------------------------------------------------------------

def run_folders(root, dataset: Optional[str] = None, methods: Optional[Iterable[str]] = None,
                shots: Optional[Iterable[int]] = None, iterations: Optional[int] = None,
                params: Optional[str] = None, foundation: Optional[str] = None,
                protocol_version: Optional[str] = None) -> List[Path]:
    """Run folders (holding result.json) under ``root``, test-set runs only, kept by the same selectors as
    ``bench leaderboard`` (``bench.results.select_budget``) plus dataset, methods and shots."""
    from bench.results import params_kind
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no runs under {root} (expected a folder holding run folders with result.json)")
    methods = set(methods) if methods else None
    shots = {int(s) for s in shots} if shots else None
    out = []
    for file in sorted(root.rglob("result.json")):
        res = json.loads(file.read_text())
        spec, prov = res.get("spec", {}), res.get("provenance", {})
        f = prov.get("foundation", {})
        keep = (res.get("evaluated", "test") == "test"
                and (dataset is None or spec.get("dataset") == dataset)
                and (methods is None or spec.get("method") in methods)
                and (shots is None or spec.get("shots") in shots)
                and (iterations is None or spec.get("iterations") == iterations)
                and (params is None or params_kind(spec.get("params_source", "default")) == params)
                and (foundation is None or foundation in (f.get("name"), spec.get("foundation"))
                     or str(f.get("sha256", "")).startswith(foundation))
                and (protocol_version is None or spec.get("protocol_version") == protocol_version))
        if keep:
            out.append(file.parent)
    return out


def describe(sets: Dict[str, dict]) -> str:
    """One line: the run's latest retention and node-free numbers."""
    parts = []
    for axis in AXES:
        rec = latest(sets, axis)
        if rec is None:
            continue
        if axis == "retention":
            parts.append(f"source Dice {rec['dice']:.3f} (foundation {rec['dice_foundation']:.3f}, "
                         f"forgetting {rec['forgetting']:+.3f})")
        else:
            parts.append(f"FP/node-free scan {rec['fp_per_scan']:.2f} ({rec['fp_ml_per_scan']:.2f} ml)")
    return "; ".join(parts) or "nothing evaluated"


def latest(sets: Dict[str, dict], axis: str) -> Optional[dict]:
    """The record of ``axis`` evaluated last (the file keeps insertion order), None if never."""
    recs = [r for r in sets.values() if r.get("axis") == axis]
    return recs[-1] if recs else None


def evaluate_runs(folders: List[Path], axes: Sequence[str] = AXES, retention: Optional[str] = None,
                  foundation_dir: Optional[str] = None, device: str = "auto", force: bool = False,
                  log: Callable = print) -> Dict[str, int]:
    """``evaluate_run`` over many runs with progress (done/skipped counts, seconds per run, ETA). A run
    that fails is reported and counted; the others go on."""
    counts = {"done": 0, "skipped": 0, "not applicable": 0, "failed": 0}
    spent: List[float] = []
    for i, folder in enumerate(folders, 1):
        try:
            out = evaluate_run(folder, axes, retention, foundation_dir, device, force, log)
        except Exception as e:  # noqa: BLE001 - one broken run must not stop the batch
            counts["failed"] += 1
            log(f"[{i}/{len(folders)}] {folder}: FAILED {type(e).__name__}: {e}")
            continue
        counts[out["status"]] += 1
        if out["status"] == "done":
            spent.append(out["seconds"])
            eta = (len(folders) - i) * float(np.mean(spent))
            note = f"; not evaluated: {out['why']}" if out["why"] else ""
            log(f"[{i}/{len(folders)}] {folder}: {describe(out['sets'])}; {out['seconds']:.1f} s, "
                f"at most {eta / 60:.1f} min left{note}")
        else:
            log(f"[{i}/{len(folders)}] {folder}: {out['status']} ({out['why']})")
    per_run = f"; {np.mean(spent):.1f} s per evaluated run" if spent else ""
    log(f"evaluate: {counts['done']} evaluated, {counts['skipped']} already up to date, "
        f"{counts['not applicable']} not applicable, {counts['failed']} failed{per_run}")
    return counts


# --- per-run columns of the results table ---------------------------------------------------------------

RUN_COLUMNS = ("retention_dice", "retention_dice_foundation", "forgetting", "nodefree_fp", "nodefree_fp_ml")
SET_COLUMNS = ("retention_set", "nodefree_set")
NOT_EVALUATED = "none"


def run_columns(run_folder) -> dict:
    """The results-table columns of one run's extra evaluations; NaN / ``none`` where never evaluated."""
    sets = read_extra(run_folder)
    ret, nf = latest(sets, "retention"), latest(sets, "nodefree")
    return {"retention_set": f"{ret['set']}@{ret['version']}" if ret else NOT_EVALUATED,
            "retention_dice": ret["dice"] if ret else math.nan,
            "retention_dice_foundation": ret["dice_foundation"] if ret else math.nan,
            "forgetting": ret["forgetting"] if ret else math.nan,
            "nodefree_set": f"{nf['set']}@{nf['version']}" if nf else NOT_EVALUATED,
            "nodefree_fp": nf["fp_per_scan"] if nf else math.nan,
            "nodefree_fp_ml": nf["fp_ml_per_scan"] if nf else math.nan}
