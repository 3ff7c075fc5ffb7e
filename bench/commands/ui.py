"""``bench ui``: MLflow's UI on the suite's tracking store, optionally optuna-dashboard on the study storage."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from bench.options import port


def register(sub) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on $BENCH_HOME's store (and optuna-dashboard with --optuna)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=port, default=5000, help="MLflow UI port (default 5000)")
    p.add_argument("--tracking-uri", default=None, help="MLflow backend store (default: $BENCH_HOME/mlflow.db)")
    p.add_argument("--optuna", action="store_true", help="also start optuna-dashboard on the tuning storage")
    p.add_argument("--optuna-port", type=port, default=8080)
    p.add_argument("--storage", default=None, help="Optuna storage (default: $BENCH_HOME/optuna/journal.log)")
    p.set_defaults(func=main)


def commands(args) -> list:
    """The processes ``bench ui`` starts, as argument lists (tested without starting them)."""
    from bench.home import bench_home, default_tracking_uri
    uri = args.tracking_uri or default_tracking_uri()
    cmds = [[sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
             "--default-artifact-root", (bench_home() / "mlartifacts").as_uri(),
             "--host", args.host, "--port", str(args.port), "--workers", "1"]]
    if args.optuna:
        exe = shutil.which("optuna-dashboard")
        if exe is None:
            raise ValueError("--optuna needs optuna-dashboard: pip install optuna-dashboard")
        from bench.tuning import journal_path
        cmds.append([exe, args.storage or str(journal_path()), "--host", args.host, "--port", str(args.optuna_port)])
    return cmds


def main(args) -> int:
    cmds = commands(args)
    # MLflow 3's server also starts job-runner processes (one per CPU); the suite submits no jobs.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    # own process groups: stopping the UI stops the server's worker processes too
    procs = [subprocess.Popen(c, env=env, start_new_session=True) for c in cmds]
    print(f"MLflow UI: http://{args.host}:{args.port}")
    if args.optuna:
        print(f"optuna-dashboard: http://{args.host}:{args.optuna_port}")
    print("Ctrl-C stops them.", flush=True)
    stop = []
    # explicit handlers: a shell that starts us in the background leaves SIGINT ignored, so Python's own
    # KeyboardInterrupt would never come
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    try:
        while not stop and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # a server that ignores SIGTERM
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    failed = [p.returncode for p in procs if p.returncode and p.returncode > 0]
    return failed[0] if failed else 0
