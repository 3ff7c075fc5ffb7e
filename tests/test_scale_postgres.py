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


def _tune_worker(storage: str, tracking_uri: str, foundation: str, trials: int) -> None:
    import torch
    torch.set_num_threads(1)
    from bench import tuning
    tuning.tune(METHOD, shots=1, trials=trials, repeats=[0], iterations=2, eval_every=2, foundation=foundation,
                device="cpu", storage=storage, study_name=STUDY, tracking_uri=tracking_uri, log=lambda *a: None)
