"""Study bookkeeping: which trials use the budget, trials of dead workers, the study's summary, the sampler
seed and the pruner (docs/tuning.md, Budget, Sampler, Pruning)."""
from __future__ import annotations

import math
import os
import socket
from typing import Any, Callable, Dict

PRUNER_STARTUP_TRIALS = 3       # MedianPruner prunes nothing before this many trials have finished


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
