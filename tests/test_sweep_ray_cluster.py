"""`bench sweep --executor ray --ray-address HOST:PORT` joins a Ray cluster that `ray start --head` started
(here on 127.0.0.1, with token authentication as recent Ray releases enable it), runs the cell on it, and
refuses with what to set when the driver lacks RAY_AUTH_MODE=token.

The head runs in its own session and is stopped by its process id at teardown (never `ray stop`, which
stops every Ray instance on the machine)."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'lnbench[scale]'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """(address, auth env, session folder) of a one-CPU Ray head with token authentication."""
    root = Path(tempfile.mkdtemp(prefix="ray-"))       # short: Ray's socket paths must fit 107 bytes
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    port = _free_port()
    # every port Ray would otherwise take at a fixed default (another Ray on the machine may hold it)
    ports = {opt: _free_port() for opt in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                           "--runtime-env-agent-port", "--metrics-export-port",
                                           "--ray-client-server-port")}
    cmd = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())", "start",
           "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
           "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={root / 't'}",
           *(f"{k}={v}" for k, v in ports.items())]
    log = open(root / "head.log", "w")
    head = subprocess.Popen(cmd, env={**env, **auth}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while "Ray runtime started" not in (root / "head.log").read_text():
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray start --head did not start:\n{(root / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", auth, root / "t" / "session_latest"
    finally:
        head.send_signal(signal.SIGTERM)            # `ray start --block` stops its node's processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)     # whatever is left of that session
        except ProcessLookupError:
            pass
        log.close()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _sweep(address, env, bench_home, foundation):
    cmd = [sys.executable, "-m", "bench.cli", "sweep", "--executor", "ray", "--ray-address", address,
           "--methods", "full", "--datasets", "phantom", "--shots", "1", "--repeats", "1", "--iterations", "2",
           "--foundation", str(foundation), "--device", "cpu"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run(cmd, env={**base, **env, "BENCH_HOME": str(bench_home)}, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_sweep_joins_a_token_authenticated_cluster(ray_head, bench_home, tiny_foundation):
    address, auth, session = ray_head

    # without RAY_AUTH_MODE=token Ray sends no token to an explicit address: refused, saying what to set
    refused = _sweep(address, {}, bench_home, tiny_foundation)
    assert refused.returncode == 2, refused.stderr[-3000:]
    err = refused.stderr.splitlines()[-1]
    assert err.startswith("bench sweep: error: ") and "RAY_AUTH_MODE=token" in err and "RAY_AUTH_TOKEN" in err

    joined = _sweep(address, auth, bench_home, tiny_foundation)
    assert joined.returncode == 0, joined.stdout[-3000:] + joined.stderr[-3000:]
    first = next(line for line in joined.stdout.splitlines() if line.startswith("sweep:"))
    port = address.rsplit(":", 1)[1]     # the head reports its node's address, not necessarily 127.0.0.1
    assert "to run on the Ray cluster at " in first and f":{port} (1 node(s), 1 CPU(s))" in first
    assert "done 1, skipped 0, failed 0" in joined.stdout
    results = list((bench_home / "runs" / "phantom" / "full" / "shots1").rglob("result.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["spec"]["iterations"] == 2
    # the cell ran in a worker of that head: Ray marks each task in its worker's log
    worker_logs = "".join(p.read_text(errors="replace") for p in (session / "logs").glob("worker-*.out"))
    assert ":task_name:run_cell" in worker_logs
