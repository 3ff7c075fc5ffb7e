"""Augmentation registry: training-data augmentations any method can take (``--augment NAME``).

A run with an augmentation is its own row in tables: ``<method>+<label>`` (``dgst+synth``), paired against
the plain ``<method>`` row on the same repeats and test cases. ``row_label`` / ``split_row_label`` convert
between a (method, augmentation) pair and that label; sweep files use the label to ask for such rows.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from bench.augment.base import Augmentation, Normalisation, SupportCase
from bench.registry import Registry

SEPARATOR = "+"


def _load_all() -> None:
    from bench.augment import synth_nodes  # noqa: F401


AUGMENTATIONS: Registry = Registry("augmentation", load=_load_all)


def get_augmentation(name: str) -> Augmentation:
    return AUGMENTATIONS.get(name)()


def row_label(method: str, augment: Optional[str]) -> str:
    """The table row of a method trained with ``augment`` (None: the plain method)."""
    return method if not augment else f"{method}{SEPARATOR}{AUGMENTATIONS.get(augment).label}"


def split_row_label(label: str) -> Tuple[str, Optional[str]]:
    """(method, augmentation name) of a row label: ``dgst`` -> (dgst, None); ``dgst+synth`` and
    ``dgst+synth-nodes`` -> (dgst, synth-nodes). An unknown suffix is an error listing the valid ones."""
    method, sep, suffix = label.partition(SEPARATOR)
    if not sep:
        return label, None
    for name in AUGMENTATIONS.names():
        if suffix in (name, AUGMENTATIONS.get(name).label):
            return method, name
    valid = ", ".join(f"+{AUGMENTATIONS.get(n).label}" for n in AUGMENTATIONS.names())
    raise ValueError(f"{label!r}: unknown augmentation suffix {SEPARATOR}{suffix}; valid: {valid}")


def augmented_pairs(rows) -> List[Tuple[str, str]]:
    """(augmented row, its plain method) for every augmented row of ``rows`` whose plain method is there too."""
    rows = list(rows)
    return [(r, split_row_label(r)[0]) for r in rows if SEPARATOR in r and split_row_label(r)[0] in rows]


__all__ = ["AUGMENTATIONS", "Augmentation", "Normalisation", "SupportCase", "augmented_pairs", "get_augmentation",
           "row_label", "split_row_label"]
