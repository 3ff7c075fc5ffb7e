"""``bench tune``: Optuna hyper-parameter search on the tuning-validation split.

How a study works (objective, search space, budget, sampler, pruning, storage, tracking, result) and why:
docs/tuning.md. study.py: ``tune``; objective.py: one trial; bookkeeping.py: budget and trial states;
storage.py: where studies live; tuned.py: the tuned-parameter files.
"""
from bench.tuning.bookkeeping import budget_trials, fail_dead_trials, summarize, uses_budget
from bench.tuning.objective import (ITERATION_FACTORS, LR_RANGE, OBJECTIVE, TestSetAccessError, check_no_test_cases,
                                    suggest, tuning_spec)
from bench.tuning.storage import StudyStorage, default_study_name, journal_path, open_storage
from bench.tuning.study import DEFAULT_REPEATS, DEFAULT_TRIALS, StudyBudget, tune
from bench.tuning.tuned import TUNED_SCHEMA_VERSION, TunedParams, apply_tuned, load_tuned, tuned_path

__all__ = ["DEFAULT_REPEATS", "DEFAULT_TRIALS", "ITERATION_FACTORS", "LR_RANGE", "OBJECTIVE",
           "TUNED_SCHEMA_VERSION", "StudyBudget", "StudyStorage", "TestSetAccessError", "TunedParams",
           "apply_tuned", "budget_trials", "check_no_test_cases", "default_study_name", "fail_dead_trials",
           "journal_path", "load_tuned", "open_storage", "suggest", "summarize", "tune", "tuned_path",
           "tuning_spec", "uses_budget"]
