"""What part a method plays in a comparison, by name only (no registry import: cheap, and it works for
names of synthetic test data).

- ``proposed``: the method whose claim is checked (DGST).
- ``ablation``: DGST's own variants (``dgst-*``); they are not "existing few-shot methods".
- ``control``: training from scratch (``scratch``; ``scratch-light``: a small specialist network), a floor that shows what the foundation adds; not a competitor.
- ``reference``: rows that bound the task (zero-shot, oracle): never the leader, never in a test family.
- ``baseline``: everything else, including names this table does not know: the existing methods a
  claim is made against.
"""
from __future__ import annotations

PROPOSED = "dgst"
ROLES = ("proposed", "ablation", "baseline", "control", "reference")
_FIXED = {PROPOSED: "proposed", "scratch": "control", "scratch-light": "control",
          "zero-shot": "reference", "oracle": "reference"}


def role(name: str) -> str:
    """``proposed``, ``ablation``, ``baseline``, ``control`` or ``reference`` for a method name."""
    if name in _FIXED:
        return _FIXED[name]
    if name.startswith(PROPOSED + "-"):
        return "ablation"
    return "baseline"


def competitors(names) -> list:
    """The baselines among ``names`` (sorted): what the proposed method's claim is compared with."""
    return sorted(n for n in names if role(n) == "baseline")
