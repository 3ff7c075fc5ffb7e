"""`bench ui` serves MLflow's UI on the suite's store (started for real on the loopback interface)."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from bench.cli import build_parser
from bench.commands.ui import commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_commands_point_at_bench_home(bench_home):
    args = build_parser().parse_args(["ui", "--port", "5123"])
    (mlflow_cmd,) = commands(args)
    assert f"sqlite:///{bench_home.resolve() / 'mlflow.db'}" in mlflow_cmd
    assert mlflow_cmd[-6:-2] == ["--host", "127.0.0.1", "--port", "5123"]
    with pytest.raises(SystemExit):  # refused while parsing (bench.options.port; tests/test_options.py)
        build_parser().parse_args(["ui", "--port", "0"])


@pytest.mark.slow
def test_ui_serves_the_store(bench_home):
    port = _free_port()
    env = {**os.environ, "BENCH_HOME": str(bench_home)}
    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    status = r.status
                    break
            except OSError:
                time.sleep(1)
        assert status == 200, f"MLflow UI did not answer on port {port}"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert f"MLflow UI: http://127.0.0.1:{port}" in out
