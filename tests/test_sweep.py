"""Sweeps: parallel local workers, idempotency, a killed cell redone, Ray and submitit executors."""
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from bench.runner import run_dir
from bench.sweep import grid, sweep

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
    assert any("FAILED dgst/phantom/1shot/r99" in line and "repeats 0..4" in line for line in lines)


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
