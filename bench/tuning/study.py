"""``tune``: run (or resume) one study until its trial budget is used, then write the tuned parameters."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from bench import progress as progress_bars
from bench.tracking import StudyTracker
from bench.tuning.bookkeeping import fail_dead_trials, make_pruner, sampler_seed, summarize, uses_budget
from bench.tuning.objective import (ITERATION_FACTORS, LR_RANGE, OBJECTIVE, Objective, TestSetAccessError,
                                    _Study)
from bench.tuning.storage import default_study_name, open_storage
from bench.tuning.tuned import _write_tuned

DEFAULT_TRIALS = 20             # the same trial budget for every method
DEFAULT_REPEATS = 3             # the objective averages the first 3 repeats' tuning sets


@dataclass(frozen=True)
class StudyBudget:
    """What a study spends and what every trial shares: the trial budget, the repeats the objective
    averages, iterations per trial, and the recipe, seed, ``eval_every`` and foundation of every run.
    All but ``trials`` are recorded in the study, which is resumed only with the same values."""
    trials: int = DEFAULT_TRIALS
    repeats: Optional[Sequence[int]] = None     # None: the protocol's first DEFAULT_REPEATS repeats
    iterations: Optional[int] = None            # None (iterations, eval_every): the dataset's budget, as `bench run`
    tune_iterations: bool = False               # also search the iterations (ITERATION_FACTORS x iterations)
    eval_every: Optional[int] = None
    optimizer: Optional[str] = None             # None (optimizer, weight decay): the method's recipe
    weight_decay: Optional[float] = None
    seed: Optional[int] = None                  # None: derived per repeat
    foundation: Optional[str] = None            # None: the phantom foundation


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def tune(method: str, dataset: str = "phantom", shots: int = 3, budget: Optional[StudyBudget] = None, *,
         storage: Optional[str] = None, study_name: Optional[str] = None, device: str = "auto",
         protocol_version: Optional[str] = None, tracking_uri: Optional[str] = None, log: Callable = print,
         verbose: bool = False, objective: Optional[Objective] = None) -> dict:
    """Run (or resume) the study until ``budget.trials`` trials are COMPLETE or PRUNED, write the
    tuned-params file and return its content. ``objective`` replaces training + scoring
    (``objective(trial, specs) -> float``); it exists for tests of the study machinery only."""
    import optuna
    from optuna.trial import TrialState
    from bench.methods import METHODS
    from bench.protocols import Protocol

    budget = budget or StudyBudget()
    trials, repeats, iterations, tune_iterations = (budget.trials, budget.repeats, budget.iterations,
                                                    budget.tune_iterations)
    eval_every, optimizer, weight_decay = budget.eval_every, budget.optimizer, budget.weight_decay
    if iterations is None or eval_every is None:  # the dataset's budget, as `bench run` resolves it
        from bench.runner import RunSpec
        default = RunSpec(method=method, dataset=dataset, shots=shots, protocol_version=protocol_version)
        iterations = default.iterations if iterations is None else iterations
        eval_every = default.eval_every if eval_every is None else eval_every
    seed, foundation = budget.seed, budget.foundation
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
    setup = {"method": method, "dataset": dataset, "shots": shots, "protocol_version": protocol.version,
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
            probe.set_user_attr("budget", setup)
        elif recorded != setup:
            diff = {k: (recorded.get(k), setup.get(k)) for k in set(recorded) | set(setup)
                    if recorded.get(k) != setup.get(k)}
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
                           params={k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in setup.items()},
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
            out = _write_tuned(summary, budget=setup, trials=trials, study_name=name, storage=st, source=source)
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


def _preflight(dataset: str, foundation: Optional[str], device: str, log: Callable) -> None:
    """Prepare the dataset and foundation once, loudly, so trials do not all fail on them."""
    from bench.datasets import get_dataset
    from bench.foundation import get_foundation
    get_dataset(dataset).ensure_prepared()
    get_foundation(foundation, log=log, device=device)
