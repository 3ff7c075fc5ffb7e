"""Reading release files (NIfTI through ITK, NRRD through pynrrd), refusing truncated or unreadable ones."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from bench.datasets.base import DatasetError
from bench.datasets.geometry import Geometry

NIFTI_HEADER_BYTES = 348


def _unreadable(path: Path, why: str) -> DatasetError:
    return DatasetError(f"{path}: cannot be read ({why}). The file is unreadable or truncated, e.g. an "
                        "interrupted download or unzip: extract it again from the release archive.")


def _decompressed_size(path: Path) -> int:
    """Stream a .gz to its end: raises on truncation/corruption (ITK silently zero-fills a cut .nii.gz)."""
    n = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            n += len(chunk)
    return n


def read_image(path: Path) -> sitk.Image:
    """A NIfTI (or any ITK-readable) image, verified to be complete."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise _unreadable(path, lines[-1].strip() if lines else "unknown format") from None
    try:
        raw = _decompressed_size(path) if path.name.endswith(".gz") else path.stat().st_size
    except (OSError, EOFError, zlib.error) as e:
        raise _unreadable(path, f"compressed data: {e}") from None
    n_voxels = int(np.prod(img.GetSize())) * img.GetNumberOfComponentsPerPixel()
    needed = n_voxels * img.GetSizeOfPixelComponent()
    if path.name.endswith((".nii", ".nii.gz")) and raw < needed + NIFTI_HEADER_BYTES:
        raise _unreadable(path, f"holds {raw} bytes, the header promises {needed + NIFTI_HEADER_BYTES}")
    return img


# NRRD space names -> sign that maps each axis to ITK's LPS (x: +left, y: +posterior, z: +superior).
_AXIS_SIGN = {"left": 1, "right": -1, "posterior": 1, "anterior": -1, "superior": 1, "inferior": -1}
_SPACE_ABBREV = {"LPS": "left-posterior-superior", "RAS": "right-anterior-superior",
                 "LAS": "left-anterior-superior"}


def _lps_signs(space: Optional[str], path: Path) -> np.ndarray:
    if not space:
        return np.ones(3)
    name = _SPACE_ABBREV.get(space.upper(), space.lower())
    parts = name.split("-")
    if len(parts) != 3 or any(p not in _AXIS_SIGN for p in parts):
        raise DatasetError(f"{path}: NRRD space {space!r} is not supported; expected a patient space such as "
                           "left-posterior-superior. Re-save the file from 3D Slicer.")
    return np.array([_AXIS_SIGN[p] for p in parts], float)


def read_nrrd(path: Path) -> Tuple[np.ndarray, Geometry]:
    """Array and geometry of a NRRD file, non-spatial axes first: shape (..., z, y, x).

    pynrrd rather than ITK: ITK turns a segment/list axis into pixel components
    and hides singleton axes, which is exactly what a 4-D segmentation check
    needs to see.
    """
    import nrrd
    try:
        data, header = nrrd.read(str(path), index_order="C")
    except Exception as e:  # pynrrd raises NRRDError, ValueError, zlib/EOF errors on bad files
        raise _unreadable(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    ndim = data.ndim
    dirs = header.get("space directions")
    if dirs is None:
        if ndim != 3:
            raise DatasetError(f"{path}: {ndim}-D NRRD without 'space directions', so its spatial axes are "
                               "unknown. Re-save it from 3D Slicer as a labelmap on the CT grid.")
        dirs = np.diag(np.asarray(header.get("spacings", [1.0, 1.0, 1.0]), float))
    dirs = np.asarray(dirs, float)
    spatial = [i for i in range(ndim) if np.all(np.isfinite(dirs[i]))]  # file-order axes with a direction
    if len(spatial) != 3 or dirs.shape[1] != 3:
        raise DatasetError(f"{path}: NRRD has {len(spatial)} spatial axes (sizes {list(header['sizes'])}); "
                           "expected 3. Re-save it from 3D Slicer as a 3-D volume / labelmap.")
    extra = [i for i in range(ndim) if i not in spatial]
    # File axis i is C axis ndim-1-i; put extra axes first, spatial axes as z, y, x.
    order = [ndim - 1 - i for i in extra] + [ndim - 1 - i for i in reversed(spatial)]
    data = np.transpose(data, order)
    signs = _lps_signs(header.get("space"), path)
    vectors = dirs[spatial] * signs            # rows: x, y, z axis vectors in LPS
    spacing = np.linalg.norm(vectors, axis=1)
    if np.any(spacing == 0):
        raise DatasetError(f"{path}: NRRD 'space directions' has a zero-length axis. Re-save the file.")
    direction = (vectors / spacing[:, None]).T  # columns = axis unit vectors
    origin = np.asarray(header.get("space origin", np.zeros(3)), float) * signs
    geom = Geometry(tuple(int(s) for s in data.shape[-3:][::-1]), tuple(float(s) for s in spacing),
                    tuple(float(o) for o in origin), tuple(float(d) for d in direction.ravel()))
    return data, geom


def as_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    native = array.dtype.newbyteorder("=")  # NRRD may be big-endian; SimpleITK wants native order
    return geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=native)))
