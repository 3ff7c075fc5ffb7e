"""Locks held across processes (and machines) for what workers must not do twice at once.

Optuna and MLflow create (and alembic-stamp) their tables on first use. Workers started together on a
fresh PostgreSQL database race there: all but one fail with ``duplicate key value violates unique
constraint "pg_type_typname_nsp_index"`` or ``type "studydirection" already exists``. Workers joining one
study race to create its MLflow study run (each finds none, each creates one). ``lock`` serialises such
steps: on a database server, with a server-side advisory lock (PostgreSQL ``pg_advisory_lock``,
MySQL/MariaDB ``GET_LOCK``), which holds across machines; next to a file (the Optuna journal, a SQLite database), with an
``flock`` on a sibling lock file; for anything else (tracking servers) it is a no-op.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Iterator, Optional

DB_SCHEMES = ("postgresql", "mysql", "mariadb", "mssql", "sqlite")   # SQLAlchemy URLs, optionally "+driver"
_SERVER_LOCKS = ("postgresql", "mysql", "mariadb")
LOCK_TIMEOUT_S = 600


def scheme(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0].lower() if "://" in url else ""


def is_database_url(url: str) -> bool:
    return scheme(url) in DB_SCHEMES


@contextlib.contextmanager
def lock(target: Optional[str], name: str) -> Iterator[None]:
    """Hold the lock ``name`` for the block: on the database server of the URL ``target``, or on a lock
    file next to the file path ``target``."""
    if target and "://" not in target:
        with _file_lock(Path(target)):
            yield
    elif target and scheme(target) == "sqlite" and _sqlite_path(target):
        with _file_lock(_sqlite_path(target)):
            yield
    elif target and scheme(target) in _SERVER_LOCKS:
        with _server_lock(target, f"lnbench:{name}"):
            yield
    else:
        yield


def _sqlite_path(url: str) -> Optional[Path]:
    from sqlalchemy.engine import make_url
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl
    lock_file = path.with_name(path.name + ".bench-lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _server_lock(url: str, key: str) -> Iterator[None]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if scheme(url) == "postgresql":
                lock_id = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock_id})
                unlock = text("SELECT pg_advisory_unlock(:k)"), {"k": lock_id}
            else:
                got = conn.execute(text("SELECT GET_LOCK(:n, :t)"), {"n": key, "t": LOCK_TIMEOUT_S}).scalar()
                if got != 1:
                    raise TimeoutError(f"{key}: no lock on the database server after {LOCK_TIMEOUT_S} s")
                unlock = text("SELECT RELEASE_LOCK(:n)"), {"n": key}
            try:
                yield
            finally:
                conn.execute(*unlock)
    finally:
        engine.dispose()
