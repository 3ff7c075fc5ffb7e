"""Where studies live: an Optuna journal file under $BENCH_HOME (default) or an RDB URL (docs/tuning.md, Storage)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bench.home import subdir

RDB_HEARTBEAT_S, RDB_GRACE_S = 60, 300


def journal_path() -> Path:
    return subdir("optuna") / "journal.log"


@dataclass
class StudyStorage:
    storage: Any          # optuna BaseStorage
    label: str            # journal path or URL (password hidden): recorded in params_source
    kind: str             # "journal" or "rdb"

    def dashboard_command(self) -> str:
        return f"optuna-dashboard {self.label}"


def open_storage(url: Optional[str] = None) -> StudyStorage:
    """None: the journal file under $BENCH_HOME; a path: a journal file there; ``dialect://...``: RDB."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    if url and "://" in url:
        from sqlalchemy.engine import make_url
        from bench.locks import lock
        import warnings
        label = make_url(url).render_as_string(hide_password=True)
        with warnings.catch_warnings():  # heartbeat_interval is flagged experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                with lock(url, "optuna-schema"):  # workers starting together on a fresh database
                    storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                                         heartbeat_interval=RDB_HEARTBEAT_S,
                                                         grace_period=RDB_GRACE_S)
            except ImportError as e:
                raise ValueError(f"--storage {label}: no database driver for this URL ({e}); install one, "
                                 "e.g. `pip install 'lnbench[scale]'` (psycopg 3) for postgresql://") from None
        return StudyStorage(storage, label, "rdb")
    path = Path(url).expanduser().resolve() if url else journal_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    return StudyStorage(JournalStorage(JournalFileBackend(str(path))), str(path), "journal")


def default_study_name(method: str, dataset: str, shots: int, protocol_version: str) -> str:
    return f"{method}-{dataset}-{shots}shot-{protocol_version}"
