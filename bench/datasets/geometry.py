"""Voxel grids of a data release: comparing an image's and a label's geometry, resampling a label."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from bench.datasets.base import DatasetError

SPACING_RTOL = 1e-4
ORIGIN_TOL_VOXELS = 0.01      # origins may differ by 1% of a voxel (float round-off in headers)
DIRECTION_ATOL = 1e-4


@dataclass(frozen=True)
class Geometry:
    """A 3-D voxel grid in ITK's LPS convention; size/spacing/origin in x, y, z order."""
    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]   # row-major 3x3, column j = axis j

    @classmethod
    def of(cls, img: sitk.Image) -> "Geometry":
        return cls(tuple(img.GetSize()), tuple(img.GetSpacing()), tuple(img.GetOrigin()),
                   tuple(img.GetDirection()))

    def apply(self, img: sitk.Image) -> sitk.Image:
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def _matrix(self) -> np.ndarray:
        return np.asarray(self.direction, float).reshape(3, 3) * np.asarray(self.spacing, float)

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous voxel indices (x, y, z) of physical points, one per row."""
        return np.linalg.solve(self._matrix(), (points - np.asarray(self.origin)).T).T

    def centre_corners(self) -> np.ndarray:
        """Physical positions of the 8 corner voxel centres."""
        last = np.asarray(self.size) - 1
        idx = np.array([[i, j, k] for i in (0, last[0]) for j in (0, last[1]) for k in (0, last[2])], float)
        return np.asarray(self.origin) + idx @ self._matrix().T

    def contains(self, other: "Geometry", tol_voxels: float = 0.5) -> bool:
        """Every voxel centre of ``other`` lies inside this grid (voxel-centre extent +- tol)."""
        idx = self.to_index(other.centre_corners())
        return bool(np.all(idx >= -tol_voxels - 1e-6) and np.all(idx <= np.asarray(self.size) - 1 + tol_voxels + 1e-6))

    def differences(self, other: "Geometry") -> Dict[str, Tuple[object, object]]:
        """Fields that differ beyond round-off, with both values (self's first)."""
        out: Dict[str, Tuple[object, object]] = {}
        if self.size != other.size:
            out["size"] = (self.size, other.size)
        if not np.allclose(self.spacing, other.spacing, rtol=SPACING_RTOL, atol=1e-6):
            out["spacing"] = (_round(self.spacing), _round(other.spacing))
        if not np.allclose(self.origin, other.origin, rtol=0, atol=ORIGIN_TOL_VOXELS * min(self.spacing)):
            out["origin"] = (_round(self.origin), _round(other.origin))
        if not np.allclose(self.direction, other.direction, rtol=0, atol=DIRECTION_ATOL):
            out["direction"] = (_round(self.direction), _round(other.direction))
        return out


def _round(values: Sequence[float]) -> Tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def describe_differences(diff: Dict[str, Tuple[object, object]]) -> str:
    return "; ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())


REGRID_HINT = ("The label must lie on the image's voxel grid: re-export it with the image as reference "
               "geometry (e.g. 3D Slicer: Segmentations > Export to labelmap, reference volume = the image), "
               "or check that the two files belong to the same case.")


def check_same_grid(image: Geometry, other: Geometry, image_path: Path, other_path: Path, what: str = "label") -> None:
    diff = image.differences(other)
    if diff:
        raise DatasetError(f"{other_path}: {what} geometry differs from image {image_path.name} "
                           f"({describe_differences(diff)}). {REGRID_HINT}")


def resample_nearest(label: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Label onto the reference grid; nearest neighbour keeps it a label map."""
    return sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())
