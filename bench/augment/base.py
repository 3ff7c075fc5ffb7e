"""The interface of a training-data augmentation any method can take (``bench run --augment NAME``).

An augmentation sees the training (support) cases once, as nnU-Net preprocessed them (normalised
intensities on the plans' voxel grid), and returns a batchgeneratorsv2 transform that the one trainer
(``bench.engine.trainer.BenchTrainer``) puts in front of nnU-Net's own training transforms. It acts
on the fly, per training patch: the iteration budget, the support set and the tuning / test cases are
those of the plain run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


class SupportCase(NamedTuple):
    case_id: str
    image: np.ndarray   # (C, Z, Y, X) float32, normalised as the network sees it
    seg: np.ndarray     # (Z, Y, X) integer labels (nnU-Net: -1 outside the image's non-zero region)


@dataclass(frozen=True)
class Normalisation:
    """The plans' intensity normalisation per channel, to map physical values (HU) into the arrays' units."""
    schemes: List[str]
    properties: Dict[str, Dict[str, float]] = field(default_factory=dict)  # foreground_intensity_properties

    @classmethod
    def from_plans(cls, plans: dict, configuration: str) -> "Normalisation":
        return cls(list(plans["configurations"][configuration]["normalization_schemes"]),
                   dict(plans.get("foreground_intensity_properties_per_channel", {})))

    def ct_to_normalised(self, channel: int, hu: Sequence[float]) -> Optional[np.ndarray]:
        """HU values as nnU-Net's ``CTNormalization`` writes them (clip to the 0.5-99.5 percentiles, subtract
        the mean, divide by the SD); None when ``channel`` is not CT-normalised (no fixed HU mapping)."""
        if channel >= len(self.schemes) or self.schemes[channel] != "CTNormalization":
            return None
        p = self.properties[str(channel)]
        clipped = np.clip(np.asarray(hu, dtype=float), p["percentile_00_5"], p["percentile_99_5"])
        return (clipped - p["mean"]) / max(p["std"], 1e-8)


class Augmentation:
    """Base class. Subclasses register with ``@AUGMENTATIONS.register("name")`` (``bench.augment``)."""

    name: ClassVar[str] = "base"
    label: ClassVar[str] = "base"      # the row suffix in tables: ``dgst+<label>``
    summary: ClassVar[str] = ""

    def training_transform(self, cases: Sequence[SupportCase], normalisation: Normalisation,
                           log: Callable[[str], None] = print) -> Tuple[Optional[Any], Dict[str, Any]]:
        """(a batchgeneratorsv2 ``BasicTransform`` applied to each training patch, or None to train without
        one, with the reason in the record; a JSON-able record of what was derived from ``cases``)."""
        raise NotImplementedError
