"""lnq2023 converter: NRRD release files, the real-file traps (cropped labels, 4-D segmentations,
labels other than {0,1}), every refusal, idempotency.

Synthetic 8x16x16 volumes named exactly as in the release; BENCH_HOME is a temporary folder.
"""
import logging
import shutil
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from bench.cli import main
from bench.datasets import DatasetError, get_dataset
from bench.datasets.geometry import Geometry
from bench.datasets.image_io import read_nrrd
from bench.datasets.validation import DatasetWarning
from test_datasets_segrap import assert_nothing_published, digest, mtimes

pytestmark = pytest.mark.usefixtures("bench_home")   # conftest: BENCH_HOME in tmp_path

SHAPE = (8, 16, 16)              # z, y, x
SPACING = (0.8, 0.8, 2.0)        # x, y, z
ORIGIN = (-10.0, 20.0, 30.0)
LPS = "left-posterior-superior"
FULL = ["lnq2023_test_0001", "lnq2023_test_0002", "lnq2023_val_0001", "lnq2023_val_0002"]


def write_nrrd(path: Path, data: np.ndarray, spacing=SPACING, origin=ORIGIN, space=LPS, layers="fastest",
               encoding="gzip", directions=None) -> None:
    """``data`` is z, y, x (or n, z, y, x: n segment layers, stored as the fastest or slowest file axis)."""
    dirs = np.asarray(directions if directions is not None else np.diag(spacing), float)
    kinds = ["domain"] * 3
    if data.ndim == 4:
        none = np.full((1, 3), np.nan)
        if layers == "fastest":          # as 3D Slicer writes segment layers
            data, dirs, kinds = np.moveaxis(data, 0, -1), np.vstack([none, dirs]), ["list"] + kinds
        else:
            dirs, kinds = np.vstack([dirs, none]), kinds + ["list"]
    header = {"space": space, "space directions": dirs, "space origin": np.asarray(origin, float),
              "kinds": kinds, "encoding": encoding}
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), np.ascontiguousarray(data), header, index_order="C")


def ct(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, SHAPE).astype(np.int16)


def nodes(seed: int) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[2:5, 4 + seed % 3:9, 5:10] = 1
    return m


def files(root: Path, split: str, number: int) -> tuple:
    folder = root / "LNQ2023" / split
    stem = f"lnq2023-{split}-{number:04d}"
    return folder / f"{stem}-ct.nrrd", folder / f"{stem}-seg.nrrd"


def make_release(root: Path) -> Path:
    for seed, (split, number) in enumerate([("val", 1), ("val", 2), ("test", 1), ("test", 2), ("train", 1)]):
        ct_path, seg_path = files(root, split, number)
        write_nrrd(ct_path, ct(seed))
        write_nrrd(seg_path, nodes(seed) if split != "train" else np.zeros(SHAPE, np.uint8))
    return root


def prepared_label(cid: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(get_dataset("lnq2023").label_file(cid)))


# ---------------------------------------------------------------- happy paths

def test_release_converts_fully_annotated_cases(tmp_path, caplog):
    root = make_release(tmp_path / "src")
    before = digest(root)
    ds = get_dataset("lnq2023")
    with caplog.at_level(logging.INFO, logger="bench.datasets"):
        ds.prepare(root)
    assert ds.case_ids() == FULL
    assert "skipped 1 partially annotated train" in caplog.text
    np.testing.assert_array_equal(prepared_label("lnq2023_val_0002"), nodes(1))
    img = sitk.ReadImage(ds.image_files("lnq2023_test_0001")[0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), ct(2))
    assert np.allclose(img.GetSpacing(), SPACING) and np.allclose(img.GetOrigin(), ORIGIN)
    assert digest(root) == before                  # nothing written into the source


def test_partial_train_cases_only_on_request(tmp_path):
    root = make_release(tmp_path / "src")
    ds = get_dataset("lnq2023")
    with pytest.warns(DatasetWarning, match="label of lnq2023_train_0001 is empty"):
        ds.prepare(root, include_partial_train=True)   # train labels may be empty: partial annotation
    assert ds.case_ids() == sorted(FULL + ["lnq2023_train_0001"])


def test_nrrd_reader_agrees_with_itk_on_ras_oblique_files(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    dirs = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) * np.array(SPACING)[:, None]
    path = tmp_path / "ras.nrrd"
    write_nrrd(path, ct(0), space="right-anterior-superior", directions=dirs)
    array, geometry = read_nrrd(path)
    itk = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(array, sitk.GetArrayFromImage(itk))
    assert not Geometry.of(itk).differences(geometry)


def test_cropped_label_inside_the_ct_is_resampled(tmp_path):
    root = make_release(tmp_path / "src")
    _, seg_path = files(root, "val", 1)
    crop = np.ones((3, 6, 6), np.uint8)         # z 2..4, y 5..10, x 4..9 of the CT grid
    offset = np.array([4, 5, 2]) * np.array(SPACING)
    write_nrrd(seg_path, crop, origin=np.array(ORIGIN) + offset)
    with pytest.warns(DatasetWarning, match="lnq2023-val-0001-seg.nrrd: label grid differs.*resampled"):
        get_dataset("lnq2023").prepare(root)
    expected = np.zeros(SHAPE, np.uint8)
    expected[2:5, 5:11, 4:10] = 1
    np.testing.assert_array_equal(prepared_label("lnq2023_val_0001"), expected)


@pytest.mark.parametrize("layout", ["leading singleton", "trailing singleton", "overlapping layers"])
def test_4d_segmentation_is_collapsed(tmp_path, layout):
    root = make_release(tmp_path / "src")
    _, seg_path = files(root, "val", 2)
    if layout == "overlapping layers":             # 3D Slicer: one layer per overlapping segment
        a, b = nodes(1), np.roll(nodes(1), 2, axis=1)
        write_nrrd(seg_path, np.stack([a, b]))
        expected = (a | b).astype(np.uint8)
        with pytest.warns(DatasetWarning, match="2 segment layers merged"):
            get_dataset("lnq2023").prepare(root)
    else:
        write_nrrd(seg_path, nodes(1)[None], layers="fastest" if layout == "leading singleton" else "slowest")
        expected = nodes(1)
        get_dataset("lnq2023").prepare(root)
    np.testing.assert_array_equal(prepared_label("lnq2023_val_0002"), expected)


@pytest.mark.parametrize("values", [[255], [1, 2, 3]])
def test_label_values_other_than_one_become_one(tmp_path, values):
    root = make_release(tmp_path / "src")
    _, seg_path = files(root, "test", 2)
    seg = nodes(3).astype(np.uint8)
    seg[seg == 1] = np.resize(values, int(seg.sum()))
    write_nrrd(seg_path, seg)
    with pytest.warns(DatasetWarning, match=rf"lnq2023-test-0002-seg.nrrd: label values \{values}.*becomes"):
        get_dataset("lnq2023").prepare(root)
    np.testing.assert_array_equal(prepared_label("lnq2023_test_0002"), nodes(3))


# ---------------------------------------------------------------- refusals

def _seg(data=None, **kw):
    return lambda ct_path, seg_path: write_nrrd(seg_path, nodes(0) if data is None else data, **kw)


def _truncate(which):
    def change(ct_path, seg_path):
        path = ct_path if which == "ct" else seg_path
        if which == "seg":
            write_nrrd(path, nodes(0), encoding="raw")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 300])
    return change


def _nan_ct(ct_path, seg_path):
    a = ct(0).astype(np.float32)
    a[1, 2, 3] = np.nan
    write_nrrd(ct_path, a)


def _onehot_with_background(ct_path, seg_path):
    write_nrrd(seg_path, np.stack([1 - nodes(0), nodes(0)]))


BAD_INPUTS = {
    "missing seg": (lambda c, s: s.unlink(), ["lnq2023_val_0001", "lnq2023-val-0001-seg.nrrd", "missing label"]),
    "missing ct": (lambda c, s: c.unlink(), ["lnq2023-val-0001-ct.nrrd", "missing image"]),
    "label beyond the CT": (_seg(np.ones((8, 16, 16), np.uint8), origin=np.array(ORIGIN) + (0, 0, 4.0)),
                            ["lnq2023-val-0001-seg.nrrd", "beyond CT", "half a voxel", "Export to labelmap"]),
    "label spacing": (_seg(np.ones((8, 16, 16), np.uint8), spacing=(0.8, 0.8, 2.5)),
                      ["lnq2023-val-0001-seg.nrrd", "spacing", "only a label with the CT's spacing"]),
    "label direction": (_seg(directions=np.diag(SPACING) * [-1, 1, 1]), ["direction"]),
    "one-hot with background": (_onehot_with_background, ["lnq2023-val-0001-seg.nrrd", "ambiguous", "labelmap"]),
    "non-integer label": (_seg(nodes(0) * np.float32(0.7)), ["lnq2023-val-0001-seg.nrrd", "non-integer"]),
    "NaN in CT": (_nan_ct, ["lnq2023-val-0001-ct.nrrd", "NaN or infinite"]),
    "truncated CT": (_truncate("ct"), ["lnq2023-val-0001-ct.nrrd", "truncated", "extract it again"]),
    "truncated seg": (_truncate("seg"), ["lnq2023-val-0001-seg.nrrd", "truncated"]),
    "empty label of a protocol case": (_seg(np.zeros(SHAPE, np.uint8)),
                                       ["lnq2023-val-0001-seg.nrrd", "empty", "protocol lnq2023/v1"]),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_published(tmp_path, problem):
    change, expected = BAD_INPUTS[problem]
    root = make_release(tmp_path / "src")
    change(*files(root, "val", 1))
    ds = get_dataset("lnq2023")
    with pytest.raises(DatasetError) as err:
        ds.prepare(root)
    for text in expected:
        assert text in str(err.value)
    assert_nothing_published(ds)


def test_duplicate_case_id_is_refused(tmp_path):
    root = make_release(tmp_path / "src")
    ct_path, _ = files(root, "test", 2)
    (root / "copy").mkdir()
    shutil.copy(ct_path, root / "copy" / ct_path.name)
    with pytest.raises(DatasetError, match="lnq2023_test_0002 occurs 2 times"):
        get_dataset("lnq2023").prepare(root)


def test_second_run_with_nothing_new_does_nothing(tmp_path, caplog):
    root = make_release(tmp_path / "src")
    ds = get_dataset("lnq2023")
    ds.prepare(root)
    before = mtimes(ds.raw_dir())
    with caplog.at_level(logging.INFO, logger="bench.datasets"):
        ds.prepare(root)
    assert "nothing changed" in caplog.text and mtimes(ds.raw_dir()) == before


def test_cli_options_are_per_dataset(tmp_path, capsys):
    root = make_release(tmp_path / "src")
    assert main(["datasets", "prepare", "lnq2023", "--source", str(root), "--contrast-channel"]) == 2
    assert "no option contrast_channel" in capsys.readouterr().err
    with pytest.warns(DatasetWarning):
        assert main(["datasets", "prepare", "lnq2023", "--source", str(root), "--include-partial-train"]) == 0
    assert "lnq2023: 5 cases" in capsys.readouterr().out
