"""``lnq2023``: mediastinal lymph nodes in chest CT (LNQ2023 challenge, MICCAI 2023).

Data is never downloaded: ``bench datasets prepare lnq2023 --source DIR``
converts a local copy holding ``lnq2023-{train|val|test}-NNNN-{ct,seg}.nrrd``
files, in any sub-folders. Case id: ``lnq2023_{split}_{NNNN}``.

Train labels are partial (not every node is drawn), val and test are fully
annotated: by default only val/test cases are converted; the option
``include_partial_train`` adds the train cases, which no protocol uses as
test, support or tuning cases.

Traps of the real files, each handled here:
- segmentation and CT of different size or origin: the label is resampled onto
  the CT grid (nearest neighbour) when it has the CT's spacing and orientation
  and lies within the CT (half a voxel of tolerance); otherwise refused;
- a 4-D segmentation NRRD (singleton axis, or one layer per segment as 3D
  Slicer writes overlapping segments): collapsed to one mask (every LNQ segment
  is a node); a one-hot stack with a background layer is ambiguous and refused;
- label values other than {0, 1} (255, one id per node): any value > 0 becomes
  1, with a warning; non-integer values are refused.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np
import SimpleITK as sitk

from bench.datasets import DATASETS
from bench.datasets.base import REAL_DATA_EVAL_EVERY, REAL_DATA_ITERATIONS, DatasetError
from bench.datasets.geometry import REGRID_HINT, Geometry, describe_differences, resample_nearest
from bench.datasets.image_io import as_image, read_nrrd
from bench.datasets.release import CaseSource, ReleaseDataset, duplicate_error, walk, warn_download_copies
from bench.datasets.validation import check_finite, label_values, warn

log = logging.getLogger(__name__)

RELEASE_FILE = re.compile(r"^lnq2023-(train|val|test)-(\d{4})-(ct|seg)\.nrrd$", re.IGNORECASE)
PARTIAL_SPLIT = "train"

VAL_IDS = [f"lnq2023_val_{i:04d}" for i in range(1, 21)]
TEST_IDS = [f"lnq2023_test_{i:04d}" for i in range(1, 101)]
PROTOCOL_SEED = 2023


@DATASETS.register("lnq2023")
class LNQ2023(ReleaseDataset):
    dataset_id = 912
    folder_name = "Dataset912_LNQ2023"
    description = "LNQ2023 mediastinal lymph nodes, val 20 + test 100 fully annotated CTs (needs --source)"
    options = {"include_partial_train": False}
    # The challenge ranks on Dice and ASSD and states no NSD tolerance. 2 mm is above
    # the in-plane spacing of chest CT (typically under 1 mm), so a boundary one or two
    # pixels off counts, and well below the radius of an enlarged node (short axis
    # >= 10 mm), so a boundary within it still outlines the node.
    nsd_tolerance_mm = 2.0
    default_iterations, default_eval_every = REAL_DATA_ITERATIONS, REAL_DATA_EVAL_EVERY
    layout = "lnq2023-{train|val|test}-NNNN-ct.nrrd and lnq2023-{train|val|test}-NNNN-seg.nrrd, in any sub-folders"

    def discover(self, source: Path, include_partial_train: bool = False, **_) -> Dict[str, CaseSource]:
        found: Dict[str, Dict[str, List[Path]]] = defaultdict(lambda: defaultdict(list))
        skipped = set()
        for here, _dirs, files in walk(source):
            warn_download_copies(here, [f for f in files if f.lower().startswith("lnq2023-")])
            for f in files:
                m = RELEASE_FILE.match(f)
                if not m:
                    continue
                split, number, kind = m.group(1).lower(), m.group(2), m.group(3).lower()
                cid = f"lnq2023_{split}_{number}"
                if split == PARTIAL_SPLIT and not include_partial_train:
                    skipped.add(cid)
                    continue
                found[cid][kind].append(here / f)
        if skipped:
            log.info("lnq2023: skipped %d partially annotated train cases (use --include-partial-train to keep "
                     "them)", len(skipped))

        cases = {}
        for cid, kinds in sorted(found.items()):
            for paths in kinds.values():
                if len(paths) > 1:
                    raise duplicate_error(cid, paths)
            case = CaseSource(cid)
            _, split, number = cid.split("_")
            for kind, role in (("ct", "image"), ("seg", "label")):
                if kind in kinds:
                    case.files[role] = kinds[kind][0]
                else:
                    other = next(iter(kinds.values()))[0]
                    case.missing[role] = str(other.with_name(f"lnq2023-{split}-{number}-{kind}.nrrd"))
            cases[cid] = case
        return cases

    def convert(self, case: CaseSource, **_):
        ct_path, seg_path = case.files["image"], case.files["label"]
        ct, ct_grid = read_nrrd(ct_path)
        if ct.ndim != 3:
            raise DatasetError(f"{ct_path}: CT has shape {ct.shape} with non-spatial axes; expected one 3-D "
                               "volume. Re-save the CT alone from 3D Slicer.")
        check_finite(ct, ct_path)
        seg, seg_grid = read_nrrd(seg_path)
        values = label_values(seg, seg_path)
        mask = collapse_segments(seg, seg_path)
        if set(values) - {0, 1}:
            warn(f"{seg_path}: label values {[v for v in values if v]} (expected 0/1); every value > 0 becomes "
                 "lymph node (1).")
        ct_img = as_image(ct, ct_grid)
        diff = ct_grid.differences(seg_grid)
        if diff:
            mask = onto_ct_grid(mask, seg_grid, ct_img, diff, ct_path, seg_path)
        return [ct_img], mask


def collapse_segments(seg: np.ndarray, path: Path) -> np.ndarray:
    """One binary z, y, x mask from a 3-D labelmap or a stack of segment layers (leading axes)."""
    layers = seg.reshape(-1, *seg.shape[-3:]) != 0
    if layers.shape[0] > 1:
        if np.all(layers.sum(axis=0) == 1):
            raise DatasetError(f"{path}: segmentation has {layers.shape[0]} layers and every voxel is in exactly "
                               "one of them: a one-hot stack with a background layer, and which layer is "
                               "background is ambiguous. Export it as a 3-D labelmap (3D Slicer: Segmentations > "
                               "Export to labelmap).")
        warn(f"{path}: {layers.shape[0]} segment layers merged into one lymph-node mask (every LNQ2023 segment "
             "is a node).")
    return layers.any(axis=0)


def onto_ct_grid(mask: np.ndarray, seg_grid: Geometry, ct_img: sitk.Image, diff: dict,
                 ct_path: Path, seg_path: Path) -> np.ndarray:
    """Resample a cropped/shifted label onto the CT grid, or refuse when that would lose or invent data."""
    what = describe_differences(diff)
    if "spacing" in diff or "direction" in diff:
        raise DatasetError(f"{seg_path}: label geometry differs from CT {ct_path.name} ({what}); only a label "
                           f"with the CT's spacing and orientation (cropped or shifted) is resampled. {REGRID_HINT}")
    if not Geometry.of(ct_img).contains(seg_grid):
        raise DatasetError(f"{seg_path}: label grid reaches beyond CT {ct_path.name} by more than half a voxel "
                           f"({what}), so part of it would be cut off. {REGRID_HINT}")
    warn(f"{seg_path}: label grid differs from CT {ct_path.name} ({what}); resampled onto the CT grid "
         "(nearest neighbour).")
    label = as_image(mask.astype(np.uint8), seg_grid)
    return sitk.GetArrayFromImage(resample_nearest(label, ct_img)) != 0


def protocol_v1() -> dict:
    """How ``bench/protocols/lnq2023/v1.json`` was made (a test checks the committed file matches)."""
    from bench.protocols import make_protocol
    notes = ("LNQ2023 release: train split partially annotated (never eligible: converted only with "
             "--include-partial-train, never test, support or tuning), val (20) and test (100) fully annotated. "
             "test = the challenge's test split lnq2023_test_0001..0100, so numbers are comparable with the "
             "challenge; pool = the val split lnq2023_val_0001..0020, the only other fully annotated cases. "
             "Assumes the release numbers val 0001-0020 and test 0001-0100 (file names lnq2023-val-NNNN-*.nrrd, "
             "lnq2023-test-NNNN-*.nrrd); if yours differ, Protocol.check names the missing ids: write a v2, "
             "never edit v1. With 20 pool cases, the 5 repeats' 5-shot sets overlap.")
    return make_protocol("lnq2023", "v1", VAL_IDS, TEST_IDS, shots=(1, 3, 5), repeats=5, seed=PROTOCOL_SEED,
                         notes=notes)
