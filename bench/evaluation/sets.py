"""Auxiliary evaluation sets: cases a run's exported model is scored on besides its protocol's test set.

- ``retention``: cases of the foundation's SOURCE domain. Their Dice before (the foundation) and after
  (the fine-tuned export) fine-tuning measures forgetting.
- ``nodefree``: scans with nothing to find. Every predicted component is a false positive.

The sets are versioned on their own (``key``): adding or changing one never touches a protocol's splits
or a run's id. For the phantom both are generated (docs/phantom.md, "Auxiliary evaluation sets"): same
version, same bytes. For a real dataset the user names the retention cases (``--retention
DATASET[:CASE,...]``) and a protocol may list label-empty cases (``"node_free"`` in its JSON).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Tuple

from bench.metrics import DEFAULT_NSD_TOLERANCE_MM

AXES = ("retention", "nodefree")
# Cases scored when the user names a retention dataset without cases: the first ones by id.
DEFAULT_RETENTION_CASES = 10


@dataclass(frozen=True)
class EvalCase:
    case_id: str
    images: Tuple[str, ...]
    label: Optional[str]      # None: node-free by construction (the generator placed no node)
    group: str = ""           # node-free kind (in-distribution, noisy, ...), reported separately


@dataclass(frozen=True)
class EvalSet:
    axis: str                 # one of AXES
    name: str
    version: str
    cases: Tuple[EvalCase, ...]
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
    description: str = ""

    @property
    def key(self) -> str:
        """How results of this set are stored (``extra_eval.json``): axis, name and version."""
        return f"{self.axis}/{self.name}@{self.version}"


# --- phantom: generated sets ------------------------------------------------------------------------

# Version of the phantom sets' definitions below; the generator's version (PHANTOM_VERSION) is part of
# the key too, so a changed generator never reuses results of other bytes.
PHANTOM_SETS_VERSION = 1


def _phantom_groups(axis: str):
    """(group, domain, first index, count) of a phantom set. Retention: the source domain's cases 40-49,
    the ones after the 40 that `phantom-source` holds (pretraining used 0-31 and held out 32-39), so the
    foundation never saw them. Node-free: the target domain without nodes (its unlabelled normal nodes and
    glands remain: what a model may mistake for a node), then two shifts the target never showed:
    stronger noise and a narrower field of view that cuts the neck at its sides."""
    from bench.datasets.phantom import SOURCE, TARGET
    if axis == "retention":
        return [("source", SOURCE, 40, 10)]
    no_nodes = replace(TARGET, nodes=(0, 0))
    return [("target", replace(no_nodes, key="nodefree-target", seed_offset=200_000), 0, 4),
            ("noise-45-60HU", replace(no_nodes, key="nodefree-noisy", noise_hu=(45.0, 60.0), seed_offset=210_000),
             0, 3),
            ("fov-70mm", replace(no_nodes, key="nodefree-fov", shape=(24, 44, 44), seed_offset=220_000), 0, 3)]


def phantom_set(axis: str) -> EvalSet:
    """The phantom's ``axis`` set, generated into ``$BENCH_HOME/extra_eval/sets/`` on first use."""
    from bench.datasets.phantom import PHANTOM_VERSION, _write, generate_case
    from bench.home import subdir
    if axis not in AXES:
        raise ValueError(f"unknown evaluation axis {axis!r}; choose from {', '.join(AXES)}")
    name = "phantom-source" if axis == "retention" else "phantom-nodefree"
    version = f"v{PHANTOM_SETS_VERSION}-g{PHANTOM_VERSION}"
    folder = subdir("extra_eval", "sets") / f"{name}-{version}"
    groups = _phantom_groups(axis)
    prefix = "src" if axis == "retention" else "nf"
    ids = [(g, d, i, f"{prefix}_{i:03d}" if axis == "retention" else f"{prefix}_{g}_{i:03d}")
           for g, d, first, n in groups for i in range(first, first + n)]
    if not (folder / ".complete").is_file():
        tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for _, domain, i, cid in ids:
            ct, lab = generate_case(domain, i, seed=0)
            _write(ct, domain.spacing, tmp / f"{cid}_0000.nii.gz")
            _write(lab, domain.spacing, tmp / f"{cid}.nii.gz")
        (tmp / ".complete").write_text("ok\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    cases = tuple(EvalCase(cid, (str(folder / f"{cid}_0000.nii.gz"),),
                           str(folder / f"{cid}.nii.gz") if axis == "retention" else None, g)
                  for g, _, _, cid in ids)
    what = ("phantom source domain, cases 40-49 (never seen in pretraining)" if axis == "retention" else
            "phantom target without nodes: 4 in-distribution, 3 with 45-60 HU noise, 3 with a 70 mm field of view")
    return EvalSet(axis, name, version, cases, description=what)


# --- real datasets: named by the user or by the protocol ------------------------------------------------

def parse_retention(text: str) -> Tuple[str, Optional[List[str]]]:
    """``DATASET[:CASE,CASE...]`` -> (dataset, cases or None)."""
    dataset, colon, cases = str(text).partition(":")
    if not dataset:
        raise ValueError(f"--retention expects DATASET[:CASE,CASE...], got {text!r}")
    ids = [c for c in cases.split(",") if c] if colon else None
    if colon and not ids:
        raise ValueError(f"--retention {text!r} names no case after ':'; give DATASET or DATASET:CASE,CASE")
    return dataset, ids


def dataset_retention_set(text: str) -> EvalSet:
    """The retention set the user named: cases of a prepared dataset (all listed must exist); without a
    case list the first ``DEFAULT_RETENTION_CASES`` case ids."""
    from bench.datasets import DatasetError, get_dataset
    name, ids = parse_retention(text)
    ds = get_dataset(name)
    if not ds.is_prepared():
        how = "" if not ds.needs_source else " --source DIR"
        raise DatasetError(f"retention dataset {name} is not prepared: run `bench datasets prepare {name}{how}`")
    present = ds.case_ids()
    if ids is None:
        ids = present[:DEFAULT_RETENTION_CASES]
    missing = sorted(set(ids) - set(present))
    if missing:
        raise DatasetError(f"retention dataset {name} has no case(s) {', '.join(missing)} "
                           f"(it has {len(present)}, e.g. {', '.join(present[:3])})")
    digest = hashlib.sha1(",".join(ids).encode()).hexdigest()[:8]
    cases = tuple(EvalCase(c, tuple(ds.image_files(c)), ds.label_file(c)) for c in ids)
    return EvalSet("retention", name, f"cases-{digest}", cases, nsd_tolerance_mm=ds.nsd_tolerance_mm,
                   description=f"{name}: {', '.join(ids)}")


def protocol_nodefree_set(dataset: str, protocol_version: str) -> Optional[EvalSet]:
    """The label-empty cases a real dataset's protocol lists (``"node_free"``), None if it lists none."""
    from bench.datasets import get_dataset
    from bench.protocols import Protocol
    protocol = Protocol.load(dataset, protocol_version)
    if not protocol.node_free:
        return None
    ds = get_dataset(dataset)
    cases = tuple(EvalCase(c, tuple(ds.image_files(c)), ds.label_file(c)) for c in protocol.node_free)
    return EvalSet("nodefree", dataset, f"protocol-{protocol.version}", cases,
                   description=f"{dataset} protocol {protocol.version}: {len(cases)} label-empty case(s)")
