"""Tuned-parameter files: ``$BENCH_HOME/tuned/<dataset>/<method>/shots<k>.json``, written by a study and
read by ``bench run --params tuned`` and tuned sweep cells (docs/tuning.md, Result)."""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from bench.home import bench_home
from bench.tuning.storage import StudyStorage

if TYPE_CHECKING:
    from bench.runner import RunSpec

TUNED_SCHEMA_VERSION = 1


def tuned_path(dataset: str, method: str, shots: int) -> Path:
    return bench_home() / "tuned" / dataset / method / f"shots{shots}.json"


def _write_tuned(summary: dict, *, budget: dict, trials: int, study_name: str, storage: StudyStorage,
                 source: str) -> Optional[Path]:
    import bench
    if not summary["best"]:
        return None
    b = summary["best"]
    data = {"schema_version": TUNED_SCHEMA_VERSION, "method": budget["method"], "dataset": budget["dataset"],
            "shots": budget["shots"], "protocol_version": budget["protocol_version"],
            "study_name": study_name, "storage": storage.label, "params_source": source,
            "objective": budget["objective"],
            "budget": {"trials": trials, **{k: v for k, v in budget.items()
                                            if k not in ("method", "dataset", "shots", "protocol_version",
                                                         "objective")}},
            "trials": summary["trials"], "best_trial": b["trial"], "best_value": b["value"],
            "best_repeat_values": b["repeat_values"],
            "spec": b["spec"], "hparams": b["hparams"], "optuna_params": b["optuna_params"],
            "code_version": bench.__version__,
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    path = tuned_path(budget["dataset"], budget["method"], budget["shots"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


@dataclass
class TunedParams:
    data: dict
    path: Path

    @property
    def lr(self) -> float:
        return float(self.data["spec"]["lr"])

    @property
    def iterations(self) -> Optional[int]:
        """Tuned iterations, or None when iterations were not part of the search."""
        if not self.data["budget"].get("tune_iterations"):
            return None
        return int(self.data["spec"]["iterations"])

    @property
    def hparams(self) -> dict:
        return dict(self.data["hparams"])

    @property
    def source(self) -> str:
        return self.data["params_source"]

    def spec_overrides(self, explicit: Optional[dict] = None) -> dict:
        """RunSpec fields for a run with these parameters. Values the user set explicitly
        (``explicit['lr']`` not None, keys of ``explicit['hparams']``) win and are named in
        ``params_source``."""
        explicit = explicit or {}
        out: Dict[str, Any] = {"lr": self.lr, "hparams": self.hparams}
        overridden = []
        if explicit.get("lr") is not None:
            out["lr"] = explicit["lr"]
            overridden.append("lr")
        for k, v in (explicit.get("hparams") or {}).items():
            out["hparams"][k] = v
            overridden.append(k)
        if self.iterations is not None:
            out["iterations"] = self.iterations
        out["params_source"] = self.source + (f" (overridden: {','.join(overridden)})" if overridden else "")
        return out


def load_tuned(method: str, dataset: str, shots: int) -> TunedParams:
    path = tuned_path(dataset, method, shots)
    if not path.is_file():
        raise FileNotFoundError(f"no tuned parameters for {method} on {dataset} {shots}-shot ({path} missing); "
                                f"run `bench tune --method {method} --dataset {dataset} --shots {shots}` first")
    data = json.loads(path.read_text())
    if data.get("schema_version") != TUNED_SCHEMA_VERSION:
        raise ValueError(f"{path}: unsupported tuned-params schema {data.get('schema_version')!r}; "
                         f"re-run `bench tune --method {method} --dataset {dataset} --shots {shots}`")
    return TunedParams(data, path)


def apply_tuned(spec: "RunSpec", tuned: Optional[TunedParams] = None) -> "RunSpec":
    """``spec`` with the tuned parameters of its method, dataset and shots (``tuned``, default: the
    tuned-params file): the tuned lr and hyper-parameters, the tuned iterations when the study searched
    them, and the recipe (optimizer, weight decay) the study tuned under where ``spec`` leaves it unset.
    What ``spec`` sets itself (lr, hyper-parameter keys) wins and is named in ``params_source``.
    The one way tuned parameters reach a run: ``bench run --params tuned`` and tuned sweep cells."""
    tuned = tuned or load_tuned(spec.method, spec.dataset, spec.shots)
    fields = tuned.spec_overrides(explicit={"lr": spec.lr, "hparams": spec.hparams})
    for k in ("optimizer", "weight_decay"):
        if getattr(spec, k) is None:
            fields[k] = tuned.data["budget"].get(k)
    return replace(spec, **fields)
