"""Reading, checking and converting a local copy of a data release (shared by segrap2023, lnq2023).

Every refusal is a ``DatasetError`` whose message names the file, says what is
wrong and what to do. Nothing is ever written into the source directory.

``ReleaseDataset`` is the conversion pipeline; a dataset module only says how
to find its cases (``discover``) and how to turn one case into images and a
binary lymph-node mask (``convert``). The pipeline adds what every converter
needs:
- all cases are checked and all problems reported at once (a 120-case release
  should not need 120 runs to find its bad files);
- output goes through ``Dataset.staging()``: a failure leaves the previous
  complete dataset (or none), never a half-written one;
- a manifest of the source files' sizes/mtimes and the options is stored in
  the raw folder: an unchanged source is not converted again, and a changed
  one re-converts only the cases whose files changed;
- an empty label is a warning, and an error for a case the dataset's protocol
  uses with labels (test, support, tuning).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from bench.datasets.base import Dataset, DatasetError
from bench.home import DEFAULT_HOME

log = logging.getLogger(__name__)

MANIFEST = "source_manifest.json"
SPACING_RTOL = 1e-4
ORIGIN_TOL_VOXELS = 0.01      # origins may differ by 1% of a voxel (float round-off in headers)
DIRECTION_ATOL = 1e-4
NIFTI_HEADER_BYTES = 348
# Copies made by browsers / unzip tools: "GTVnd (1).nii.gz", "lnq2023-val-0001-seg (2).nrrd".
DOWNLOAD_COPY = re.compile(r"\s?\(\d+\)\.(nii(\.gz)?|nrrd)$", re.IGNORECASE)
SKIPPED_DIRS = ("__MACOSX",)  # macOS zip metadata: mirrors the real tree with ._ files


class DatasetWarning(UserWarning):
    """Input that is converted but deserves a look (empty label, relabelled values, ...)."""


def warn(message: str) -> None:
    warnings.warn(message, DatasetWarning, stacklevel=3)


# --------------------------------------------------------------------------- geometry

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


# --------------------------------------------------------------------------- reading

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


# --------------------------------------------------------------------------- content checks

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


def warn_download_copies(folder: Path, names: Sequence[str]) -> None:
    for name in names:
        if DOWNLOAD_COPY.search(name):
            warn(f"{folder / name}: ignored; looks like a duplicate download copy. Delete it if it is one.")


# --------------------------------------------------------------------------- source walking

def walk(source: Path, max_depth: Optional[int] = None) -> Iterator[Tuple[Path, List[str], List[str]]]:
    """os.walk from source (depth 0), skipping hidden folders and zip metadata.

    Callers may prune ``dirs`` in place, as with os.walk.
    """
    base = len(source.parts)
    for root, dirs, files in os.walk(source):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        if max_depth is not None and len(here.parts) - base >= max_depth:
            dirs[:] = []
        yield here, dirs, sorted(f for f in files if not f.startswith("."))


# --------------------------------------------------------------------------- the pipeline

@dataclass
class CaseSource:
    """Where one case's files are; ``missing`` maps a role to where it was expected."""
    case_id: str
    files: Dict[str, Path] = field(default_factory=dict)
    missing: Dict[str, str] = field(default_factory=dict)
    kind: str = ""          # converter-specific, e.g. how the label is encoded

    def stamps(self) -> Dict[str, list]:
        return {role: [str(p), p.stat().st_size, p.stat().st_mtime_ns] for role, p in sorted(self.files.items())}


def duplicate_error(case_id: str, places: Sequence[Path]) -> DatasetError:
    listed = ", ".join(str(p) for p in places)
    return DatasetError(f"case id {case_id} occurs {len(places)} times: {listed}. Keep one copy of the "
                        "release under --source (remove the duplicate folder or file).")


class ReleaseDataset(Dataset):
    """A dataset converted from a local copy of a public release."""
    options: ClassVar[Dict[str, bool]] = {}   # option name -> default; CLI flag --option-name
    layout: ClassVar[str] = ""                # the accepted layout, quoted when nothing is found
    converter_version: ClassVar[int] = 1      # bump when output for the same input changes

    def __init__(self) -> None:
        self._channels: Optional[Dict[str, str]] = None

    # -- what a dataset module provides
    def discover(self, source: Path, **options) -> Dict[str, CaseSource]:
        raise NotImplementedError

    def convert(self, case: CaseSource, **options) -> Tuple[List[sitk.Image], np.ndarray]:
        """Images (channel order) and a binary z, y, x mask on the first image's grid."""
        raise NotImplementedError

    def channels_for(self, **options) -> Dict[str, str]:
        return {"0": "CT"}

    # -- channel names follow the prepared data (e.g. segrap2023 with a contrast channel)
    @property
    def channel_names(self) -> Dict[str, str]:  # type: ignore[override]
        if self._channels is None:
            meta = self.raw_dir() / "dataset.json"
            if self.is_prepared() and meta.is_file():
                self._channels = json.loads(meta.read_text())["channel_names"]
            else:
                return self.channels_for(**self.options)
        return self._channels

    def manifest(self) -> Optional[dict]:
        path = self.raw_dir() / MANIFEST
        return json.loads(path.read_text()) if self.is_prepared() and path.is_file() else None

    def foreground_counts(self) -> Dict[str, int]:
        """Lymph-node voxels per prepared case, from the manifest (no image reading)."""
        m = self.manifest() or {"cases": {}}
        return {cid: c["foreground_voxels"] for cid, c in m["cases"].items()}

    # -- the pipeline
    def prepare(self, source: Optional[Path] = None, **options) -> Path:
        options = self._resolve_options(options)
        source = self._resolve_source(source)
        cases = self.discover(source, **options)
        if not cases:
            raise DatasetError(f"no {self.name} cases found under {source}. Expected: {self.layout}")
        new = {"converter": f"{self.name} v{self.converter_version}", "options": options,
               "cases": {cid: {"inputs": c.stamps()} for cid, c in sorted(cases.items())}}
        old = self.manifest()
        if old is not None and _inputs(old) == _inputs(new):
            log.info("%s: nothing changed since the last preparation (%d cases in %s)",
                     self.name, len(cases), self.raw_dir())
            return self.raw_dir()

        self._channels = self.channels_for(**options)
        needs_label = _protocol_label_ids(self.name)
        errors: List[str] = []
        converted = 0
        with self.staging() as tmp:
            for cid, case in sorted(cases.items()):
                entry = new["cases"][cid]
                try:
                    reused = self._reuse(old, new, cid, tmp)
                    if reused is None:
                        entry["foreground_voxels"] = self._convert_one(case, tmp, options)
                        converted += 1
                    else:
                        entry["foreground_voxels"] = reused
                    self._check_not_empty(case, entry["foreground_voxels"], needs_label)
                except DatasetError as e:
                    errors.append(str(e))
            if errors:
                raise DatasetError(f"{self.name}: {len(errors)} problem(s) in {source}; nothing was written "
                                   "(fix them and run again):\n- " + "\n- ".join(errors))
            (tmp / MANIFEST).write_text(json.dumps(new, indent=1) + "\n")
        log.info("%s: %d cases ready in %s (%d converted, %d unchanged)", self.name, len(cases),
                 self.raw_dir(), converted, len(cases) - converted)
        return self.raw_dir()

    def _resolve_options(self, given: dict) -> Dict[str, bool]:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = ", ".join(self.options) or "none"
            raise DatasetError(f"{self.name} has no option {', '.join(unknown)}; its options: {valid}.")
        return {k: bool(given.get(k, default)) for k, default in self.options.items()}

    def _resolve_source(self, source: Optional[Path]) -> Path:
        if source is None:
            raise DatasetError(f"{self.name} needs --source DIR: your local copy of the release "
                               f"(data is never downloaded). Expected: {self.layout}")
        source = Path(source).expanduser().resolve()
        if not source.is_dir():
            raise DatasetError(f"{source}: not a directory. Point --source at your local copy of the "
                               f"{self.name} release. Expected: {self.layout}")
        # Not bench_home(): it creates the folder, which must not happen inside the source.
        home = Path(os.environ.get("BENCH_HOME", DEFAULT_HOME)).expanduser().resolve()
        if home == source or source in home.parents:
            raise DatasetError(f"{source}: BENCH_HOME {home} lies inside the source; set BENCH_HOME outside the "
                               "release folder so that nothing is written into it.")
        return source

    def _convert_one(self, case: CaseSource, tmp: Path, options: dict) -> int:
        if case.missing:
            what = "; ".join(f"{role}: expected {where}" for role, where in case.missing.items())
            raise DatasetError(f"{case.case_id}: missing {what}. Check that the release was extracted "
                               "completely, or remove the incomplete case.")
        images, mask = self.convert(case, **options)
        for c, img in enumerate(images):
            sitk.WriteImage(img, str(tmp / "imagesTr" / f"{case.case_id}_{c:04d}.nii.gz"), useCompression=True)
        label = sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))
        label.CopyInformation(images[0])  # exact grid equality for nnU-Net's integrity check
        sitk.WriteImage(label, str(tmp / "labelsTr" / f"{case.case_id}.nii.gz"), useCompression=True)
        return int(np.count_nonzero(mask))

    def _outputs(self, folder: Path, cid: str) -> List[Path]:
        return ([folder / "imagesTr" / f"{cid}_{int(c):04d}.nii.gz" for c in sorted(self._channels, key=int)]
                + [folder / "labelsTr" / f"{cid}.nii.gz"])

    def _reuse(self, old: Optional[dict], new: dict, cid: str, tmp: Path) -> Optional[int]:
        """Link the previous output of an unchanged case into the staging folder; its foreground count."""
        if old is None or old["converter"] != new["converter"] or old["options"] != new["options"]:
            return None
        prev = old["cases"].get(cid)
        if prev is None or prev["inputs"] != new["cases"][cid]["inputs"]:
            return None
        srcs, dsts = self._outputs(self.raw_dir(), cid), self._outputs(tmp, cid)
        if not all(p.is_file() for p in srcs):
            return None
        for s, d in zip(srcs, dsts):
            try:
                os.link(s, d)   # same file system: no copy, mtimes kept
            except OSError:
                shutil.copy2(s, d)
        return int(prev["foreground_voxels"])

    def _check_not_empty(self, case: CaseSource, n: int, needs_label: Dict[str, str]) -> None:
        if n:
            return
        where = case.files.get("label", case.case_id)
        if case.case_id in needs_label:
            raise DatasetError(f"{where}: label of {case.case_id} is empty (no lymph-node voxels), but protocol "
                               f"{needs_label[case.case_id]} uses this case as a test/support/tuning case, which "
                               "needs at least one node. Check that this is the right mask file; if the release "
                               "really has no nodes here, the committed protocol cannot be used with it.")
        warn(f"{where}: label of {case.case_id} is empty (no lymph-node voxels); kept, but no protocol may "
             "use it as a test/support/tuning case.")


def _inputs(manifest: dict) -> tuple:
    return (manifest["converter"], manifest["options"],
            {cid: c["inputs"] for cid, c in manifest["cases"].items()})


def _protocol_label_ids(dataset: str) -> Dict[str, str]:
    """Case id -> 'dataset/version' for every case the latest protocol reads labels of."""
    from bench.protocols import Protocol, available_versions
    if not available_versions(dataset):
        return {}
    p = Protocol.load(dataset)
    return {cid: f"{dataset}/{p.version}" for cid in p.label_ids()}
