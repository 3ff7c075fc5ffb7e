"""``bench tune``: Optuna hyper-parameter search on the tuning-validation split.

Objective
    For each of several protocol repeats (default: the first ``DEFAULT_REPEATS``,
    0, 1 and 2), fine-tune on that repeat's support set and score mean Dice on that
    repeat's *tuning-validation* cases; the objective is the mean over the repeats.
    One repeat's tuning set is a single case at 1-shot: a choice made on it is that
    case's noise, so several repeats are averaged. The cost is one fine-tuning per
    repeat per trial (3x the trials with the default); ``--repeats`` changes it.
    A trial never validates on the cases it trains on: the tuning cases of a repeat
    are disjoint from its support set (checked before the study starts) and from
    the test set. The tuner builds run specs only through ``tuning_spec``
    (``evaluate_on="tune"``) and checks that every evaluated case id is a tuning
    case and none is a test case. A violation raises ``TestSetAccessError`` (a
    ``BaseException``, so no ``except Exception`` swallows it): the trial is
    recorded as FAIL, the study stops and ``tune`` re-raises it.
    Trials run with the cell's recipe (optimizer, weight decay: the method's recipe
    unless given), seed (derived per repeat unless given) and ``eval_every``.

Search space
    Shared part added here: learning rate, log-uniform in ``LR_RANGE``, and, only
    with ``tune_iterations=True``, the iteration budget from ``ITERATION_FACTORS``
    x ``iterations``; plus the method's own ``Method.search_space(trial)``. A
    method's default recipe must be reachable (e.g. DGST's ``penalty`` is a
    categorical on/off, then log-uniform when on: ``penalty = 0`` is in the space).

Budget
    Every method gets the same number of trials (``DEFAULT_TRIALS``) at the same
    iterations per trial (``DEFAULT_ITERATIONS``, as ``bench run``). ``trials`` is
    the budget of the *study*: COMPLETE and PRUNED trials use it up, FAILed
    trials do not (a rerun of the same command fills the budget again). Several
    workers can share a study: a trial that finds the budget already taken by
    lower-numbered COMPLETE, PRUNED or RUNNING trials stops before training and
    is marked ``surplus`` (state PRUNED, counted nowhere); the best trial is
    chosen among the first ``trials`` budget-using trials by number only,
    so every method is compared at the same budget. Budget and counts are
    recorded in the study, in the MLflow study run and in the tuned-params file.

Sampler
    TPE (``constant_liar`` for parallel workers), seeded per worker process (see
    ``sampler_seed``): parallel workers do not propose the same configurations.

Pruning
    ``MedianPruner`` on the tuning-set pseudo-Dice that the trainer computes every
    ``eval_every`` iterations (``bench.runner.run``'s ``epoch_callback``). A pruned
    trial raises ``optuna.TrialPruned`` out of nnU-Net's training loop; the
    runner stops nnU-Net's augmentation workers on the way out, no ``result.json``
    or per-run MLflow run is written (both are written only at the very end of a
    run) and the tuner deletes the pruned run's folder.

Storage
    Default: an Optuna ``JournalStorage`` file, ``$BENCH_HOME/optuna/journal.log``.
    It is an append-only log guarded by a file lock, which several processes on
    one machine can share. A bare SQLite file (``sqlite:///...``) is not the
    default because SQLite allows one writer at a time: parallel workers get
    "database is locked" errors under contention, and Optuna documents SQLite
    as unsuitable for parallel optimisation. ``storage=URL`` takes any
    SQLAlchemy RDB URL (``postgresql://user@host/db``) to share a study between
    machines; there, trials of a killed worker are failed by Optuna's heartbeat.
    With a journal, trials left RUNNING by a dead process on this machine are
    marked FAIL when the study is opened again (each trial records its worker's
    host name and process id). Studies are opened with
    ``load_if_exists=True``: rerunning an interrupted ``bench tune`` resumes it
    and runs only the trials still missing from the budget.

Tracking
    One MLflow run per study (tag ``kind=study``; reused when the study is
    resumed), one nested run per trial (``kind=trial``: params, state, value)
    and, nested under it, the runner's usual run per repeat. The study run gets
    the best value and parameters at the end.

Result
    ``$BENCH_HOME/tuned/<dataset>/<method>/shots<k>.json``, read by
    ``load_tuned`` (``bench run --params tuned``). Runs made with it record
    ``params_source = "<storage>#<study name>"``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench import progress as progress_bars
from bench.home import bench_home, subdir
from bench.tracking import StudyTracker

DEFAULT_TRIALS = 20             # the same trial budget for every method
DEFAULT_REPEATS = 3             # the objective averages the first 3 repeats' tuning sets
DEFAULT_ITERATIONS = 60         # iterations per trial: the same default as `bench run`
LR_RANGE = (1e-4, 1e-2)         # log-uniform
ITERATION_FACTORS = (0.5, 1.0, 2.0)   # x iterations, only with tune_iterations=True
PRUNER_STARTUP_TRIALS = 3       # MedianPruner prunes nothing before this many trials have finished
TUNED_SCHEMA_VERSION = 1
RDB_HEARTBEAT_S, RDB_GRACE_S = 60, 300
OBJECTIVE = "mean Dice on the tuning-validation cases after fine-tuning on the support set"

Objective = Callable[[Any, List[Any]], float]   # (optuna trial, run specs, one per repeat) -> value


class TestSetAccessError(BaseException):
    """A tuning code path reached a test case. Not an ``Exception``: it stops the study."""
    __test__ = False  # not a pytest class


# --------------------------------------------------------------------------- storage / names
def journal_path() -> Path:
    return subdir("optuna") / "journal.log"


@dataclass
class StudyStorage:
    storage: Any          # optuna BaseStorage
    label: str            # journal path or URL (password hidden): recorded in params_source
    kind: str             # "journal" or "rdb"

    def dashboard_command(self) -> str:
        return f"optuna-dashboard {self.label}"


def open_storage(url: Optional[str] = None) -> StudyStorage:
    """None: the journal file under $BENCH_HOME; a path: a journal file there; ``dialect://...``: RDB."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    if url and "://" in url:
        from sqlalchemy.engine import make_url
        from bench.locks import lock
        import warnings
        label = make_url(url).render_as_string(hide_password=True)
        with warnings.catch_warnings():  # heartbeat_interval is flagged experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                with lock(url, "optuna-schema"):  # workers starting together on a fresh database
                    storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                                         heartbeat_interval=RDB_HEARTBEAT_S,
                                                         grace_period=RDB_GRACE_S)
            except ImportError as e:
                raise ValueError(f"--storage {label}: no database driver for this URL ({e}); install one, "
                                 "e.g. `pip install 'lnbench[scale]'` (psycopg 3) for postgresql://") from None
        return StudyStorage(storage, label, "rdb")
    path = Path(url).expanduser().resolve() if url else journal_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return StudyStorage(JournalStorage(JournalFileBackend(str(path))), str(path), "journal")


def default_study_name(method: str, dataset: str, shots: int, protocol_version: str) -> str:
    return f"{method}-{dataset}-{shots}shot-{protocol_version}"


def tuned_path(dataset: str, method: str, shots: int) -> Path:
    return bench_home() / "tuned" / dataset / method / f"shots{shots}.json"


# --------------------------------------------------------------------------- search space
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


# --------------------------------------------------------------------------- study bookkeeping
def _worker() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study, storage, log: Callable = print) -> int:
    """Mark FAIL the RUNNING trials whose worker was a process on this machine that is gone
    (a killed ``bench tune``). Trials of live workers and of other machines are left alone."""
    from optuna.trial import TrialState
    host, n = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker") or {}
        if w.get("host") == host and w.get("pid") != os.getpid() and not _pid_alive(int(w.get("pid", 0))):
            try:
                storage.set_trial_user_attr(t._trial_id, "error", f"worker process {w.get('pid')} on {host} died")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                n += 1
            except Exception:  # noqa: BLE001 - another worker may have finished it meanwhile
                pass
    if n:
        log(f"marked {n} trial(s) of dead worker process(es) as FAIL")
    return n


def uses_budget(t, running: bool = False) -> bool:
    """COMPLETE and PRUNED trials use the budget (and RUNNING ones will); FAILed and surplus ones do not."""
    from optuna.trial import TrialState
    states = (TrialState.COMPLETE, TrialState.PRUNED) + ((TrialState.RUNNING,) if running else ())
    return t.state in states and not t.user_attrs.get("surplus")


def budget_trials(trials, budget: int) -> list:
    """The first ``budget`` trials by number that use the budget."""
    return sorted((t for t in trials if uses_budget(t)), key=lambda t: t.number)[:budget]


def summarize(study, budget: int) -> dict:
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    surplus = [t for t in trials if t.user_attrs.get("surplus")]
    counts = {s.name.lower(): sum(t.state == s and not t.user_attrs.get("surplus") for t in trials)
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    counts["surplus"] = len(surplus)
    counts["total"] = len(trials)
    counts["budget"] = budget
    considered = [t for t in budget_trials(trials, budget)
                  if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    counts["over_budget"] = max(0, counts["complete"] + counts["pruned"] - budget)
    out: Dict[str, Any] = {"trials": counts, "best": None}
    if considered:
        b = max(considered, key=lambda t: (t.value, -t.number))
        out["best"] = {"trial": b.number, "value": float(b.value), "spec": dict(b.user_attrs.get("spec", {})),
                       "hparams": dict(b.user_attrs.get("hparams", {})), "optuna_params": dict(b.params),
                       "repeat_values": dict(b.user_attrs.get("repeat_values", {}))}
    return out


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- the objective
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


# --------------------------------------------------------------------------- entry point
def tune(method: str, dataset: str = "phantom", shots: int = 3, trials: int = DEFAULT_TRIALS,
         repeats: Optional[Sequence[int]] = None, storage: Optional[str] = None,
         study_name: Optional[str] = None, iterations: int = DEFAULT_ITERATIONS, eval_every: int = 10,
         optimizer: Optional[str] = None, weight_decay: Optional[float] = None,
         foundation: Optional[str] = None, device: str = "auto", seed: Optional[int] = None,
         protocol_version: Optional[str] = None, tracking_uri: Optional[str] = None,
         tune_iterations: bool = False, log: Callable = print, verbose: bool = False,
         objective: Optional[Objective] = None) -> dict:
    """Run (or resume) the study until ``trials`` trials are COMPLETE or PRUNED, write the
    tuned-params file and return its content. ``objective`` replaces training + scoring
    (``objective(trial, specs) -> float``); it exists for tests of the study machinery only."""
    import optuna
    from optuna.trial import TrialState
    from bench.methods import METHODS
    from bench.protocols import Protocol

    method_cls = METHODS.get(method)
    if trials < 1:
        raise ValueError("--trials must be at least 1")
    protocol = Protocol.load(dataset, protocol_version)
    if repeats is None:
        repeats = range(min(DEFAULT_REPEATS, protocol.n_repeats))
    repeats = sorted({int(r) for r in repeats})
    if not repeats:
        raise ValueError("--repeats needs at least one repeat")
    for r in repeats:
        split = protocol.split(shots, r)          # validates shots and repeat
        if not split.tune:
            raise ValueError(f"{dataset} protocol {protocol.version} has no tuning cases for "
                             f"{shots}-shot repeat {r}")
        if set(split.tune) & set(split.test):
            raise TestSetAccessError(f"protocol {protocol.version}: tuning and test cases overlap")
        if set(split.tune) & set(split.support):
            raise TestSetAccessError(f"protocol {protocol.version} {shots}-shot repeat {r}: tuning cases "
                                     f"{sorted(set(split.tune) & set(split.support))} are also support cases")

    st = open_storage(storage)
    name = study_name or default_study_name(method, dataset, shots, protocol.version)
    source = f"{st.label}#{name}"
    budget = {"method": method, "dataset": dataset, "shots": shots, "protocol_version": protocol.version,
              "repeats": repeats, "iterations": iterations, "tune_iterations": bool(tune_iterations),
              "eval_every": eval_every, "optimizer": optimizer, "weight_decay": weight_decay, "seed": seed,
              "foundation": foundation,
              "lr_range": list(LR_RANGE), "objective": OBJECTIVE if objective is None else "injected"}
    log(f"study {name!r} in {st.label}  (watch: {st.dashboard_command()})")

    previous_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        probe = optuna.create_study(storage=st.storage, study_name=name, direction="maximize",
                                    load_if_exists=True)
        recorded = probe.user_attrs.get("budget")
        if recorded is None:
            probe.set_user_attr("budget", budget)
        elif recorded != budget:
            diff = {k: (recorded.get(k), budget.get(k)) for k in set(recorded) | set(budget)
                    if recorded.get(k) != budget.get(k)}
            raise ValueError(f"study {name!r} was run with a different setup "
                             f"({'; '.join(f'{k}: study {a!r}, now {b!r}' for k, (a, b) in sorted(diff.items()))}); "
                             "resume it with the same options or start another with --study-name")
        probe.set_user_attr("trials_budget", max(int(probe.user_attrs.get("trials_budget", 0)), trials))
        fail_dead_trials(probe, st.storage, log)
        existing = probe.get_trials(deepcopy=False)
        sampler = optuna.samplers.TPESampler(seed=sampler_seed(seed or 0, len(existing)), constant_liar=True)
        pruner = make_pruner(iterations)
        study = optuna.load_study(study_name=name, storage=st.storage, sampler=sampler, pruner=pruner)

        used = sum(uses_budget(t, running=True) for t in existing)
        n_new = max(0, trials - used)
        log(f"budget {trials} trials x {iterations} iterations"
            f"{' (iterations tuned)' if tune_iterations else ''} on repeat(s) {','.join(map(str, repeats))}; "
            f"{used} already done or running, {n_new} to run")

        if objective is None and n_new:
            _preflight(dataset, foundation, device, log)
        tracker = StudyTracker(tracking_uri, name, st.label,
                           params={k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in budget.items()},
                           tags={"method": method, "dataset": dataset, "shots": shots,
                                 "budget.trials": trials, "params_source": "tuning"},
                           lock_target=storage if st.kind == "rdb" else st.label)
        tracker.close_orphan_trials(name, {t.number: (t.state.name, t.user_attrs.get("error", ""))
                                           for t in probe.get_trials(deepcopy=False) if t.state.is_finished()})
        state = _Study(method=method, dataset=dataset, shots=shots, repeats=repeats, protocol=protocol, name=name,
                       trials=trials,
                       source=source, iterations=iterations, tune_iterations=tune_iterations, tracker=tracker,
                       tracking_uri=tracking_uri, run_log=log if verbose else (lambda *a, **k: None),
                       quiet=not verbose,
                       objective=objective,
                       base_spec={"seed": seed, "iterations": iterations, "eval_every": eval_every,
                                  "optimizer": optimizer, "weight_decay": weight_decay,
                                  "foundation": foundation, "device": device,
                                  "protocol_version": protocol.version},
                       step_stride=max(int(round(iterations * max(ITERATION_FACTORS))) if tune_iterations
                                       else iterations, 1))
        t_start = time.time()

        def progress(study_, ft) -> None:
            if ft.user_attrs.get("surplus"):
                log(f"trial {ft.number:>3} SURPLUS  the budget was used up by other workers; stopping")
                return
            summary = summarize(study_, trials)
            best = summary["best"]
            value = f"{ft.value:.4f}" if ft.state == TrialState.COMPLETE and ft.value is not None else "-"
            dur = (ft.datetime_complete - ft.datetime_start).total_seconds() \
                if ft.datetime_complete and ft.datetime_start else float("nan")
            c = summary["trials"]
            detail = ", ".join(f"{k}={_fmt(v)}" for k, v in ft.params.items())
            if ft.state == TrialState.PRUNED and ft.intermediate_values:
                step = max(ft.intermediate_values)
                detail += f"  [pruned at step {step}: tune pseudo-Dice {ft.intermediate_values[step]:.4f}]"
            if ft.state == TrialState.FAIL and ft.user_attrs.get("error"):
                detail += f"  [{str(ft.user_attrs['error']).splitlines()[0][:160]}]"
            best_txt = f"{best['value']:.4f} (#{best['trial']})" if best else "-"
            log(f"trial {ft.number:>3} {ft.state.name:<8} dice {value:<7} best {best_txt}  {dur:6.1f} s  "
                f"[{c['complete'] + c['pruned']}/{trials} used, {c['fail']} failed, "
                f"{time.time() - t_start:.0f} s elapsed]  {detail}")

        status = "FINISHED"
        try:
            if n_new:
                with progress_bars.trials(n_new, hide_nested=not verbose) as on_trial:
                    study.optimize(state, n_trials=n_new, catch=(Exception,),
                                   callbacks=[progress, on_trial, optuna.study.MaxTrialsCallback(
                                       trials, states=(TrialState.COMPLETE, TrialState.PRUNED))])
            if state.leak is not None:
                raise state.leak
        except BaseException:
            status = "KILLED"
            raise
        finally:
            summary = summarize(study, trials)
            out = _write_tuned(summary, budget=budget, trials=trials, study_name=name, storage=st, source=source)
            tracker.end_study(summary, out, status=status)
        c = summary["trials"]
        log(f"study {name!r}: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed "
            f"of a {trials}-trial budget")
        if summary["best"]:
            b = summary["best"]
            log(f"best trial #{b['trial']}: tune Dice {b['value']:.4f}; "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in {**b["spec"], **b["hparams"]}.items()))
            log(f"tuned parameters: {out}\nnext: bench run --method {method} --dataset {dataset} "
                f"--shots {shots} --params tuned")
        else:
            log("no trial completed: no tuned parameters written")
        if c["complete"] + c["pruned"] < trials:
            log(f"the budget is not used up ({c['fail']} failed); run the same command again to fill it")
        return {**summary, "study_name": name, "storage": st.label, "params_source": source,
                "tuned_file": str(out) if out else None}
    finally:
        optuna.logging.set_verbosity(previous_verbosity)


def sampler_seed(seed: int, n_existing: int) -> int:
    """TPE seed of one worker process: from the run seed, the trials already in the study and the
    process id. With the same seed, workers started together would propose the same start-up
    configurations (duplicated trials waste the budget), so a study is not bit-reproducible from
    ``--seed``; every trial's parameters and value are stored instead."""
    import numpy as np
    return int(np.random.SeedSequence([seed, n_existing, os.getpid()]).generate_state(1)[0])


def make_pruner(iterations: int):
    import optuna
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                       n_warmup_steps=max(0, iterations // 3))


def _preflight(dataset: str, foundation: Optional[str], device: str, log: Callable) -> None:
    """Prepare the dataset and foundation once, loudly, so trials do not all fail on them."""
    from bench.datasets import get_dataset
    from bench.foundation import get_phantom_foundation, load_foundation
    get_dataset(dataset).ensure_prepared()
    if foundation:
        load_foundation(foundation)
    else:
        get_phantom_foundation(log=log, device=device)


# --------------------------------------------------------------------------- tuned-params file
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
