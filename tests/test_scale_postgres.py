"""Many workers on one PostgreSQL server, as the README tells multi-machine users to run: the Optuna study
in an RDB storage (``bench tune --storage postgresql://...``) and MLflow's backend store in the same server.
Four worker processes tune one study through the suite's real tuning path (tiny foundation, 2 iterations);
one is SIGKILLed mid-trial. No trial or MLflow run may be lost or duplicated, the killed trial ends FAIL
and the study can be continued to its full budget.

The server is a throw-away cluster (initdb into a temporary folder, loopback only, a free port), run as
the ``postgres`` user when the tests run as root (postgres refuses to run as root)."""
import glob
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

WORKERS = 4
BUDGET = 8          # trials: two per worker
STUDY = "pg-shared"
METHOD = "full"
HOLD_S = 1.0       # seconds per trial: long enough to be caught mid-trial


def _pg_bin() -> Path:
    """The folder with initdb / pg_ctl: PATH first, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not candidates:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin); "
                    "install Debian's `postgresql` package (.ci/run does so when it runs as root)")
    return Path(candidates[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl start on 127.0.0.1:<free port>, trust authentication for the user ``bench``."""

    def __init__(self):
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="lnbench-pg-"))   # short: the socket path must fit 107 bytes
        self.data = self.root / "data"
        self.as_user = []
        if os.geteuid() == 0:
            import pwd
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                user = pwd.getpwnam("nobody")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", user.pw_name, "--"]
        self.port = None

    def _run(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, *map(str, args)], capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        r = self._run(self.bin / "initdb", "-D", self.data, "-U", "bench", "--auth=trust", "-E", "UTF8",
                      "--no-sync")
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stderr or r.stdout}")
        for _ in range(3):  # the free port may be taken between the probe and the start
            self.port = _free_port()
            opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                    "-c max_connections=200")
            r = self._run(self.bin / "pg_ctl", "-D", self.data, "-o", opts, "-l", self.root / "server.log",
                          "-w", "-t", "60", "start")
            if r.returncode == 0:
                return
        log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {r.stderr or r.stdout}\n{log[-2000:]}")

    def stop(self) -> None:
        if self.port is not None:
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql://bench@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="module")
def postgres():
    # SQLAlchemy 2.1's driver for postgresql:// URLs is psycopg 3
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'lnbench[scale]' "
                                          "(psycopg[binary])")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _objective(trial, specs) -> float:
    """Stands in for fine-tuning + scoring (the real one costs ~40 s per trial on a busy 2-core machine,
    too much for 4 processes): what is under test is the suite's study bookkeeping and tracking."""
    import math
    assert all(s.evaluate_on == "tune" for s in specs)
    time.sleep(HOLD_S)
    return 1.0 - abs(math.log10(specs[0].lr) + 2.5)


def _tune(storage: str, tracking_uri: str) -> dict:
    from bench import tuning
    budget = tuning.StudyBudget(trials=BUDGET, repeats=[0], iterations=2)
    return tuning.tune(METHOD, shots=1, budget=budget, device="cpu", storage=storage,
                       study_name=STUDY, tracking_uri=tracking_uri, objective=_objective, log=lambda *a: None)


def _tune_worker(storage: str, tracking_uri: str) -> None:
    import torch
    torch.set_num_threads(1)
    _tune(storage, tracking_uri)


def _victim(storage, tracking_uri, workers):
    """The first worker seen mid-trial: its trial RUNNING in the study and its MLflow trial run created.
    Returns (process, trial number)."""
    import mlflow
    import optuna
    from bench import tuning
    from optuna.trial import TrialState
    rdb = tuning.open_storage(storage).storage
    client = mlflow.MlflowClient(tracking_uri)
    by_pid = {w.pid: w for w in workers}
    deadline = time.time() + 240
    while time.time() < deadline:
        try:
            running = optuna.load_study(study_name=STUDY, storage=rdb).get_trials(
                deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # no worker has created the study yet
            running = []
        for t in running:
            pid = (t.user_attrs.get("worker") or {}).get("pid")
            if pid in by_pid and "spec" in t.user_attrs and client.search_runs(
                    client.get_experiment_by_name("lnbench").experiment_id,
                    f"tags.`optuna.study` = '{STUDY}' and tags.`optuna.trial` = '{t.number}'"):
                return by_pid[pid], t.number
        if not any(w.is_alive() for w in workers):
            break
        time.sleep(0.05)
    pytest.fail("no worker was seen in the middle of a trial")


@pytest.mark.slow
def test_four_workers_one_killed_mid_trial_lose_and_duplicate_nothing(postgres, bench_home):
    import mlflow
    import optuna
    from optuna.trial import TrialState
    from bench import tuning

    storage, tracking_uri = postgres.create_database("optuna"), postgres.create_database("mlflow")
    t0 = time.time()
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_tune_worker, args=(storage, tracking_uri)) for _ in range(WORKERS)]
    try:
        for w in workers:    # a fresh database: the workers also race to create Optuna's and MLflow's tables
            w.start()
        victim, killed = _victim(storage, tracking_uri, workers)
        os.kill(victim.pid, signal.SIGKILL)
        for w in workers:
            w.join(timeout=300)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
    assert {w.pid: w.exitcode for w in workers} == {w.pid: -signal.SIGKILL if w is victim else 0 for w in workers}
    wall = time.time() - t0

    study = optuna.load_study(study_name=STUDY, storage=tuning.open_storage(storage).storage)
    assert study.trials[killed].state == TrialState.RUNNING          # nobody has noticed yet
    # the survivors counted the dead worker's trial against the budget and stopped
    assert sum(tuning.uses_budget(t, running=True) for t in study.trials) == BUDGET

    out = _tune(storage, tracking_uri)                               # the study continues
    trials = optuna.load_study(study_name=STUDY, storage=tuning.open_storage(storage).storage).trials
    assert [t.number for t in trials] == list(range(len(trials)))
    dead = trials[killed]
    assert dead.state == TrialState.FAIL and f"worker process {victim.pid}" in dead.user_attrs["error"]
    counted = [t for t in trials if not t.user_attrs.get("surplus")]
    complete = [t for t in counted if t.state == TrialState.COMPLETE]
    assert len(complete) == BUDGET and [t.number for t in counted if t not in complete] == [killed]
    assert out["trials"]["complete"] == BUDGET and out["trials"]["fail"] == 1
    assert len({t.user_attrs["worker"]["pid"] for t in counted}) >= 3   # the work was shared

    # MLflow: one study run, one trial run per trial that trained, each ending as its trial did
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["lnbench"], filter_string=f"tags.`optuna.study` = '{STUDY}'")
    study_runs = runs[runs["tags.kind"] == "study"]
    trial_runs = runs[runs["tags.kind"] == "trial"]
    assert len(study_runs) == 1, f"{len(study_runs)} study runs for one study"
    assert sorted(map(int, trial_runs["tags.optuna.trial"])) == [t.number for t in counted]
    assert set(trial_runs["tags.mlflow.parentRunId"]) == set(study_runs["run_id"])
    state = dict(zip(map(int, trial_runs["tags.optuna.trial"]), zip(trial_runs["tags.state"], trial_runs["status"])))
    assert state[killed] == ("FAIL", "FAILED")
    assert all(state[t.number] == ("COMPLETE", "FINISHED") for t in complete)
    assert study_runs.iloc[0]["metrics.trials_complete"] == BUDGET
    print(f"\n{WORKERS} workers, budget {BUDGET}: {len(trials)} trials recorded ({len(complete)} complete, 1 killed "
          f"-> FAIL, {len(trials) - len(counted)} surplus), {len(trial_runs)} MLflow trial runs for "
          f"{len(counted)} trials that ran, {len(study_runs)} study run; workers {wall:.1f} s, "
          f"total {time.time() - t0:.1f} s")


def test_postgres_advisory_lock_excludes(postgres):
    from test_locks import max_inside
    url = postgres.create_database("locks")
    assert max_inside(url) == 1
