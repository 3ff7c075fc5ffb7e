"""A database server shared by many workers (Optuna's RDB storage, MLflow's backend store).

Optuna and MLflow create (and alembic-stamp) their tables on first use. Workers started together on a
fresh PostgreSQL database race there: all but one fail with ``duplicate key value violates unique
constraint "pg_type_typname_nsp_index"`` or ``type "studydirection" already exists``. ``schema_lock``
serialises that step with a server-side advisory lock (PostgreSQL ``pg_advisory_lock``, MySQL/MariaDB
``GET_LOCK``), which holds across machines; it is a no-op for every other URL (SQLite files, servers).
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

DB_SCHEMES = ("postgresql", "mysql", "mariadb", "mssql", "sqlite")   # SQLAlchemy URLs, optionally "+driver"
_LOCKING = ("postgresql", "mysql", "mariadb")
LOCK_TIMEOUT_S = 600


def scheme(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0].lower() if "://" in url else ""


def is_database_url(url: str) -> bool:
    return scheme(url) in DB_SCHEMES


@contextlib.contextmanager
def schema_lock(url: str, name: str) -> Iterator[None]:
    """Hold the lock ``name`` on the database server of ``url`` (if it has one) for the block."""
    backend = scheme(url)
    if backend not in _LOCKING:
        yield
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool
    engine = create_engine(url, poolclass=NullPool)
    key = f"lnbench:{name}"
    try:
        with engine.connect() as conn:
            if backend == "postgresql":
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
