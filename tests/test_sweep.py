"""Sweeps: parallel local workers, idempotency, a killed cell redone, Ray and submitit executors."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from bench.protocols import Protocol
from bench.runner import run_dir
from bench.sweep import grid, is_done, sweep, tuned_spec

TINY = dict(iterations=2, eval_every=2, device="cpu")


def finished_runs(home):
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lnbench"], filter_string="tags.kind = 'cell'")
    return runs[runs["status"] == "FINISHED"]


@pytest.mark.slow
def test_local_grid_two_workers_then_nothing_to_do(bench_home, tiny_foundation):
    specs = grid(["dgst", "full"], ["phantom"], [1], [0], foundation=str(tiny_foundation), **TINY)
    outcomes = sweep(specs, executor="local", workers=2, log=lambda *_: None)
    assert sorted(o.status for o in outcomes) == ["done"] * 2, [o.error for o in outcomes]
    assert all((run_dir(s) / "result.json").is_file() for s in specs)
    again = sweep(specs, executor="local", workers=2, log=lambda *_: None)
    assert [o.status for o in again] == ["skipped"] * 2
    runs = finished_runs(bench_home)
    assert len(runs) == 2 and runs["tags.bench.run_id"].is_unique


@pytest.mark.slow
def test_killed_cell_is_redone_and_logged_once(bench_home, tiny_foundation):
    spec = grid(["full"], ["phantom"], [1], [2], foundation=str(tiny_foundation), iterations=20,
                eval_every=2, device="cpu")[0]
    env = {**os.environ, "BENCH_HOME": str(bench_home)}
    one = [sys.executable, "-c",
           "import sys; from bench.sweep import grid, sweep; "
           f"sweep(grid(['full'], ['phantom'], [1], [2], foundation={str(tiny_foundation)!r}, iterations=20, "
           "eval_every=2, device='cpu'))"]
    proc = subprocess.Popen(one, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = run_dir(spec) / "cell.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and " it " in log.read_text()):
        time.sleep(0.5)
    assert log.is_file(), "the cell never started training"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir(spec) / "result.json").exists()  # a killed cell leaves no result

    short = grid(["full"], ["phantom"], [1], [2], foundation=str(tiny_foundation), iterations=20,
                 eval_every=2, device="cpu")
    outcomes = sweep(short, executor="local", workers=1, log=lambda *_: None)
    assert [o.status for o in outcomes] == ["done"], outcomes[0].error
    runs = finished_runs(bench_home)
    assert list(runs["tags.bench.run_id"]) == [spec.run_id()]


@pytest.mark.slow
def test_ray_local_and_submitit_local_executors(bench_home, tiny_foundation):
    pytest.importorskip("ray")
    pytest.importorskip("submitit")
    specs = grid(["dgst"], ["phantom"], [1], [0, 1], foundation=str(tiny_foundation), **TINY)
    ray_out = sweep(specs[:1], executor="ray", workers=1, log=lambda *_: None)
    assert [o.status for o in ray_out] == ["done"], ray_out[0].error
    sub_out = sweep(specs, executor="slurm", workers=1, slurm={"cluster": "local", "timeout_min": 10},
                    log=lambda *_: None)
    assert sorted(o.status for o in sub_out) == ["done", "skipped"], [o.error for o in sub_out]
    assert len(finished_runs(bench_home)) == 2


def test_failed_cell_does_not_stop_others(bench_home, tiny_foundation):
    specs = grid(["dgst"], ["phantom"], [1], [0], foundation=str(tiny_foundation), **TINY)
    specs += grid(["dgst"], ["phantom"], [1], [99], foundation=str(tiny_foundation), **TINY)  # no repeat 99
    lines = []
    outcomes = sweep(specs, executor="local", workers=1, log=lines.append)
    status = {o.key: o.status for o in outcomes}
    assert status == {"dgst/phantom/1shot/r0": "done", "dgst/phantom/1shot/r99": "failed"}
    assert any("FAILED dgst/phantom/1shot/r99" in line and "repeats 0..9" in line for line in lines)
    assert any(line.startswith("[1/2 done, 1 running, ") and "ETA" in line for line in lines)
    # the worker's progress goes to its cell log, never to the sweep's terminal
    assert "training: 2/2 it (100%)" in (run_dir(specs[0]) / "cell.log").read_text()


def test_cpu_workers_split_the_cores(monkeypatch):
    import torch

    from bench.sweep import _share_cpus

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "2")  # restored after the test
    before = torch.get_num_threads()
    try:
        _share_cpus(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_tuned_cell_is_done_only_with_its_tuned_run(bench_home, tiny_foundation):
    """With tuning, the done-check looks where the tuned run writes: the spec with the tuned parameters
    of a study run with this cell's set-up."""
    import json
    spec = grid(["dgst"], ["phantom"], [1], [0], foundation=str(tiny_foundation), seed=3, **TINY)[0]
    assert tuned_spec(spec, 0) is spec and tuned_spec(spec, 2) is None and not is_done(spec, 2)
    budget = {"trials": 2, "iterations": 2, "eval_every": 2, "optimizer": None, "weight_decay": None, "seed": 3,
              "foundation": str(tiny_foundation), "repeats": [0, 1, 2], "tune_iterations": False}
    version = Protocol.load("phantom").version
    tuned = {"schema_version": 1, "protocol_version": version, "budget": budget, "spec": {"lr": 2e-3},
             "hparams": {"gamma": 4, "penalty": 0.0}, "params_source": f"journal#dgst-phantom-1shot-{version}"}
    path = bench_home / "tuned" / "phantom" / "dgst" / "shots1.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(tuned))
    final = tuned_spec(spec, 2)
    assert (final.lr, final.hparams, final.params_source) == (2e-3, tuned["hparams"], tuned["params_source"])
    assert not is_done(spec, 2)
    (run_dir(final) / "result.json").write_text("{}")
    assert is_done(spec, 2) and not is_done(spec, 0)  # the untuned cell is another run
    assert not is_done(spec, 3)  # another trial budget: another study set-up
    path.write_text(json.dumps({**tuned, "budget": {**budget, "seed": 4}}))
    assert not is_done(spec, 2)


@pytest.mark.slow
def test_second_tuned_sweep_does_nothing(bench_home, tiny_foundation):
    """A sweep with tuning, run twice: the second skips every cell, adds no trial and no run; the study
    ran with the cells' optimizer, seed and eval_every."""
    import json

    import optuna

    from bench import tuning
    specs = grid(["l2sp"], ["phantom"], [1], [0, 1], foundation=str(tiny_foundation), optimizer="sgd", seed=11,
                 iterations=2, eval_every=1, device="cpu")
    first = sweep(specs, executor="local", workers=1, tune_trials=1, log=lambda *_: None)
    assert sorted(o.status for o in first) == ["done", "done"], [o.error for o in first]
    runs_before = sorted(str(p) for p in (bench_home / "runs").rglob("result.json"))
    again = sweep(specs, executor="local", workers=1, tune_trials=1, log=lambda *_: None)
    assert [o.status for o in again] == ["skipped", "skipped"]
    assert sorted(str(p) for p in (bench_home / "runs").rglob("result.json")) == runs_before
    study = optuna.load_study(study_name=f"l2sp-phantom-1shot-{Protocol.load('phantom').version}", storage=tuning.open_storage(None).storage)
    assert len(study.trials) == 1
    budget = tuning.load_tuned("l2sp", "phantom", 1).data["budget"]
    assert (budget["optimizer"], budget["seed"], budget["eval_every"]) == ("sgd", 11, 1)
    results = [json.loads(p.read_text()) for p in map(Path, runs_before)]
    tests = [r for r in results if r["evaluated"] == "test"]
    assert sorted(r["spec"]["repeat"] for r in tests) == [0, 1]
    assert {r["spec"]["params_source"] for r in tests} == {tuning.load_tuned("l2sp", "phantom", 1).source}
    assert {(r["spec"]["optimizer"], r["spec"]["seed"]) for r in results} == {("sgd", 11)}


def test_slurm_without_slurm_is_refused_naming_the_local_executor(bench_home, tmp_path, monkeypatch, capsys):
    from bench.cli import main
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun / sbatch, as on this machine
    rc = main(["sweep", "--executor", "slurm", "--methods", "full", "--shots", "1", "--repeats", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "SLURM is not available" in err and "--executor local" in err, err
    assert not (bench_home / "runs").exists()  # refused before anything ran


def test_ray_address_without_ray_is_refused(bench_home, capsys):
    from bench.cli import main
    assert main(["sweep", "--methods", "full", "--shots", "1", "--repeats", "1",
                 "--ray-address", "127.0.0.1:6379"]) == 2
    assert "--ray-address is for --executor ray" in capsys.readouterr().err



def test_bench_run_and_a_tuned_sweep_cell_apply_tuned_parameters_alike(bench_home, monkeypatch):
    """`bench run --params tuned` and a tuned sweep cell read one tuned-params file into the same spec:
    the tuned lr, hyper-parameters, iterations (searched by this study) and params_source."""
    import json
    from bench.cli import main
    version = Protocol.load("phantom").version
    budget = {"trials": 2, "iterations": 4, "eval_every": 2, "optimizer": None, "weight_decay": None, "seed": 3,
              "foundation": None, "repeats": [0, 1, 2], "tune_iterations": True}
    tuned = {"schema_version": 1, "protocol_version": version, "budget": budget,
             "spec": {"lr": 2e-3, "iterations": 8}, "hparams": {"gamma": 4, "penalty": 0.0},
             "params_source": f"journal#dgst-phantom-1shot-{version}"}
    path = bench_home / "tuned" / "phantom" / "dgst" / "shots1.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(tuned))

    class Ran(Exception):
        pass

    def run(spec, **kwargs):  # the spec `bench run` would train
        raise Ran(spec)
    monkeypatch.setattr("bench.runner.run", run)
    with pytest.raises(Ran) as ran:
        main(["run", "--method", "dgst", "--shots", "1", "--iterations", "4", "--eval-every", "2", "--seed", "3",
              "--params", "tuned"])
    from_run = ran.value.args[0]
    from_sweep = tuned_spec(grid(["dgst"], ["phantom"], [1], [0], iterations=4, eval_every=2, seed=3)[0], 2)
    assert (from_sweep.lr, from_sweep.hparams, from_sweep.iterations, from_sweep.params_source) == \
        (2e-3, tuned["hparams"], 8, tuned["params_source"])
    assert from_run == from_sweep
