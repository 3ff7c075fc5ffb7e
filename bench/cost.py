"""What a grid of cells costs, from measured step times only (``bench sweep --dry-run``).

A cell's cost is its iterations times the method's median step time on the cell's dataset and device, plus
a fixed per-cell overhead (preprocessing the support, predicting the test cases, tracking); a tuned cell's
study adds trials x repeats such runs. Step times come from, in order:

1. earlier results in ``$BENCH_HOME/runs`` of the same method, dataset and device type;
2. the committed perf table of that device (``leaderboards/perf_<device>.csv``, ``bench perf``), whose
   ``median_s`` is measured on the network it names (its ``network`` column, stated in the output).

Where neither exists the cost is *unknown* and said to be so, with the command that measures it: a phantom
step time on a CPU says nothing about SegRap2023 on a GPU.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Dict, Iterable, List, Optional, Tuple

from bench.home import bench_home

CELL_OVERHEAD_SECONDS = 20.0   # preprocessing the support, predicting the test cases, tracking (phantom, CPU)
PERF_DIR = Path(__file__).resolve().parent.parent / "leaderboards"


@dataclass(frozen=True)
class StepTime:
    seconds: float
    source: str   # where the number was measured


def measured_step_times(runs: Optional[Path] = None) -> Dict[Tuple[str, str, str], List[float]]:
    """(method, dataset, device type) -> median step seconds of every finished run under ``runs``."""
    out: Dict[Tuple[str, str, str], List[float]] = {}
    for path in (runs or bench_home() / "runs").rglob("result.json"):
        r = json.loads(path.read_text())
        step = r.get("cost", {}).get("step_seconds_median")
        if step:
            out.setdefault((r["spec"]["method"], r["spec"]["dataset"], r["cost"].get("device", "cpu")), []).append(step)
    return out


def perf_table(device: str, folder: Path = PERF_DIR) -> Dict[str, StepTime]:
    """method -> median step seconds from ``perf_<device>.csv`` (the per-method section)."""
    path = folder / f"perf_{device}.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("section") == "method" and r.get("median_s")]
    return {r["name"]: StepTime(float(r["median_s"]), f"{path.name} ({r['network']} network, patch {r['patch']}, "
                                                       f"batch {r['batch']})") for r in rows}


class StepTimes:
    def __init__(self, runs: Optional[Path] = None, perf_folder: Path = PERF_DIR):
        self.measured = measured_step_times(runs)
        self.perf_folder = perf_folder
        self._perf: Dict[str, Dict[str, StepTime]] = {}

    def lookup(self, method: str, dataset: str, device: str) -> Optional[StepTime]:
        runs = self.measured.get((method, dataset, device))
        if runs:
            return StepTime(median(runs), f"{len(runs)} earlier {dataset} run(s) on {device}")
        if device not in self._perf:
            self._perf[device] = perf_table(device, self.perf_folder)
        return self._perf[device].get(method)


@dataclass
class CellCost:
    key: str
    seconds: Optional[float]   # None: no step time measured for this method, dataset and device
    source: str


def cell_costs(specs: Iterable, tune_trials: int, tune_repeats: int, device: str,
               times: Optional[StepTimes] = None) -> List[CellCost]:
    """One cost per spec; a study's cost is charged to its first cell. A method that does not depend on the
    shots (the reference rows) trains once per repeat: its cells at other shot counts reuse that run. A
    cell whose run exists under a protocol version this one extends reuses it (``finished_ancestor``)."""
    from bench.methods import METHODS
    from bench.protocols import Protocol
    from bench.runner import finished_ancestor, shots_free_key
    from bench.sweep import cell_key
    times = times or StepTimes()
    out, studies, trained = [], set(), set()
    for s in specs:
        earlier = not tune_trials and finished_ancestor(s, Protocol.load(s.dataset, s.protocol_version))
        if earlier:
            version = earlier[1]["spec"]["protocol_version"]
            out.append(CellCost(cell_key(s), 0.0, f"reused: its run of protocol {version}"))
            continue
        if not METHODS.get(s.method).depends_on_shots:
            twin = shots_free_key(s)
            if twin in trained:
                out.append(CellCost(cell_key(s), 0.0, "reused: the run of another shot count"))
                continue
            trained.add(twin)
        step = times.lookup(s.method, s.dataset, device)
        study = tune_trials and (s.method, s.dataset, s.shots) not in studies
        studies.add((s.method, s.dataset, s.shots))
        if step is None:
            out.append(CellCost(cell_key(s), None, f"no step time for {s.method} on {s.dataset} ({device}): run a "
                                                    f"cell, or `bench perf --device {device}`"))
            continue
        one = s.iterations * step.seconds + CELL_OVERHEAD_SECONDS
        out.append(CellCost(cell_key(s), one * (1 + (tune_trials * tune_repeats if study else 0)), step.source))
    return out


def pruning_bound(trials: int, startup: int) -> float:
    """Largest share of tuning cost MedianPruner can save: every trial after the first ``startup`` stopped
    at its warm-up step (a third of the iterations, ``bench.tuning.make_pruner``)."""
    return max(0, trials - startup) / trials * (2 / 3) if trials else 0.0


def describe(costs: List[CellCost], specs: List, tune_trials: int, device: str) -> List[str]:
    """The summary lines ``--dry-run`` prints after the per-cell list."""
    from bench.tuning.bookkeeping import PRUNER_STARTUP_TRIALS
    known = [c for c in costs if c.seconds is not None]
    unknown = [c for c in costs if c.seconds is None]
    hours = sum(c.seconds for c in known) / 3600
    lines = [f"{len(costs)} cells; {device}-hours for the {len(known)} with a measured step time: {hours:.2f}"]
    if unknown:
        lines.append(f"  {len(unknown)} cell(s) without a measured step time, not counted ({unknown[0].source})")
    reused = [c for c in known if c.source.startswith("reused")]
    if reused:
        lines.append(f"  {len(reused)} cell(s) reuse a finished run (another shot count of a reference row, or "
                     "the same repeat under the protocol version this one extends)")
    for source in sorted({c.source for c in known} - {c.source for c in reused}):
        lines.append(f"  step times from {source}")
    if tune_trials:
        lines.append(f"  tuning: pruning can save at most {pruning_bound(tune_trials, PRUNER_STARTUP_TRIALS):.0%} "
                     f"of each study ({tune_trials} trials, the first {PRUNER_STARTUP_TRIALS} never pruned)")
    cases = {(s.dataset, s.foundation, c) for s in specs for c in _training_cases(s)}
    per_cell = sum(len(_training_cases(s)) for s in specs)
    if per_cell:
        lines.append(f"  preprocessing: {len(cases)} distinct (dataset, foundation, case) preprocessed once and "
                     f"shared, instead of {per_cell} case preprocessings cell by cell ({per_cell / max(1, len(cases)):.1f}x)")
    return lines


def _training_cases(spec) -> List[str]:
    """Support and tuning cases of a cell (what its training preprocesses); none when the protocol is absent."""
    from bench.protocols import Protocol, ProtocolError
    try:
        split = Protocol.load(spec.dataset, spec.protocol_version).split(spec.shots, spec.repeat)
    except (ProtocolError, FileNotFoundError, KeyError, ValueError):
        return []
    return list(split.support) + list(split.tune)
