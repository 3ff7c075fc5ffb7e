"""One trial: the search space, the run specs (tuning split only), training and scoring on the tuning cases,
pruning, and the checks that no test case is reached (docs/tuning.md, Objective, Search space)."""
from __future__ import annotations

import contextlib
import io
import math
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench.tracking import StudyTracker
from bench.tuning.bookkeeping import _worker, uses_budget

LR_RANGE = (1e-4, 1e-2)         # log-uniform
ITERATION_FACTORS = (0.5, 1.0, 2.0)   # x iterations, only with tune_iterations=True
OBJECTIVE = "mean Dice on the tuning-validation cases after fine-tuning on the support set"

Objective = Callable[[Any, List[Any]], float]   # (optuna trial, run specs, one per repeat) -> value


class TestSetAccessError(BaseException):
    """A tuning code path reached a test case. Not an ``Exception``: it stops the study."""
    __test__ = False  # not a pytest class


def suggest(trial, method_cls, iterations: int, tune_iterations: bool = False) -> Tuple[dict, dict]:
    """Sample one configuration: (RunSpec fields, method hyper-parameters)."""
    fields: Dict[str, Any] = {"lr": trial.suggest_float("lr", *LR_RANGE, log=True), "iterations": int(iterations)}
    if tune_iterations:
        choices = sorted({max(1, int(round(iterations * f))) for f in ITERATION_FACTORS})
        fields["iterations"] = int(trial.suggest_categorical("iterations", choices))
    hparams = dict(method_cls.search_space(trial) or {})
    return fields, hparams


def tuning_spec(**fields):
    """The only way the tuner builds a run spec: always evaluated on the tuning split."""
    from bench.runner import RunSpec
    fields.pop("evaluate_on", None)
    spec = RunSpec(evaluate_on="tune", **fields)
    assert spec.evaluate_on == "tune"
    return spec


def check_no_test_cases(case_ids: Sequence[str], split) -> None:
    ids = set(case_ids)
    leaked = sorted(ids & set(split.test))
    if leaked:
        raise TestSetAccessError(f"tuning evaluated test case(s) {leaked} of {split.dataset} {split.version}")
    stray = sorted(ids - set(split.tune))
    if stray:
        raise TestSetAccessError(f"tuning evaluated case(s) {stray} outside the tuning-validation split")


@dataclass
class _Study:
    method: str
    dataset: str
    shots: int
    repeats: List[int]
    protocol: Any
    name: str
    trials: int               # the study's budget
    source: str               # "<storage>#<study name>"
    base_spec: Dict[str, Any]
    iterations: int
    tune_iterations: bool
    tracker: StudyTracker
    tracking_uri: Optional[str]
    run_log: Callable
    quiet: bool = True        # hide nnU-Net's own prints during trials
    objective: Optional[Objective] = None
    step_stride: int = 1
    current_run: Dict[int, str] = field(default_factory=dict)
    leak: Optional[BaseException] = None

    def __call__(self, trial) -> float:
        import optuna
        from bench.methods import METHODS
        trial.set_user_attr("worker", _worker())
        ahead = sum(uses_budget(t, running=True) for t in trial.study.get_trials(deepcopy=False)
                    if t.number < trial.number)
        if ahead >= self.trials:
            # Other workers took the last places of the budget between our check and this trial's
            # creation: stop without training; surplus trials are not counted anywhere.
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise optuna.TrialPruned(f"surplus: the {self.trials}-trial budget is already used")
        fields, hparams = suggest(trial, METHODS.get(self.method), self.iterations, self.tune_iterations)
        trial.set_user_attr("spec", fields)
        trial.set_user_attr("hparams", hparams)
        specs = [tuning_spec(**{**self.base_spec, **fields}, method=self.method, dataset=self.dataset,
                             shots=self.shots, repeat=r, hparams=hparams,
                             params_source=f"{self.source}/trial{trial.number}") for r in self.repeats]
        run_id = self.tracker.start_trial(trial.number, self.name, {
            **fields, **{f"hp.{k}": v for k, v in hparams.items()}, "repeats": ",".join(map(str, self.repeats))})
        self.current_run[trial.number] = run_id
        try:
            value = float((self.objective or self._train_and_score)(trial, specs))
        except optuna.TrialPruned as e:
            self.tracker.end_trial(run_id, "PRUNED", error=str(e))
            self._remove_unfinished(specs)
            raise
        except TestSetAccessError as e:
            # optuna would leave the trial RUNNING for a BaseException: record it as FAIL,
            # stop the study and let tune() re-raise the leak once optuna has let go.
            self.leak = e
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            self.tracker.end_trial(run_id, "FAIL", error=f"{type(e).__name__}: {e}")
            trial.study.stop()
            raise RuntimeError(f"test-set access: {e}") from e
        except BaseException as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}")
            self.tracker.end_trial(run_id, "FAIL", error=f"{type(e).__name__}: {e}")
            raise
        self.tracker.end_trial(run_id, "COMPLETE" if math.isfinite(value) else "FAIL", value)
        return value

    def _train_and_score(self, trial, specs) -> float:
        import numpy as np
        import optuna
        from bench.runner import run
        values = {}
        for i, spec in enumerate(specs):
            split = self.protocol.split(spec.shots, spec.repeat)
            per_epoch = max(1, min(spec.eval_every, spec.iterations))
            offset = i * self.step_stride

            def report(epoch: int, scores: dict, spec=spec, per_epoch=per_epoch, offset=offset) -> None:
                value = scores.get("val_pseudo_dice")
                if value is None or not math.isfinite(value):
                    return
                it = min((epoch + 1) * per_epoch, spec.iterations)
                trial.report(float(value), offset + it)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at iteration {it} of repeat {spec.repeat} "
                                             f"(tune pseudo-Dice {value:.3f})")

            with contextlib.redirect_stdout(io.StringIO()) if self.quiet else contextlib.nullcontext():
                result = run(spec, log=self.run_log, tracking_uri=self.tracking_uri, epoch_callback=report,
                             parent_run_id=self.current_run.get(trial.number))
            check_no_test_cases([c["case_id"] for c in result["cases"]], split)
            if result.get("evaluated") != "tune" or result.get("test"):
                raise TestSetAccessError(f"run {result['run_id']} was not a tuning run")
            values[str(spec.repeat)] = float(result["summary"]["dice_mean"])
            trial.set_user_attr("repeat_values", values)
        return float(np.mean(list(values.values())))

    def _remove_unfinished(self, specs) -> None:
        """A pruned run leaves a half-trained folder without result.json: delete it."""
        from bench.runner import run_dir
        for spec in specs:
            d = run_dir(spec)
            if not (d / "result.json").exists():
                shutil.rmtree(d, ignore_errors=True)
