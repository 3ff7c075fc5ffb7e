"""``segrap2023-oars``: SegRap2023 as a multi-label task: GTVnd and organs at risk, one label each.

``bench datasets prepare segrap2023-oars --source DIR [--labels GTVnd,Parotid_L,...]`` converts the
training release's case folders (layout A of ``segrap2023``):
``SegRap2023_Training_Set_120cases/segrap_XXXX/`` with ``image.nii.gz`` and one binary mask per
structure, ``<Name>.nii.gz`` (``GTVnd``, ``GTVp`` and the 45 organs of ``OARS``, e.g. ``Parotid_L``).
GTVnd may also come from a one-hot Task002 label, as for ``segrap2023``; organs come from the case
folders only (the one-hot Task001 file merges nested organs into other values).

The label map gives the i-th name of ``--labels`` the value i (``dataset.json`` ``labels``). The release's
organ masks nest (``Brain`` holds ``BrainStem``, ``Eye_L`` holds ``Lens_L``), while a label map holds one
label per voxel: where chosen masks overlap, the one listed later wins and the converter warns with the
voxel count (list the smaller structure last, or choose structures that do not nest). The default label
set is GTVnd with the parotid and submandibular glands, the organs of the nodal neck levels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from bench.datasets import DATASETS
from bench.datasets.base import DatasetError
from bench.datasets.geometry import Geometry, check_same_grid
from bench.datasets.image_io import read_image
from bench.datasets.release import CaseSource
from bench.datasets.validation import label_values, require_3d, warn
from bench.datasets.segrap2023 import SegRap2023, _read_images

# The organ masks of the training release, one file each (the names of the challenge's Task001).
OARS = ("Brain", "BrainStem", "Chiasm", "TemporalLobe_L", "TemporalLobe_R", "Hippocampus_L", "Hippocampus_R",
        "Eye_L", "Eye_R", "Lens_L", "Lens_R", "OpticNerve_L", "OpticNerve_R", "MiddleEar_L", "MiddleEar_R",
        "IAC_L", "IAC_R", "TympanicCavity_L", "TympanicCavity_R", "VestibulSemi_L", "VestibulSemi_R",
        "Cochlea_L", "Cochlea_R", "ETbone_L", "ETbone_R", "Pituitary", "OralCavity", "Mandible_L", "Mandible_R",
        "Submandibular_L", "Submandibular_R", "Parotid_L", "Parotid_R", "Mastoid_L", "Mastoid_R", "TMjoint_L",
        "TMjoint_R", "SpinalCord", "Esophagus", "Larynx", "Larynx_Glottic", "Larynx_Supraglot", "PharynxConst",
        "Thyroid", "Trachea")
STRUCTURES = ("GTVnd", "GTVp") + OARS
DEFAULT_LABELS = ("GTVnd", "Parotid_L", "Parotid_R", "Submandibular_L", "Submandibular_R")


def label_map(names: Sequence[str]) -> Dict[str, int]:
    return {"background": 0, **{name: i for i, name in enumerate(names, 1)}}


def check_labels(names) -> List[str]:
    """The requested structure names, refused by name when unknown, repeated or none."""
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not names:
        raise DatasetError("segrap2023-oars: --labels names no structure; give e.g. --labels "
                           + ",".join(DEFAULT_LABELS))
    unknown = [n for n in names if n not in STRUCTURES]
    if unknown:
        raise DatasetError(f"segrap2023-oars: unknown structure(s) {', '.join(unknown)} in --labels (names are "
                           f"case-sensitive, as the release's file names): {', '.join(STRUCTURES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DatasetError(f"segrap2023-oars: --labels names {', '.join(repeated)} more than once")
    return names


@DATASETS.register("segrap2023-oars")
class SegRap2023Oars(SegRap2023):
    dataset_id = 912
    folder_name = "Dataset912_SegRap2023OARs"
    description = ("SegRap2023 training release as a multi-label task: GTVnd and organs at risk "
                   "(--labels; needs --source)")
    options = {"contrast_channel": False, "labels": DEFAULT_LABELS}
    converter_version = 1
    layout = ("SegRap2023_Training_Set_120cases/segrap_XXXX/{image,GTVnd,<Organ>}.nii.gz: one binary mask per "
              "structure in each case folder (GTVnd may come from "
              "SegRap2023_Training_Set_120cases_OneHot_Labels/Task002/segrap_XXXX.nii.gz)")

    def __init__(self) -> None:
        super().__init__()
        self._labels: Optional[Dict[str, int]] = None

    @property
    def labels(self) -> Dict[str, int]:  # type: ignore[override]
        """The prepared label set (dataset.json), else the one a preparation with the options would make."""
        return self.from_prepared("labels", "_labels", lambda: label_map(DEFAULT_LABELS))

    def _resolve_options(self, given: dict) -> dict:
        names = check_labels(given.get("labels") or DEFAULT_LABELS)
        options = super()._resolve_options({k: v for k, v in given.items() if k != "labels"})
        return {**options, "labels": names}

    def prepare(self, source: Optional[Path] = None, **options) -> Path:
        self._labels = label_map(self._resolve_options(dict(options))["labels"])
        return super().prepare(source, **options)

    def discover(self, source: Path, contrast_channel: bool = False, labels: Sequence[str] = DEFAULT_LABELS,
                 **_) -> Dict[str, CaseSource]:
        cases = super().discover(source, contrast_channel=contrast_channel)
        for cid, case in cases.items():
            if "GTVnd" not in labels:            # GTVnd is not asked for: its file is not needed
                case.files.pop("label", None)
                case.missing.pop("label", None)
            image = case.files.get("image")
            folder = image.parent if image is not None and image.name == "image.nii.gz" else None
            for name in (n for n in labels if n != "GTVnd"):
                path = folder / f"{name}.nii.gz" if folder is not None else None
                if path is not None and path.is_file():
                    case.files[name] = path
                else:
                    case.missing[name] = (str(path) if path is not None else
                                          f"a case folder {cid}/{name}.nii.gz (organ masks ship one file per "
                                          "structure in the training release's case folders)")
        return cases

    def convert(self, case: CaseSource, contrast_channel: bool = False, labels: Sequence[str] = DEFAULT_LABELS,
                **_):
        images = _read_images(case, contrast_channel)
        grid = Geometry.of(images[0])
        out = np.zeros(sitk.GetArrayViewFromImage(images[0]).shape, np.uint8)
        for value, name in enumerate(labels, 1):
            mask = self._gtvnd(case, grid) if name == "GTVnd" else self._structure(case, name, grid)
            overlap = int(np.count_nonzero(out[mask]))
            if overlap:
                under = ", ".join(n for v, n in enumerate(labels, 1) if v < value and np.any(out[mask] == v))
                warn(f"{case.files.get(name, case.case_id)}: {overlap} voxels of {name} are also in {under}; "
                     f"they are labelled {name} (listed later). List the smaller structure last, or choose "
                     "structures that do not nest.")
            out[mask] = value
        return images, out

    def _structure(self, case: CaseSource, name: str, grid: Geometry) -> np.ndarray:
        path = case.files[name]
        img = read_image(path)
        require_3d(img, path, f"{name} mask")
        check_same_grid(grid, Geometry.of(img), case.files["image"], path)
        array = sitk.GetArrayViewFromImage(img)
        unexpected = sorted(set(label_values(array, path)) - {0, 1})
        if unexpected:
            raise DatasetError(f"{path}: unexpected values {unexpected} in the {name} mask (a structure's file is "
                               "binary, 0 and 1). Use the release's own mask file; a merged multi-organ label map "
                               "is not read here.")
        return np.asarray(array) == 1


def protocol_v1() -> dict:
    """How ``bench/protocols/segrap2023-oars/v1.json`` was made (a test checks the committed file matches):
    the test set, pool and draws of segrap2023 v1, so GTVnd results of both tasks share their cases."""
    from bench.datasets.segrap2023 import protocol_v1 as nodes_v1
    data = nodes_v1()
    data["dataset"] = "segrap2023-oars"
    data["notes"] = ("segrap2023-oars: the 120 cases, test set (40), pool (80) and seeded draws of segrap2023 v1 "
                     "(same procedure and seeds; see its notes). Labels: those chosen at preparation "
                     "(dataset.json labels). Every test, support and tuning case needs a non-empty label map; each "
                     "structure is scored alone, with the per-label empty-mask rules of bench/metrics.py.")
    return data
