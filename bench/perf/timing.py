"""Timing side by side: round-robin steps, medians and quartiles, within-round ratios (load drift
between rounds cancels)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from bench.memory import sync


@dataclass
class Contestant:
    name: str
    step: Callable[[], Any]
    times: List[float] = field(default_factory=list)
    error: Optional[str] = None


def time_round_robin(contestants: List[Contestant], rounds: int, device: torch.device,
                      log: Callable[[str], None]) -> None:
    """Every round times one step of every contestant; the start rotates each round."""
    for r in range(rounds):
        order = contestants[r % len(contestants):] + contestants[:r % len(contestants)]
        for c in order:
            if c.error:
                continue
            try:
                sync(device)
                t0 = time.perf_counter()
                c.step()
                sync(device)
                c.times.append(time.perf_counter() - t0)
            except Exception as e:  # one broken method must not hide the others' numbers
                c.error = f"timed step failed: {type(e).__name__}: {e}"
                log(f"  {c.name}: {c.error}")
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{c.name} {c.times[-1]:.3f}s" for c in contestants
                                                      if c.times and not c.error))


def spread(times: List[float]) -> Dict[str, float]:
    if not times:
        return {"median_s": float("nan"), "q25_s": float("nan"), "q75_s": float("nan"), "n": 0}
    if len(times) == 1:
        q25 = q75 = times[0]
    else:
        q = statistics.quantiles(times, n=4, method="inclusive")
        q25, q75 = q[0], q[2]
    return {"median_s": statistics.median(times), "q25_s": q25, "q75_s": q75, "n": len(times)}


def paired_ratio(times: List[float], reference: List[float]) -> Optional[float]:
    """Median over rounds of the within-round ratio: load drift between rounds cancels."""
    pairs = [a / b for a, b in zip(times, reference) if b > 0]
    return statistics.median(pairs) if pairs else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b
