"""``segrap2023``: nasopharyngeal-carcinoma CT (SegRap2023 challenge), target = nodal GTV (GTVnd).

Data is never downloaded: ``bench datasets prepare segrap2023 --source DIR``
converts a local copy. ``DIR`` may be the release folder, its parent, or one
more level up (an archive extracted into a folder of the same name). Accepted
layouts, mixable:

A. training release ``SegRap2023_Training_Set_120cases/segrap_XXXX/`` with
   ``image.nii.gz``, ``image_contrast.nii.gz``, ``GTVnd.nii.gz`` (the target),
   ``GTVp.nii.gz`` and organ masks (ignored);
B. one-hot release ``SegRap2023_Training_Set_120cases_OneHot_Labels/Task002/segrap_XXXX.nii.gz``
   (0 background, 1 GTVp, 2 GTVnd) with the images of A; a case folder without
   ``GTVnd.nii.gz`` takes its one-hot label. ``Task001`` (organs) is ignored;
C. nnU-Net style: ``imagesTr/segrap_XXXX_0000.nii.gz`` (``_0001`` = contrast CT)
   and ``labelsTr/segrap_XXXX.nii.gz`` holding the one-hot labels of B.

One-hot labels become 1 = GTVnd, 0 = everything else (GTVp included). Files
such as ``GTVnd (1).nii.gz`` are download copies: ignored with a warning.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from bench.datasets import DATASETS
from bench.datasets.base import DatasetError
from bench.datasets.geometry import Geometry, check_same_grid
from bench.datasets.image_io import read_image
from bench.datasets.release import CaseSource, ReleaseDataset, duplicate_error, walk, warn_download_copies
from bench.datasets.validation import check_finite_image, label_values, require_3d, warn

CASE_DIR = re.compile(r"^segrap_\d{4}$")
ONEHOT_LABEL = re.compile(r"^(segrap_\d{4})\.nii\.gz$")
NNUNET_IMAGE = re.compile(r"^(segrap_\d{4})_(0000|0001)\.nii\.gz$")
ONEHOT_DIRS = ("task002", "labelstr")   # folder names, compared lower-case
MAX_DEPTH = 3                           # release folder, its parent, one extra nesting level
GTVND, ONEHOT_GTVND = 1, 2

CASE_IDS = [f"segrap_{i:04d}" for i in range(120)]
PROTOCOL_SEED, TEST_SEED, N_TEST = 2023, 7, 40


@DATASETS.register("segrap2023")
class SegRap2023(ReleaseDataset):
    dataset_id = 911
    folder_name = "Dataset911_SegRap2023"
    description = "SegRap2023 training release, 120 nasopharyngeal CTs, target GTVnd (needs --source)"
    options = {"contrast_channel": False}
    # The challenge's evaluation (HiLab-git/SegRap2023, Eval/SegRap_Task002_DSC_NSD_Eval.py)
    # scores GTVnd NSD at 1 mm; kept so that ``nsd`` compares with the published numbers.
    # It is below the ~3 mm slice spacing: ``nsd_voxel`` is the voxel-sized reading.
    nsd_tolerance_mm = 1.0
    layout = ("SegRap2023_Training_Set_120cases/segrap_XXXX/{image,image_contrast,GTVnd}.nii.gz, optionally "
              "SegRap2023_Training_Set_120cases_OneHot_Labels/Task002/segrap_XXXX.nii.gz, or "
              "imagesTr/segrap_XXXX_0000.nii.gz + labelsTr/segrap_XXXX.nii.gz (one-hot: 1 GTVp, 2 GTVnd)")

    def channels_for(self, contrast_channel: bool = False, **_) -> Dict[str, str]:
        return {"0": "CT", "1": "CT"} if contrast_channel else {"0": "CT"}

    def discover(self, source: Path, contrast_channel: bool = False, **_) -> Dict[str, CaseSource]:
        folders, onehot, nnunet = _scan(source)
        for key, paths in list(onehot.items()) + [(k[0], v) for k, v in nnunet.items()]:
            if len(paths) > 1:
                raise duplicate_error(key, paths)
        ids = sorted(set(folders) | set(onehot) | {c for c, _ in nnunet})
        return {cid: _locate(cid, folders, onehot, nnunet, contrast_channel) for cid in ids}

    def convert(self, case: CaseSource, contrast_channel: bool = False, **_):
        images = _read_images(case, contrast_channel)
        return images, self._gtvnd(case, Geometry.of(images[0]))

    def _gtvnd(self, case: CaseSource, grid: Geometry) -> np.ndarray:
        """The case's binary GTVnd mask, from its GTVnd.nii.gz or its one-hot Task002 label."""
        image_path, label_path = case.files["image"], case.files["label"]
        label = read_image(label_path)
        require_3d(label, label_path, "label")
        check_same_grid(grid, Geometry.of(label), image_path, label_path)
        array = sitk.GetArrayViewFromImage(label)
        values = label_values(array, label_path)
        if case.kind == "binary":
            allowed, target = {0, GTVND}, GTVND
            expected = "GTVnd.nii.gz is a binary mask with values 0 and 1"
        else:
            allowed, target = {0, 1, ONEHOT_GTVND}, ONEHOT_GTVND
            expected = "a Task002 one-hot label holds 0 background, 1 GTVp, 2 GTVnd"
        unexpected = sorted(set(values) - allowed)
        if unexpected:
            raise DatasetError(f"{label_path}: unexpected label values {unexpected} ({expected}). Check that this "
                               "is the lymph-node label of the case (Task001 files are organ labels, values up to "
                               "45); the converter does not guess what other values mean.")
        if case.kind == "onehot" and values and ONEHOT_GTVND not in values and 1 in values:
            warn(f"{label_path}: one-hot label has only value 1 (= GTVp, primary tumour), so no lymph node is "
                 "left. If this file is already a binary lymph-node mask, use layout A (GTVnd.nii.gz).")
        return np.asarray(array) == target


def _read_images(case: CaseSource, contrast_channel: bool) -> List[sitk.Image]:
    image_path = case.files["image"]
    image = _read_volume(image_path, "image")
    images = [image]
    if contrast_channel:
        path = case.files["contrast"]
        contrast = _read_volume(path, "contrast image")
        check_same_grid(Geometry.of(image), Geometry.of(contrast), image_path, path, "contrast image")
        images.append(contrast)
    return images


Found = Dict[str, List[Path]]


def _scan(source: Path) -> Tuple[Found, Found, Dict[Tuple[str, str], List[Path]]]:
    """Case folders, one-hot label files and nnU-Net-style images under source, by case id."""
    folders: Found = defaultdict(list)
    onehot: Found = defaultdict(list)
    nnunet: Dict[Tuple[str, str], List[Path]] = defaultdict(list)
    for here, dirs, files in walk(source, MAX_DEPTH):
        for d in dirs:
            if CASE_DIR.match(d):
                folders[d].append(here / d)
        dirs[:] = [d for d in dirs if not CASE_DIR.match(d)]   # case folders are read, not walked
        kind = here.name.lower()
        if kind in ONEHOT_DIRS:
            for f in files:
                if m := ONEHOT_LABEL.match(f):
                    onehot[m.group(1)].append(here / f)
        elif kind == "imagestr":
            for f in files:
                if m := NNUNET_IMAGE.match(f):
                    nnunet[(m.group(1), m.group(2))].append(here / f)
        else:
            continue
        warn_download_copies(here, files)
    return folders, onehot, nnunet


def _locate(cid: str, folders: Found, onehot: Found, nnunet: Dict[Tuple[str, str], List[Path]],
            contrast_channel: bool) -> CaseSource:
    """One case's files; a case folder's GTVnd.nii.gz wins over a one-hot label."""
    places = folders.get(cid, []) + nnunet.get((cid, "0000"), [])
    if len(places) > 1:
        raise duplicate_error(cid, places)
    case = CaseSource(cid)
    binary = None
    if cid in folders:
        folder = folders[cid][0]
        warn_download_copies(folder, sorted(os.listdir(folder)))
        image, contrast, binary = (folder / "image.nii.gz", folder / "image_contrast.nii.gz",
                                   folder / "GTVnd.nii.gz")
    else:
        image = nnunet.get((cid, "0000"), [None])[0]
        contrast = nnunet.get((cid, "0001"), [None])[0]
        if image is not None and contrast is None:
            contrast = image.with_name(f"{cid}_0001.nii.gz")
    _expect(case, "image", image, f"a case folder {cid}/image.nii.gz or imagesTr/{cid}_0000.nii.gz")
    if contrast_channel:
        _expect(case, "contrast", contrast, f"{cid}/image_contrast.nii.gz or imagesTr/{cid}_0001.nii.gz")
    if binary is not None and binary.is_file():
        case.files["label"], case.kind = binary, "binary"
    elif cid in onehot:
        case.files["label"], case.kind = onehot[cid][0], "onehot"
    else:
        where = f"{binary} or " if binary is not None else ""
        case.missing["label"] = (f"{where}a one-hot Task002/{cid}.nii.gz (GTVnd is the lymph-node target; "
                                 "Task001 holds organ labels only)")
    return case


def _expect(case: CaseSource, role: str, path: Optional[Path], otherwise: str) -> None:
    if path is not None and path.is_file():
        case.files[role] = path
    else:
        case.missing[role] = str(path) if path is not None else otherwise


def _read_volume(path: Path, what: str) -> sitk.Image:
    img = read_image(path)
    require_3d(img, path, what)
    check_finite_image(img, path)
    return img


def protocol_v1() -> dict:
    """How ``bench/protocols/segrap2023/v1.json`` was made (a test checks the committed file matches)."""
    from bench.protocols import make_protocol
    perm = np.random.default_rng(TEST_SEED).permutation(len(CASE_IDS))
    test = sorted(CASE_IDS[i] for i in perm[:N_TEST])
    pool = [c for c in CASE_IDS if c not in test]
    notes = (f"SegRap2023 training release, 120 cases segrap_0000..segrap_0119 (the challenge's own "
             f"validation/test labels are not public, so every case comes from the training release); label = "
             f"GTVnd. test = {N_TEST} cases, sorted(numpy.random.default_rng({TEST_SEED}).permutation(120)[:40]) "
             "(a random third rather than a block of ids, so acquisition order cannot bias it; 40 cases give "
             "paired per-case Dice comparisons between methods tight bootstrap intervals). pool = the other 80: "
             "each repeat draws 5-shot support + 5 tuning cases (10 of 80), so repeats see different cases. "
             "Every test, support and tuning case must have a non-empty GTVnd.")
    return make_protocol("segrap2023", "v1", pool, test, shots=(1, 3, 5), repeats=5, seed=PROTOCOL_SEED,
                         notes=notes)
