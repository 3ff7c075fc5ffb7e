"""Versioned few-shot protocols: ``bench/protocols/<dataset>/v<N>.json``.

A protocol file is written once by ``make_protocol`` (a documented seeded
procedure) and committed. It is never regenerated silently: a change is a new
version file. Each file holds a fixed test set and, for every repeat and every
shots value, the support case ids and a disjoint tuning-validation set of the
same size. Supports are nested across shots within a repeat (the 1-shot case is
in the 3-shot set, which is in the 5-shot set); so are tuning sets.

A version may *extend* an earlier one (``"extends": "v2"``): the same test set, pool and shots, the earlier
version's repeats unchanged and more after them. Its shared repeats are the same experiments: they keep the
seed of the version that introduced them (``Protocol.seed_version``), so their finished runs are reused
(``bench.runner.finished_ancestor``) and only the new repeats train.

This package is a leaf: it imports no dataset module (checking a prepared dataset against its protocol is
``bench.datasets.validation.check_prepared``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

PROTOCOL_DIR = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
PROCEDURE = ("numpy.random.default_rng(seed + repeat).permutation(sorted(pool)); "
             "support[k] = perm[:k], tune[k] = perm[K:K+k] with K = max(shots)")


class ProtocolError(ValueError):
    pass


@dataclass(frozen=True)
class Split:
    dataset: str
    version: str
    shots: int
    repeat: int
    support: List[str]
    tune: List[str]
    test: List[str]


def make_protocol(dataset: str, version: str, pool: Sequence[str], test: Sequence[str],
                  shots: Iterable[int] = (1, 3, 5), repeats: int = 5, seed: int = 0,
                  notes: str = "", extends: Optional[str] = None) -> dict:
    shots = sorted(set(int(s) for s in shots))
    pool, test = sorted(pool), sorted(test)
    if set(pool) & set(test):
        raise ProtocolError("pool and test overlap")
    kmax = max(shots)
    if len(pool) < 2 * kmax:
        raise ProtocolError(f"pool of {len(pool)} cases is too small for {kmax}-shot support + tuning sets")
    reps = []
    for r in range(repeats):
        perm = [pool[i] for i in np.random.default_rng(seed + r).permutation(len(pool))]
        reps.append({"repeat": r,
                     "support": {str(k): perm[:k] for k in shots},
                     "tune": {str(k): perm[kmax:kmax + k] for k in shots}})
    data = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "version": version, "seed": seed,
            "procedure": PROCEDURE, "notes": notes, "shots": shots, "test": test, "pool": pool,
            "repeats": reps}
    if extends:
        data["extends"] = extends
    return data


class Protocol:
    def __init__(self, data: dict, path: Optional[Path] = None):
        self.data, self.path = data, path
        self.dataset: str = data["dataset"]
        self.version: str = data["version"]
        self.test: List[str] = list(data["test"])
        self.pool: List[str] = list(data["pool"])
        self.shots: List[int] = list(data["shots"])
        self.n_repeats = len(data["repeats"])
        # Optional: label-empty cases (no node to find), scored for false positives by `bench evaluate
        # --extra nodefree`; never trained or tested on. Not part of the splits.
        self.node_free: List[str] = list(data.get("node_free", []))
        self.extends: Optional[str] = data.get("extends")

    @classmethod
    def load(cls, dataset: str, version: Optional[str] = None) -> "Protocol":
        versions = available_versions(dataset)
        if not versions:
            raise ProtocolError(f"no protocol for dataset {dataset!r} under {PROTOCOL_DIR}")
        version = version or versions[-1]
        path = PROTOCOL_DIR / dataset / f"{version}.json"
        if not path.is_file():
            raise ProtocolError(f"protocol {dataset}/{version} not found; available: {', '.join(versions)}")
        protocol = cls(json.loads(path.read_text()), path)
        if protocol.parent is not None:
            protocol.check_extends(protocol.parent)
        return protocol

    @cached_property
    def parent(self) -> Optional["Protocol"]:
        """The version this one extends, None if it extends none (read once: seeds and run reuse ask often)."""
        return Protocol.load(self.dataset, self.extends) if self.extends else None

    def check_extends(self, parent: "Protocol") -> None:
        """An extension changes nothing of its parent: same test set, pool and shots, same first repeats."""
        fix = f"{self.path}: version {self.version} extends {parent.version} ({parent.path}) but"
        for what in ("test", "pool", "shots", "node_free"):
            if getattr(self, what) != getattr(parent, what):
                raise ProtocolError(f"{fix} its {what} differs; a changed {what} is a new version that extends "
                                    "nothing")
        if self.data["repeats"][:parent.n_repeats] != parent.data["repeats"]:
            raise ProtocolError(f"{fix} its first {parent.n_repeats} repeats differ from the parent's; regenerate "
                                "it with make_protocol(..., seed=the parent's seed, extends=...)")

    def seed_version(self, repeat: int) -> str:
        """The version whose name seeds ``repeat`` (provenance.derive_seed): the one that introduced it."""
        if self.parent is not None and repeat < self.parent.n_repeats:
            return self.parent.seed_version(repeat)
        return self.version

    def split(self, shots: int, repeat: int = 0) -> Split:
        if shots not in self.shots:
            raise ProtocolError(f"{self.dataset} protocol {self.version} has shots {self.shots}, not {shots}")
        if not 0 <= repeat < self.n_repeats:
            raise ProtocolError(f"{self.dataset} protocol {self.version} has repeats 0..{self.n_repeats - 1}")
        rep = self.data["repeats"][repeat]
        return Split(self.dataset, self.version, shots, repeat, list(rep["support"][str(shots)]),
                     list(rep["tune"][str(shots)]), list(self.test))

    def label_ids(self) -> List[str]:
        """Cases whose labels a run reads (test, every support and tuning set): each needs a node."""
        used = set(self.test)
        for rep in self.data["repeats"]:
            for k in self.shots:
                used |= set(rep["support"][str(k)]) | set(rep["tune"][str(k)])
        return sorted(used)

    def check(self, case_ids: Iterable[str]) -> None:
        """Every id the protocol names exists; test is disjoint from every support/tune set."""
        present = set(case_ids)
        named = set(self.test) | set(self.pool) | set(self.node_free)
        if set(self.node_free) & (set(self.test) | set(self.pool)):
            raise ProtocolError(f"{self.path}: node_free cases must be neither test nor pool cases: "
                                f"{', '.join(sorted(set(self.node_free) & (set(self.test) | set(self.pool))))}")
        missing = sorted(named - present)
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ProtocolError(f"prepared {self.dataset} lacks {len(missing)} of the {len(named)} cases named by "
                                f"protocol {self.version} ({self.path}): {', '.join(missing[:10])}{more}. Re-run "
                                f"`bench datasets prepare {self.dataset} --source DIR` on the complete release; if "
                                "your release names its cases differently, see the protocol's notes.")
        for rep in self.data["repeats"]:
            for k in self.shots:
                s, t = set(rep["support"][str(k)]), set(rep["tune"][str(k)])
                if (s | t) & set(self.test) or s & t:
                    raise ProtocolError(f"{self.path}: repeat {rep['repeat']} shots {k} overlaps test or itself")


def available_versions(dataset: str) -> List[str]:
    folder = PROTOCOL_DIR / dataset
    files = folder.glob("v*.json") if folder.is_dir() else []
    return sorted((p.stem for p in files), key=lambda v: int(re.sub(r"\D", "", v) or 0))


def write_protocol(data: dict) -> Path:
    """Write a NEW protocol version; refuses to overwrite a committed one."""
    path = PROTOCOL_DIR / data["dataset"] / f"{data['version']}.json"
    if path.exists():
        raise ProtocolError(f"{path} exists; protocols are never regenerated, write a new version")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
