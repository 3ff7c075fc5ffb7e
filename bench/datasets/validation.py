"""Checks of a release's content (3-D, finite, integer labels) and of a prepared dataset against its
protocol; ``check_labels_not_empty`` is the one place of the empty-label rule."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np
import SimpleITK as sitk

from bench.datasets.base import Dataset, DatasetError
from bench.protocols import Protocol, available_versions


class DatasetWarning(UserWarning):
    """Input that is converted but deserves a look (empty label, relabelled values, ...)."""


def warn(message: str) -> None:
    warnings.warn(message, DatasetWarning, stacklevel=3)


def require_3d(img: sitk.Image, path: Path, what: str) -> None:
    comps = img.GetNumberOfComponentsPerPixel()
    if img.GetDimension() != 3 or comps != 1:
        # A NIfTI 4th axis may come back as voxel components: report it as the 4-D file it is.
        dims = img.GetDimension() + (comps > 1)
        shape = f"size {img.GetSize()}" + (f" with {comps} components per voxel" if comps > 1 else "")
        raise DatasetError(f"{path}: {what} is {dims}-D ({shape}); expected one 3-D volume. "
                           f"Export the {what} alone as a 3-D file (one channel, no time/segment axis).")


def check_finite(array: np.ndarray, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DatasetError(f"{path}: {bad} voxels are NaN or infinite. The converter does not guess "
                               "intensities: re-export the image from the original scan (DICOM).")


def check_finite_image(img: sitk.Image, path: Path) -> None:
    """NaN/inf check of a float image file; ITK's NIfTI reader zeroes them, so read such files raw."""
    if img.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel  # an nnunetv2 dependency
        check_finite(np.asanyarray(nibabel.load(str(path)).dataobj), path)
    else:
        check_finite(sitk.GetArrayViewFromImage(img), path)


def label_values(array: np.ndarray, path: Path) -> List[int]:
    """Sorted distinct label values, refusing non-integer ones. Works on non-zeros only (fast)."""
    nz = array[array != 0]
    if np.issubdtype(nz.dtype, np.floating):
        if not np.all(np.isfinite(nz)):
            raise DatasetError(f"{path}: label holds NaN/inf values. Use the original mask file.")
        frac = nz[nz != np.round(nz)]
        if frac.size:
            raise DatasetError(f"{path}: label holds non-integer values (e.g. {float(frac[0]):g}); a label map "
                               "holds integer class ids. This looks like a probability map or a mask resampled "
                               "with linear interpolation: use the original mask, or resample with nearest "
                               "neighbour.")
    return ([0] if nz.size < array.size else []) + sorted(int(v) for v in np.unique(nz))


# --------------------------------------------------------------------------- the empty-label rule

def check_labels_not_empty(counts: Mapping[str, int], needs_label: Mapping[str, str],
                           where: Mapping[str, object]) -> None:
    """The empty-label rule: a case whose label a protocol reads (test, support, tuning) needs at least one
    lymph-node voxel; any other empty label is kept, with a warning.

    ``counts``: lymph-node voxels per case; ``needs_label``: case id -> 'dataset/version' of the protocol
    that reads its label; ``where``: case id -> the label file, named in the message.
    """
    empty = [cid for cid, n in sorted(counts.items()) if n == 0]
    used = [cid for cid in empty if cid in needs_label]
    if used:
        files = ", ".join(str(where.get(cid, cid)) for cid in used)
        protocols = ", ".join(sorted({needs_label[cid] for cid in used}))
        what = f"label of {used[0]} is" if len(used) == 1 else f"labels of {', '.join(used)} are"
        raise DatasetError(f"{files}: {what} empty (no lymph-node voxels), but protocol {protocols} uses "
                           f"{'it' if len(used) == 1 else 'them'} as test/support/tuning case(s), which need at "
                           "least one node. "
                           "Check that this is the right mask file (re-prepare from the original release); if "
                           "the release really has no nodes here, this protocol version cannot be used with it.")
    for cid in empty:
        warn(f"{where.get(cid, cid)}: label of {cid} is empty (no lymph-node voxels); kept, but no protocol may "
             "use it as a test/support/tuning case.")


def protocol_label_ids(dataset: str, protocol: Optional[Protocol] = None) -> Dict[str, str]:
    """Case id -> 'dataset/version' for every case the protocol (default: the latest, if any) reads labels of."""
    if protocol is None:
        if not available_versions(dataset):
            return {}
        protocol = Protocol.load(dataset)
    return {cid: f"{dataset}/{protocol.version}" for cid in protocol.label_ids()}


# --------------------------------------------------------------------------- before training

def check_prepared(dataset: Union[str, Dataset], protocol: Union[None, str, Protocol] = None) -> Protocol:
    """Before training: the dataset is prepared, holds every case the protocol names, and every case
    whose label a run reads has at least one lymph-node voxel. Returns the protocol."""
    from bench.datasets import get_dataset   # the registry, which loads every dataset module
    ds = get_dataset(dataset) if isinstance(dataset, str) else dataset
    if not isinstance(protocol, Protocol):
        protocol = Protocol.load(ds.name, protocol)
    if not ds.is_prepared():
        how = " --source DIR" if ds.needs_source else ""
        raise DatasetError(f"{ds.name} is not prepared (no complete {ds.raw_dir()}): run "
                           f"`bench datasets prepare {ds.name}{how}`.")
    protocol.check(ds.case_ids())
    needs_label = protocol_label_ids(ds.name, protocol)
    counts = getattr(ds, "foreground_counts", dict)()   # converters record counts; others: read labels
    counts = {cid: counts[cid] if cid in counts else _foreground_voxels(ds.label_file(cid)) for cid in needs_label}
    check_labels_not_empty(counts, needs_label, {cid: ds.label_file(cid) for cid in needs_label})
    return protocol


def _foreground_voxels(label_file: str) -> int:
    img = sitk.ReadImage(label_file)   # keep a reference: the array view does not own the buffer
    return int(np.count_nonzero(sitk.GetArrayViewFromImage(img)))
