"""bench/locks.py: the cross-process lock around table creation and a study's MLflow run."""
import threading
import time

from bench.locks import is_database_url, lock


def max_inside(target, workers: int = 4) -> int:
    """How many threads were inside ``lock(target)`` at once (each takes its own file/connection)."""
    inside, seen, guard = [0], [], threading.Lock()

    def work():
        with lock(target, "test"):
            with guard:
                inside[0] += 1
                seen.append(inside[0])
            time.sleep(0.05)
            with guard:
                inside[0] -= 1
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(seen) == workers
    return max(seen)


def test_file_and_sqlite_locks_exclude_and_servers_are_not_locked(tmp_path):
    assert max_inside("http://mlflow-server:5000") > 1       # no lock there: the probe sees overlap
    assert max_inside(str(tmp_path / "optuna" / "journal.log")) == 1
    assert (tmp_path / "optuna" / "journal.log.bench-lock").is_file()
    assert max_inside(f"sqlite:///{tmp_path / 'mlflow.db'}") == 1
    assert is_database_url("postgresql+psycopg://u@h/db") and is_database_url("sqlite:///x.db")
    assert not is_database_url("http://mlflow-server:5000") and not is_database_url("/tmp/journal.log")
