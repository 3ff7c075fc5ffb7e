"""MLflow as the system of record: one run per cell, nested runs for tuning trials.

Default store: ``sqlite:///$BENCH_HOME/mlflow.db`` (``mlflow ui --backend-store-uri`` that
URI shows it). Any tracking URI works, e.g. a shared MLflow server for many machines.

The only module that imports mlflow. Its surface: ``open_store``; ``log_result`` (a cell);
``start_run`` with ``log_params`` / ``log_metrics`` / ``log_artifact(s)`` inside it (reports, perf,
sweeps); ``StudyTracker`` (a tuning study and its trials).
"""
from __future__ import annotations

import contextlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

from bench.home import bench_home, default_tracking_uri
from bench.locks import is_database_url, lock

EXPERIMENT = "lnbench"
PARENT_TAG = "mlflow.parentRunId"   # mlflow.utils.mlflow_tags.MLFLOW_PARENT_RUN_ID: what nests a run in the UI


_READY: set = set()   # tracking URIs whose store and experiment this process has set up


def _mlflow(tracking_uri: Optional[str]):
    import logging
    import mlflow
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri in _READY:
        mlflow.set_experiment(EXPERIMENT)
        return mlflow
    if is_database_url(uri):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (seconds to import: not inside the lock)
    # MLflow creates its tables on first use: one process at a time (bench/locks.py)
    with lock(uri, "mlflow-schema"):
        if mlflow.get_experiment_by_name(EXPERIMENT) is None and is_database_url(uri):
            # a database store, not a server: keep artefacts in $BENCH_HOME too (MLflow's default is
            # ./mlruns of the current directory, a different one for every worker)
            try:
                mlflow.create_experiment(EXPERIMENT, artifact_location=(bench_home() / "mlartifacts").as_uri())
            except Exception:  # created concurrently by another process
                pass
        mlflow.set_experiment(EXPERIMENT)
    _READY.add(uri)
    return mlflow


def open_store(tracking_uri: Optional[str] = None) -> None:
    """Create the store and the experiment now (MLflow creates a SQLite schema on first use)."""
    _mlflow(tracking_uri)


@contextlib.contextmanager
def start_run(run_name: str, tags: Dict[str, str], tracking_uri: Optional[str] = None) -> Iterator[str]:
    """A top-level run; ``log_*`` below log to it. Yields its run id."""
    mlflow = _mlflow(tracking_uri)
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        yield run.info.run_id


def log_params(params: Dict[str, Any]) -> None:
    import mlflow
    mlflow.log_params(params)


def log_metrics(metrics: Dict[str, float]) -> None:
    import mlflow
    mlflow.log_metrics(metrics)


def log_artifact(path: str) -> None:
    import mlflow
    mlflow.log_artifact(path)


def log_artifacts(folder: str) -> None:
    import mlflow
    mlflow.log_artifacts(folder)


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
    from bench.augment import row_label
    spec = result["spec"]
    row = row_label(spec["method"], spec.get("augment"))  # dgst+synth: a method trained with an augmentation
    name = f"{row}-{spec['dataset']}-{spec['shots']}shot-r{spec['repeat']}"
    tags = {"kind": "cell" if spec.get("evaluate_on", "test") == "test" else "trial", "bench.run_id": result["run_id"],
            "method": spec["method"], "dataset": spec["dataset"], "shots": str(spec["shots"]),
            "repeat": str(spec["repeat"]), "params_source": spec.get("params_source", "default"),
            "augment": spec.get("augment") or "none", "row": row}
    prov = result.get("provenance")
    if prov:  # what `mlflow ui` filters on: which checkpoint, protocol, seed and commit produced this run
        tags.update({"foundation": prov["foundation"]["name"], "foundation.sha256": prov["foundation"]["sha256"],
                     "protocol": f"{prov['protocol']['dataset']}@{prov['protocol']['version']}",
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


class StudyTracker:
    """An Optuna study's run (reused when a study resumes) and nested trial runs, via MlflowClient so that
    the runner's own fluent ``mlflow.start_run(parent_run_id=...)`` is unaffected."""

    def __init__(self, tracking_uri: Optional[str], study_name: str, storage_label: str,
                 params: Dict[str, Any], tags: Dict[str, str], lock_target: Optional[str] = None):
        """``lock_target``: the study's storage (RDB URL or journal path). Workers that join a study
        together find-or-create its run under a lock there (bench/locks.py), else each would create one."""
        mlflow = _mlflow(tracking_uri)
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient()
        self.exp_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
        self.base_tags = {k: str(v) for k, v in tags.items()}
        self.lock_target, self.study_name = lock_target, study_name
        with lock(lock_target, f"study-run:{study_name}"):
            existing = [r for r in self.client.search_runs([self.exp_id], "tags.kind = 'study'",
                                                            order_by=["attributes.start_time DESC"], max_results=1000)
                        if r.data.tags.get("optuna.study") == study_name
                        and r.data.tags.get("optuna.storage") == storage_label]
            if existing:
                self.study_run = existing[0].info.run_id
                self.client.update_run(self.study_run, status="RUNNING")
            else:
                run = self.client.create_run(self.exp_id, run_name=study_name, tags={
                    **self.base_tags, "kind": "study", "optuna.study": study_name, "optuna.storage": storage_label})
                self.study_run = run.info.run_id
                self._log_params(self.study_run, params)

    def _log_params(self, run_id: str, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param
        self.client.log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def start_trial(self, number: int, study_name: str, params: Dict[str, Any]) -> str:
        run = self.client.create_run(self.exp_id, run_name=f"{study_name}-trial{number}", tags={
            **self.base_tags, PARENT_TAG: self.study_run, "kind": "trial",
            "optuna.study": study_name, "optuna.trial": str(number), "state": "RUNNING"})
        self._log_params(run.info.run_id, {**params, "trial": number})
        return run.info.run_id

    def end_trial(self, run_id: str, state: str, value: Optional[float] = None, error: str = "") -> None:
        if value is not None and math.isfinite(value):
            self.client.log_metric(run_id, "dice_tune_mean", float(value))
        self.client.set_tag(run_id, "state", state)
        if error:
            self.client.set_tag(run_id, "error", error[:4000])
        self.client.set_terminated(run_id, {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))

    def close_orphan_trials(self, study_name: str, finished: Dict[int, tuple]) -> int:
        """End the trial runs left RUNNING by a killed worker once the study has finished their trial
        (``fail_dead_trials``, Optuna's heartbeat): ``finished`` maps trial number -> (state, error)."""
        running = self.client.search_runs(
            [self.exp_id], f"tags.kind = 'trial' and tags.`optuna.study` = '{study_name}' and tags.state = 'RUNNING'",
            max_results=10000)
        n = 0
        for r in running:
            number = int(r.data.tags.get("optuna.trial", -1))
            if number in finished and r.data.tags.get(PARENT_TAG) == self.study_run:
                state, error = finished[number]
                self.end_trial(r.info.run_id, state, error=error or "")
                n += 1
        return n

    def end_study(self, summary: dict, tuned_file: Optional[Path], status: str = "FINISHED") -> None:
        # workers sharing the study end its one run together: their tag writes would collide
        with lock(self.lock_target, f"study-run:{self.study_name}"):
            self._end_study(summary, tuned_file, status)

    def _end_study(self, summary: dict, tuned_file: Optional[Path], status: str) -> None:
        counts = summary["trials"]
        for k, v in counts.items():
            self.client.log_metric(self.study_run, f"trials_{k}", float(v))
        best = summary.get("best")
        if best:
            self.client.log_metric(self.study_run, "best_value", float(best["value"]))
            tags = {"best.trial": best["trial"], **{f"best.{k}": v for k, v in best["spec"].items()},
                    **{f"best.hp.{k}": v for k, v in best["hparams"].items()}}
            for k, v in tags.items():
                self.client.set_tag(self.study_run, k, str(v))
        if tuned_file is not None and tuned_file.is_file():
            self.client.log_artifact(self.study_run, str(tuned_file))
        self.client.set_terminated(self.study_run, status)
