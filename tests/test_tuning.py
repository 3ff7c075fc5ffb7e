"""`bench tune`: a real tiny study end to end, resume, failures, two concurrent workers, MLflow nesting,
and that tuning never reads a test case. Budgets are tiny (1-shot, 2 iterations, 1-3 trials)."""
import json
import math
import multiprocessing as mp
import socket
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from bench import tuning
from bench.tuning import StudyBudget as Budget
from bench.protocols import Protocol

PHANTOM_PROTOCOL = Protocol.load("phantom").version  # study names carry the protocol version


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One migrated MLflow store for the module (creating one costs seconds on a busy CPU)."""
    from bench.tracking import open_store
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    open_store(uri)
    return uri


def cheap_objective(trial, specs):
    """Stands in for fine-tuning + scoring in tests of the study machinery."""
    assert all(s.evaluate_on == "tune" for s in specs)
    return 1.0 - abs(math.log10(specs[0].lr) + 2.5)


def study_trials(storage, name):
    return optuna.load_study(study_name=name, storage=tuning.open_storage(storage).storage).get_trials()


def runs_of(uri, study_name):
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["lnbench"])
    return runs[runs["tags.optuna.study"] == study_name] if "tags.optuna.study" in runs else runs.iloc[:0]


class PruneTrials(optuna.pruners.BasePruner):
    def __init__(self, numbers):
        self.numbers = set(numbers)

    def prune(self, study, trial):
        return trial.number in self.numbers


@pytest.mark.slow
def test_tiny_study_end_to_end_reads_no_test_case(bench_home, tiny_foundation, tracking_uri, monkeypatch):
    """The real objective: trial 0 completes, trial 1 is pruned mid-training; no test case file is ever
    opened while tuning; the tuned file is written and `bench run --params tuned` uses it."""
    from bench.cli import main
    from bench.datasets.phantom import Phantom

    split = Protocol.load("phantom").split(1, 0)
    read = []
    lines = []
    with monkeypatch.context() as m:
        for attr in ("image_files", "label_file"):
            original = getattr(Phantom, attr)

            def recorder(self, case_id, _original=original):
                read.append(case_id)
                return _original(self, case_id)
            m.setattr(Phantom, attr, recorder)
        m.setattr(tuning.study, "make_pruner", lambda iterations: PruneTrials({1}))
        out = tuning.tune("l2sp", shots=1, budget=Budget(trials=2, repeats=[0], iterations=2, eval_every=1,
                                                         foundation=str(tiny_foundation)),
                          device="cpu", tracking_uri=tracking_uri, log=lines.append)

    # --- the test set is unreachable from tuning
    assert read, "the recorder saw no reads: the leakage check would be vacuous"
    assert not set(read) & set(split.test), f"tuning read test case(s) {sorted(set(read) & set(split.test))}"
    assert set(read) <= set(split.support + split.tune)

    # --- study: one complete, one pruned after its first of two iterations
    trials = study_trials(None, f"l2sp-phantom-1shot-{PHANTOM_PROTOCOL}")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert list(trials[1].intermediate_values) == [1]
    assert 0.0 <= trials[0].value <= 1.0
    assert any("optuna-dashboard" in line for line in lines)
    assert any(line.startswith("trial   1 PRUNED") for line in lines)

    # --- only the finished trial left a run folder, with a tuning-only result
    results = list((bench_home / "runs").rglob("result.json"))
    assert len(results) == 1
    assert len(list((bench_home / "runs" / "phantom" / "l2sp" / "shots1" / "repeat0").iterdir())) == 1
    res = json.loads(results[0].read_text())
    assert res["evaluated"] == "tune" and res["test"] == []
    assert [c["case_id"] for c in res["cases"]] == split.tune

    # --- tuned file
    tuned = json.loads((bench_home / "tuned" / "phantom" / "l2sp" / "shots1.json").read_text())
    assert tuned == json.loads(open(out["tuned_file"]).read())
    assert tuned["study_name"] == f"l2sp-phantom-1shot-{PHANTOM_PROTOCOL}"
    assert tuned["storage"] == str(bench_home / "optuna" / "journal.log")
    assert tuned["budget"]["trials"] == 2 and tuned["budget"]["iterations"] == 2
    assert tuned["trials"]["complete"] == 1 and tuned["trials"]["pruned"] == 1 and tuned["trials"]["fail"] == 0
    assert tuned["best_trial"] == 0 and tuned["best_value"] == pytest.approx(trials[0].value)
    assert tuned["spec"]["lr"] == pytest.approx(trials[0].params["lr"])
    assert set(tuned["hparams"]) == {"penalty"}

    # --- MLflow: study run, nested trial runs, the runner's run nested under trial 0
    runs = runs_of(tracking_uri, f"l2sp-phantom-1shot-{PHANTOM_PROTOCOL}")
    study = runs[runs["tags.kind"] == "study"]
    assert len(study) == 1
    study_id = study.iloc[0]["run_id"]
    assert study.iloc[0]["metrics.best_value"] == pytest.approx(tuned["best_value"])
    trial_runs = runs[runs["tags.kind"] == "trial"].sort_values("tags.optuna.trial")
    assert list(trial_runs["tags.mlflow.parentRunId"]) == [study_id, study_id]
    assert list(trial_runs["tags.state"]) == ["COMPLETE", "PRUNED"]
    assert list(trial_runs["status"]) == ["FINISHED", "KILLED"]
    mlflow.set_tracking_uri(tracking_uri)
    children = mlflow.search_runs(experiment_names=["lnbench"],
                                  filter_string=f"tags.mlflow.parentRunId = '{trial_runs.iloc[0]['run_id']}'")
    assert len(children) == 1 and children.iloc[0]["tags.bench.run_id"] == res["run_id"]

    # --- bench run --params tuned
    rc = main(["run", "--method", "l2sp", "--shots", "1", "--params", "tuned", "--iterations", "2",
               "--eval-every", "2", "--foundation", str(tiny_foundation), "--device", "cpu",
               "--tracking-uri", tracking_uri, "--no-extra-eval"])
    assert rc == 0
    final = [json.loads(p.read_text()) for p in (bench_home / "runs").rglob("result.json")]
    final = [r for r in final if r["evaluated"] == "test"]
    assert len(final) == 1
    spec = final[0]["spec"]
    assert spec["hparams"] == tuned["hparams"] and spec["lr"] == pytest.approx(tuned["spec"]["lr"])
    assert spec["params_source"] == tuned["params_source"] == f"{tuned['storage']}#l2sp-phantom-1shot-{PHANTOM_PROTOCOL}"
    cell = mlflow.get_run(final[0]["mlflow_run_id"])
    assert cell.data.tags["params_source"] == tuned["params_source"]


def test_resume_runs_only_missing_trials_and_records_failures(bench_home, tracking_uri):
    kw = dict(method="dgst", shots=1, device="cpu", tracking_uri=tracking_uri,
              objective=cheap_objective, log=lambda *a: None)
    name = f"dgst-phantom-1shot-{PHANTOM_PROTOCOL}"
    tuning.tune(budget=Budget(trials=2, iterations=2), **kw)
    assert len(study_trials(None, name)) == 2
    tuning.tune(budget=Budget(trials=3, iterations=2), **kw)  # resumed: exactly one more
    trials = study_trials(None, name)
    assert [t.number for t in trials] == [0, 1, 2] and all(t.state == TrialState.COMPLETE for t in trials)
    tuning.tune(budget=Budget(trials=3, iterations=2), **kw)  # budget used: nothing runs
    assert len(study_trials(None, name)) == 3

    def crashing(trial, specs):                      # one trial crashes, the study goes on
        if trial.number == 3:
            raise RuntimeError("simulated crash")
        return cheap_objective(trial, specs)
    out = tuning.tune(budget=Budget(trials=5, iterations=2), **{**kw, "objective": crashing})
    trials = study_trials(None, name)
    assert [t.state for t in trials[3:]] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "simulated crash" in trials[3].user_attrs["error"]
    assert out["trials"]["fail"] == 1 and out["trials"]["complete"] == 4

    def interrupted(trial, specs):                   # Ctrl+C in the middle of a trial
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        tuning.tune(budget=Budget(trials=5, iterations=2), **{**kw, "objective": interrupted})
    assert study_trials(None, name)[5].state == TrialState.FAIL

    # a worker killed outright leaves its trial RUNNING: the next `bench tune` fails it and refills
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.load_study(study_name=name, storage=tuning.open_storage(None).storage)
    orphan = study.ask()
    orphan.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid})
    out = tuning.tune(budget=Budget(trials=5, iterations=2), **kw)
    trials = study_trials(None, name)
    assert trials[orphan.number].state == TrialState.FAIL
    assert [t.state for t in trials[orphan.number + 1:]] == [TrialState.COMPLETE]
    assert out["trials"]["complete"] == 5 and out["trials"]["fail"] == 3
    tuned = tuning.load_tuned("dgst", "phantom", 1)
    assert tuned.data["trials"]["complete"] == 5 and tuned.data["budget"]["trials"] == 5
    assert tuned.spec_overrides()["hparams"] == tuned.hparams and set(tuned.hparams) == {"gamma", "penalty"}
    over = tuned.spec_overrides(explicit={"lr": 0.5, "hparams": {"gamma": 3}})
    assert over["lr"] == 0.5 and over["hparams"]["gamma"] == 3 and "overridden: lr,gamma" in over["params_source"]

    # every trial is a nested MLflow run under a study run of that study, with its state
    runs = runs_of(tracking_uri, name)
    study_ids = set(runs[runs["tags.kind"] == "study"]["run_id"])
    trial_runs = runs[runs["tags.kind"] == "trial"]
    assert len(study_ids) == 1                       # resumed studies reuse their MLflow run
    assert len(trial_runs) == len(trials) - 1        # all but the orphan made by hand above
    assert set(trial_runs["tags.mlflow.parentRunId"]) == study_ids
    failed = trial_runs[trial_runs["tags.optuna.trial"] == "3"].iloc[0]
    assert failed["tags.state"] == "FAIL" and failed["status"] == "FAILED"


def test_study_refuses_a_different_setup_and_missing_tuned_file_names_command(bench_home, tracking_uri):
    kw = dict(method="full", shots=1, device="cpu", tracking_uri=tracking_uri, objective=cheap_objective,
              log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="bench tune --method full --dataset phantom --shots 1"):
        tuning.load_tuned("full", "phantom", 1)
    tuning.tune(budget=Budget(trials=1, iterations=2), **kw)
    with pytest.raises(ValueError, match="iterations: study 2, now 4"):
        tuning.tune(budget=Budget(trials=2, iterations=4), **kw)
    assert tuning.load_tuned("full", "phantom", 1).hparams == {}


def test_test_cases_are_unreachable_by_construction():
    split = Protocol.load("phantom").split(3, 0)
    assert tuning.tuning_spec(method="dgst", evaluate_on="test").evaluate_on == "tune"
    tuning.check_no_test_cases(split.tune, split)
    with pytest.raises(tuning.TestSetAccessError):
        tuning.check_no_test_cases(split.tune + split.test[:1], split)
    with pytest.raises(tuning.TestSetAccessError):
        tuning.check_no_test_cases(split.support, split)


def _worker(storage, uri, trials):
    import torch
    torch.set_num_threads(1)

    def slow(trial, specs):
        time.sleep(0.3)
        return cheap_objective(trial, specs)
    tuning.tune("lora", shots=1, budget=Budget(trials=trials, iterations=2), device="cpu", storage=storage,
                study_name="shared", tracking_uri=uri, objective=slow, log=lambda *a: None)


def test_two_processes_share_a_study_without_losing_trials(bench_home, tracking_uri):
    storage = str(bench_home / "optuna" / "shared.log")
    budget = 6
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(storage, tracking_uri, budget)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    trials = study_trials(storage, "shared")
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))
    counted = [t for t in trials if not t.user_attrs.get("surplus")]
    assert len(counted) == budget and all(t.state == TrialState.COMPLETE for t in counted)
    assert len(trials) - len(counted) <= 1           # a surplus trial is stopped before it trains
    assert {t.user_attrs["worker"]["pid"] for t in counted} == {w.pid for w in workers}
    runs = runs_of(tracking_uri, "shared")
    trial_runs = runs[runs["tags.kind"] == "trial"]
    assert sorted(map(int, trial_runs["tags.optuna.trial"])) == [t.number for t in counted]
    assert set(trial_runs["tags.mlflow.parentRunId"]) <= set(runs[runs["tags.kind"] == "study"]["run_id"])


def test_objective_averages_several_repeats_with_the_cells_recipe_and_seed(bench_home, tracking_uri):
    """Default: the first DEFAULT_REPEATS repeats' tuning sets, one spec per repeat, each evaluated on the
    tuning split only, with the optimizer, weight decay, seed and eval_every the caller gave."""
    seen = []

    def objective(trial, specs):
        seen.append(specs)
        return cheap_objective(trial, specs)
    out = tuning.tune("dgst", shots=1, budget=Budget(trials=2, iterations=2, eval_every=1, optimizer="sgd",
                                                     weight_decay=1e-4, seed=5),
                      device="cpu", tracking_uri=tracking_uri, objective=objective, log=lambda *a: None)
    assert tuning.DEFAULT_REPEATS >= 3
    for specs in seen:
        assert [s.repeat for s in specs] == list(range(tuning.DEFAULT_REPEATS))
        assert {(s.evaluate_on, s.optimizer, s.weight_decay, s.seed, s.eval_every) for s in specs} == \
            {("tune", "sgd", 1e-4, 5, 1)}
        assert len({s.lr for s in specs}) == 1  # one configuration per trial, scored on every repeat
    tuned = tuning.load_tuned("dgst", "phantom", 1).data
    assert tuned["budget"]["repeats"] == list(range(tuning.DEFAULT_REPEATS)) and out["best"] is not None
    assert (tuned["budget"]["optimizer"], tuned["budget"]["seed"], tuned["budget"]["eval_every"]) == ("sgd", 5, 1)
    protocol = Protocol.load("phantom")
    for r in range(tuning.DEFAULT_REPEATS):  # never validating on what the trial trains on
        split = protocol.split(1, r)
        assert not set(split.tune) & set(split.support)


def test_dgst_search_space_reaches_the_no_penalty_recipe():
    from bench.methods import METHODS
    for name in ("dgst", "dgst-random", "dgst-static"):
        space = METHODS.get(name).search_space
        assert space(optuna.trial.FixedTrial({"penalty_on": False, "gamma": 2})) == {"gamma": 2, "penalty": 0.0}
        on = space(optuna.trial.FixedTrial({"penalty_on": True, "gamma": 4, "penalty": 1e-3}))
        assert on == {"gamma": 4, "penalty": 1e-3}
    # and a sampler does propose it
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: METHODS.get("dgst").search_space(t)["penalty"], n_trials=20)
    assert any(t.value == 0.0 for t in study.trials) and any(t.value > 0 for t in study.trials)


def test_bench_tune_passes_its_options_as_one_study_budget(monkeypatch):
    from bench.cli import main
    seen = {}
    monkeypatch.setattr(tuning, "tune", lambda method, **kw: seen.update(method=method, **kw))  # no study
    assert main(["tune", "--method", "dgst", "--shots", "1", "--trials", "4", "--repeats", "0,1", "--iterations", "6",
                 "--tune-iterations", "--eval-every", "3", "--optimizer", "sgd", "--seed", "2"]) == 0
    assert seen["method"] == "dgst" and seen["shots"] == 1
    assert seen["budget"] == Budget(trials=4, repeats=[0, 1], iterations=6, tune_iterations=True, eval_every=3,
                                    optimizer="sgd", weight_decay=None, seed=2, foundation=None)
