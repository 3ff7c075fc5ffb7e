"""Where all state lives: one directory, ``$BENCH_HOME``.

Default ``~/.lnbench``. Holds the MLflow store, nnU-Net raw/preprocessed/results
folders, cached foundation models and run outputs. Point it anywhere (tests use
a temporary directory).
"""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = Path("~/.lnbench")


def bench_home() -> Path:
    home = Path(os.environ.get("BENCH_HOME", DEFAULT_HOME)).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def subdir(*parts: str) -> Path:
    p = bench_home().joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def default_tracking_uri() -> str:
    return f"sqlite:///{bench_home() / 'mlflow.db'}"


def configure_nnunet_env() -> None:
    """Point nnU-Net's folders into $BENCH_HOME and pick CPU-friendly defaults.

    nnunetv2 reads these variables lazily, so calling this before training is
    enough. Values already set by the user win.
    """
    for var, name in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                      ("nnUNet_results", "results")):
        os.environ.setdefault(var, str(subdir("nnunet", name)))
    os.environ.setdefault("nnUNet_compile", "f")
    # Augmentation workers are spawned processes; on a 2-core CPU box they only add overhead.
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        os.environ.setdefault("nnUNet_n_proc_DA", "0")
