"""Where a number came from: foundation checkpoint hash, code commit, package versions, seed.

``checkpoint_sha256`` hashes a checkpoint file once and caches the digest in
``$BENCH_HOME/foundations/sha256.json`` keyed by path, size and modification time
(a changed file is hashed again). ``derive_seed`` is the documented per-repeat seed.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional

import bench
from bench.home import subdir

PACKAGES = ("torch", "nnunetv2", "peft", "monai", "numpy", "optuna", "mlflow")


def derive_seed(dataset: str, protocol_version: str, repeat: int) -> int:
    """The training seed of a repeat: the first 4 bytes of sha256("<dataset>/<version>/repeat<r>"), as an int.

    Stable across machines and Python processes (unlike ``hash()``); every method of a repeat gets the
    same seed (paired comparisons), different repeats get different augmentation streams and masks."""
    digest = hashlib.sha256(f"{dataset}/{protocol_version}/repeat{int(repeat)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _cache_file() -> Path:
    return subdir("foundations") / "sha256.json"


def checkpoint_sha256(path) -> str:
    """sha256 of a file, cached by (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    return _cached_digest(key, str(path))


@functools.lru_cache(maxsize=64)
def _cached_digest(key: str, path: str) -> str:
    cache_file = _cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    cache[key] = h.hexdigest()
    tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, cache_file)  # concurrent writers: the last wins, each entry is a pure function of the file
    return cache[key]


@functools.lru_cache(maxsize=1)
def git_commit() -> Dict[str, Optional[object]]:
    """The commit of the bench checkout and whether it has uncommitted changes; None outside a git checkout."""
    root = Path(bench.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0
                else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def versions() -> Dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version(), "bench": bench.__version__}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def device_name(dev) -> str:
    import torch
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()
