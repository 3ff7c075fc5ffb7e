"""MLflow as the system of record: one run per cell, nested runs for tuning trials.

Default store: ``sqlite:///$BENCH_HOME/mlflow.db`` (``mlflow ui --backend-store-uri`` that
URI shows it). Any tracking URI works, e.g. a shared MLflow server for many machines.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from bench.home import bench_home, default_tracking_uri

EXPERIMENT = "lnbench"


def _mlflow(tracking_uri: Optional[str]):
    import logging
    import mlflow
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None and uri.startswith("sqlite:"):
        # with a local store, keep artefacts in $BENCH_HOME too (MLflow's default is ./mlruns of the cwd)
        try:
            mlflow.create_experiment(EXPERIMENT, artifact_location=(bench_home() / "mlartifacts").as_uri())
        except Exception:  # created concurrently by another process
            pass
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_result(result: dict, out_dir: Path, tracking_uri: Optional[str] = None,
               parent_run_id: Optional[str] = None) -> str:
    import pandas as pd
    mlflow = _mlflow(tracking_uri)
    spec = result["spec"]
    name = f"{spec['method']}-{spec['dataset']}-{spec['shots']}shot-r{spec['repeat']}"
    tags = {"kind": "cell" if spec.get("evaluate_on", "test") == "test" else "trial", "bench.run_id": result["run_id"],
            "method": spec["method"], "dataset": spec["dataset"], "shots": str(spec["shots"]),
            "repeat": str(spec["repeat"]), "params_source": spec.get("params_source", "default")}
    prov = result.get("provenance")
    if prov:  # what `mlflow ui` filters on: which checkpoint, protocol, seed and commit produced this run
        tags.update({"foundation": prov["foundation"]["name"], "foundation.sha256": prov["foundation"]["sha256"],
                     "protocol_version": prov["protocol"]["version"], "seed": str(prov["seed"]["value"]),
                     "optimizer": prov["recipe"]["optimizer"], "git_commit": str(prov["code"]["git_commit"])})
    with mlflow.start_run(run_name=name, tags=tags, nested=parent_run_id is not None,
                          parent_run_id=parent_run_id) as run:
        params = flatten({**spec, "versions": result["versions"],
                          **({"provenance": {k: v for k, v in prov.items() if k != "versions"}} if prov else {})})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics = {**result["summary"], **{f"params_{k}": v for k, v in result["params"].items()},
                   **{k: v for k, v in result["cost"].items() if isinstance(v, (int, float))}}
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        for i, ep in enumerate(result.get("epochs", [])):
            mlflow.log_metrics({f"train/{k}": float(v) for k, v in ep.items()}, step=i)
        with tempfile.TemporaryDirectory() as tmp:
            pd.DataFrame(result["cases"]).to_csv(Path(tmp) / "cases.csv", index=False)
            (Path(tmp) / "result.json").write_text(json.dumps(result, indent=1, default=str))
            mlflow.log_artifacts(tmp)
        return run.info.run_id
