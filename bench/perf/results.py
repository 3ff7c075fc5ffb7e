"""What ``bench perf`` measured: per network (``NetworkResult``) and per run (``PerfReport``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

REFERENCE = "full"   # the method every ratio is taken to


@dataclass
class NetworkResult:
    key: str
    title: str
    patch: Tuple[int, ...]
    batch: int
    features: List[int]
    total_params: int
    rows: List[Dict[str, Any]]
    selection: Dict[str, Any]
    harness: Dict[str, Any]


@dataclass
class PerfReport:
    device: str
    device_name: str
    device_slug: str
    date: str
    versions: Dict[str, str]
    threads: int
    steps: int
    warmup: int
    selection_reps: int
    seed: int
    networks: List[NetworkResult]
    memory_method: str
    memory_reps: int = 1
