"""segrap2023 converter: both release layouts, every refusal, idempotency, no half-written output.

Synthetic 8x16x16 volumes in the exact release layouts; BENCH_HOME is a temporary folder.
"""
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from bench.cli import main
from bench.datasets import DatasetError, get_dataset
from bench.datasets.base import COMPLETE_MARKER
from bench.datasets.validation import DatasetWarning
from bench.protocols import Protocol

SHAPE = (8, 16, 16)          # z, y, x
SPACING = (0.9, 0.9, 3.0)    # x, y, z
RELEASE = "SegRap2023_Training_Set_120cases"
IDS = ["segrap_0000", "segrap_0001", "segrap_0002", "segrap_0003"]

pytestmark = pytest.mark.usefixtures("bench_home")   # conftest: BENCH_HOME in tmp_path


def write(path: Path, array: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def ct(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(40, 80, SHAPE).astype(np.int16)


def node_mask(i: int) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[2:5, 3 + i:7 + i, 4:8] = 1
    return m


def make_case(folder: Path, i: int) -> None:
    write(folder / "image.nii.gz", ct(i))
    write(folder / "image_contrast.nii.gz", ct(100 + i))
    write(folder / "GTVnd.nii.gz", node_mask(i))
    write(folder / "GTVp.nii.gz", np.roll(node_mask(i), 6, axis=2))
    write(folder / "Brain.nii.gz", np.ones(SHAPE, np.uint8))


def make_release(root: Path, ids=IDS) -> Path:
    """``root/SegRap2023_Training_Set_120cases/segrap_XXXX/...``; returns root (the parent)."""
    for cid in ids:
        make_case(root / RELEASE / cid, int(cid[-4:]))
    return root


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def label(ds, cid) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(ds.label_file(cid)))


def assert_nothing_published(ds) -> None:
    assert not ds.is_prepared()
    assert not (ds.raw_dir() / COMPLETE_MARKER).exists()
    assert not staging_leftovers(ds)


def staging_leftovers(ds) -> list:
    return list(ds.raw_dir().parent.glob(ds.raw_dir().name + ".partial*"))


# ---------------------------------------------------------------- happy paths

@pytest.mark.parametrize("where", ["parent", "release folder", "extra nesting"])
def test_training_release_converts(tmp_path, where):
    root = make_release(tmp_path / "src")
    if where == "extra nesting":   # archive extracted into a folder of the same name
        shutil.move(str(root / RELEASE), str(tmp_path / "tmp"))
        (root / RELEASE).mkdir()
        shutil.move(str(tmp_path / "tmp"), str(root / RELEASE / RELEASE))
    source = root / RELEASE if where == "release folder" else root
    before = digest(root)
    ds = get_dataset("segrap2023")
    out = ds.prepare(source)

    assert out == ds.raw_dir() and ds.is_prepared()
    assert ds.case_ids() == IDS
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in IDS]
    for i, cid in enumerate(IDS):
        np.testing.assert_array_equal(label(ds, cid), node_mask(i))
        img = sitk.ReadImage(ds.image_files(cid)[0])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), ct(i))
        assert np.allclose(img.GetSpacing(), SPACING)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "lymph_node": 1}
    assert digest(root) == before           # nothing written into the source


def test_contrast_channel_is_channel_1(tmp_path):
    ds = get_dataset("segrap2023")
    ds.prepare(make_release(tmp_path / "src"), contrast_channel=True)
    fresh = get_dataset("segrap2023")        # a later process learns the channels from dataset.json
    assert fresh.channel_names == {"0": "CT", "1": "CT"}
    files = fresh.image_files("segrap_0002")
    assert [Path(f).name for f in files] == ["segrap_0002_0000.nii.gz", "segrap_0002_0001.nii.gz"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(files[1])), ct(102))


def onehot(i: int) -> np.ndarray:
    """0 background, 1 GTVp, 2 GTVnd."""
    lab = np.roll(node_mask(i), 6, axis=2).astype(np.uint8)
    lab[node_mask(i) == 1] = 2
    return lab


def test_official_onehot_release(tmp_path):
    """Task002 labels with the training release's images; Task001 (organs) is ignored."""
    root = tmp_path / "src"
    for i, cid in enumerate(IDS[:2]):
        folder = root / RELEASE / cid
        write(folder / "image.nii.gz", ct(i))
        labels = root / "SegRap2023_Training_Set_120cases_OneHot_Labels"
        write(labels / "Task002" / f"{cid}.nii.gz", onehot(i))
        write(labels / "Task001" / f"{cid}.nii.gz", np.full(SHAPE, 45, np.uint8))
    ds = get_dataset("segrap2023")
    ds.prepare(root)
    for i, cid in enumerate(IDS[:2]):
        np.testing.assert_array_equal(label(ds, cid), node_mask(i))   # 2 -> 1, GTVp (1) -> 0


def test_nnunet_style_onehot_layout(tmp_path):
    root = tmp_path / "src" / "segrap_onehot"
    for i, cid in enumerate(IDS[:2]):
        write(root / "imagesTr" / f"{cid}_0000.nii.gz", ct(i))
        write(root / "imagesTr" / f"{cid}_0001.nii.gz", ct(100 + i))
        write(root / "labelsTr" / f"{cid}.nii.gz", onehot(i))
    ds = get_dataset("segrap2023")
    ds.prepare(tmp_path / "src", contrast_channel=True)
    assert ds.case_ids() == IDS[:2]
    np.testing.assert_array_equal(label(ds, "segrap_0001"), node_mask(1))
    assert len(ds.image_files("segrap_0001")) == 2


def test_download_copy_is_ignored_with_warning(tmp_path):
    root = make_release(tmp_path / "src", IDS[:2])
    write(root / RELEASE / "segrap_0001" / "GTVnd (1).nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.warns(DatasetWarning, match=r"GTVnd \(1\)\.nii\.gz.*duplicate download copy"):
        get_dataset("segrap2023").prepare(root)
    np.testing.assert_array_equal(label(get_dataset("segrap2023"), "segrap_0001"), node_mask(1))


def test_macos_zip_metadata_is_not_a_duplicate(tmp_path):
    root = make_release(tmp_path / "src", IDS[:2])
    junk = root / "__MACOSX" / RELEASE / "segrap_0001"
    junk.mkdir(parents=True)
    (junk / "._image.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    assert get_dataset("segrap2023").prepare(root).is_dir()


# ---------------------------------------------------------------- refusals

def _rewrite(name, array=None, **geometry):
    def change(case: Path):
        write(case / name, array if array is not None else node_mask(1), **geometry)
    return change


def _truncate(name):
    def change(case: Path):
        data = (case / name).read_bytes()
        (case / name).write_bytes(data[: len(data) // 2])
    return change


def _delete(name):
    return lambda case: (case / name).unlink()


def _with_nan(name):
    def change(case: Path):
        a = ct(1).astype(np.float32)
        a[3, 5, 5], a[4, 6, 6] = np.nan, np.inf
        write(case / name, a)
    return change


BAD_INPUTS = {
    "missing image": (_delete("image.nii.gz"), {}, ["segrap_0001", "image.nii.gz", "extracted completely"]),
    "missing label": (_delete("GTVnd.nii.gz"), {}, ["segrap_0001", "GTVnd.nii.gz", "Task002"]),
    "missing contrast": (_delete("image_contrast.nii.gz"), {"contrast_channel": True},
                         ["image_contrast.nii.gz", "extracted completely"]),
    "label size": (_rewrite("GTVnd.nii.gz", np.zeros((8, 16, 17), np.uint8)), {},
                   ["GTVnd.nii.gz", "size (16, 16, 8) vs (17, 16, 8)", "Export to labelmap"]),
    "label spacing": (_rewrite("GTVnd.nii.gz", spacing=(0.9, 0.9, 2.5)), {}, ["GTVnd.nii.gz", "spacing"]),
    "label origin": (_rewrite("GTVnd.nii.gz", origin=(0.0, 0.0, 6.0)), {}, ["GTVnd.nii.gz", "origin"]),
    "label direction": (_rewrite("GTVnd.nii.gz", direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)), {},
                        ["GTVnd.nii.gz", "direction", "same case"]),
    "contrast size": (_rewrite("image_contrast.nii.gz", np.zeros((9, 16, 16), np.int16)), {"contrast_channel": True},
                      ["image_contrast.nii.gz", "contrast image geometry", "size"]),
    "4-D label": (_rewrite("GTVnd.nii.gz", np.zeros((2,) + SHAPE, np.uint8), spacing=SPACING + (1.0,),
                           origin=(0.0,) * 4), {}, ["GTVnd.nii.gz", "4-D", "3-D file"]),
    "non-integer label": (_rewrite("GTVnd.nii.gz", node_mask(1) * np.float32(0.5)), {},
                          ["GTVnd.nii.gz", "non-integer values (e.g. 0.5)", "nearest neighbour"]),
    "label 255": (_rewrite("GTVnd.nii.gz", node_mask(1) * np.uint8(255)), {},
                  ["GTVnd.nii.gz", "unexpected label values [255]", "binary mask"]),
    "NaN image": (_with_nan("image.nii.gz"), {}, ["image.nii.gz", "2 voxels are NaN or infinite", "re-export"]),
    "inf contrast": (_with_nan("image_contrast.nii.gz"), {"contrast_channel": True},
                     ["image_contrast.nii.gz", "NaN or infinite"]),
    "truncated image": (_truncate("image.nii.gz"), {}, ["image.nii.gz", "truncated", "extract it again"]),
    "truncated label": (_truncate("GTVnd.nii.gz"), {}, ["GTVnd.nii.gz", "truncated"]),
    "not an image": (lambda case: (case / "image.nii.gz").write_bytes(b"not a nifti"), {},
                     ["image.nii.gz", "cannot be read"]),
}


@pytest.mark.parametrize("problem", list(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_published(tmp_path, problem):
    change, options, expected = BAD_INPUTS[problem]
    root = make_release(tmp_path / "src", IDS[:2])
    change(root / RELEASE / "segrap_0001")
    ds = get_dataset("segrap2023")
    with pytest.raises(DatasetError) as err:
        ds.prepare(root, **options)
    for text in expected:
        assert text in str(err.value)
    assert_nothing_published(ds)


def test_all_problems_are_reported_at_once(tmp_path):
    root = make_release(tmp_path / "src", IDS[:3])
    (root / RELEASE / "segrap_0000" / "GTVnd.nii.gz").unlink()
    _truncate("image.nii.gz")(root / RELEASE / "segrap_0002")
    with pytest.raises(DatasetError, match="2 problem") as err:
        get_dataset("segrap2023").prepare(root)
    assert "segrap_0000" in str(err.value) and "segrap_0002" in str(err.value)


def test_duplicate_case_id_is_refused(tmp_path):
    root = make_release(tmp_path / "src", IDS[:2])
    shutil.copytree(root / RELEASE / "segrap_0001", root / "backup" / "segrap_0001")
    with pytest.raises(DatasetError, match="segrap_0001 occurs 2 times") as err:
        get_dataset("segrap2023").prepare(root)
    assert str(root / "backup" / "segrap_0001") in str(err.value)


def test_empty_label_refused_only_where_the_protocol_needs_a_node(tmp_path):
    needed = set(Protocol.load("segrap2023").label_ids())
    used, unused = sorted(needed)[0], sorted(set(f"segrap_{i:04d}" for i in range(120)) - needed)[0]
    root = make_release(tmp_path / "src", [used, unused])
    write(root / RELEASE / unused / "GTVnd.nii.gz", np.zeros(SHAPE, np.uint8))
    ds = get_dataset("segrap2023")
    with pytest.warns(DatasetWarning, match=f"label of {unused} is empty"):
        ds.prepare(root)                               # unused case: kept, with a warning
    write(root / RELEASE / used / "GTVnd.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(DatasetError, match=f"label of {used} is empty.*protocol segrap2023/v1"), \
            pytest.warns(DatasetWarning, match=unused):
        ds.prepare(root)


def test_unknown_option_and_bad_source(tmp_path, monkeypatch):
    ds = get_dataset("segrap2023")
    with pytest.raises(DatasetError, match="no option include_partial_train"):
        ds.prepare(tmp_path, include_partial_train=True)
    with pytest.raises(DatasetError, match="needs --source"):
        ds.prepare(None)
    with pytest.raises(DatasetError, match="not a directory"):
        ds.prepare(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no segrap2023 cases found.*GTVnd"):
        ds.prepare(tmp_path / "empty")
    monkeypatch.setenv("BENCH_HOME", str(tmp_path / "empty" / "home"))
    with pytest.raises(DatasetError, match="BENCH_HOME .* lies inside the source"):
        ds.prepare(tmp_path / "empty")
    assert not (tmp_path / "empty" / "home").exists()


# ---------------------------------------------------------------- idempotent, resumable, atomic

def mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_second_run_with_nothing_new_does_nothing(tmp_path, caplog):
    root = make_release(tmp_path / "src")
    ds = get_dataset("segrap2023")
    ds.prepare(root)
    before = mtimes(ds.raw_dir())
    with caplog.at_level(logging.INFO, logger="bench.datasets"):
        ds.prepare(root)
    assert "nothing changed" in caplog.text
    assert mtimes(ds.raw_dir()) == before


def test_changed_source_reconverts_only_changed_cases(tmp_path):
    root = make_release(tmp_path / "src", IDS[:3])
    ds = get_dataset("segrap2023")
    ds.prepare(root)
    kept = (ds.raw_dir() / "imagesTr" / "segrap_0000_0000.nii.gz").stat()
    make_case(root / RELEASE / "segrap_0003", 3)                       # a new case
    write(root / RELEASE / "segrap_0001" / "GTVnd.nii.gz", node_mask(2))  # a corrected label
    ds.prepare(root)
    assert ds.case_ids() == IDS
    again = (ds.raw_dir() / "imagesTr" / "segrap_0000_0000.nii.gz").stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    np.testing.assert_array_equal(label(ds, "segrap_0001"), node_mask(2))
    assert ds.foreground_counts()["segrap_0003"] == int(node_mask(3).sum())


def test_failed_run_keeps_the_previous_complete_dataset(tmp_path):
    root = make_release(tmp_path / "src", IDS[:2])
    ds = get_dataset("segrap2023")
    ds.prepare(root)
    make_case(root / RELEASE / "segrap_0002", 2)
    _truncate("GTVnd.nii.gz")(root / RELEASE / "segrap_0002")
    with pytest.raises(DatasetError, match="truncated"):
        ds.prepare(root)
    assert ds.is_prepared() and ds.case_ids() == IDS[:2]
    assert not staging_leftovers(ds)


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = make_release(tmp_path / "src", IDS[:3])
    ds = get_dataset("segrap2023")
    calls = []

    def crash_on_third(case, **options):
        calls.append(case.case_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(case, **options)
    original = ds.convert
    monkeypatch.setattr(ds, "convert", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        ds.prepare(root)
    assert_nothing_published(ds)


# ---------------------------------------------------------------- command line

def test_cli_prepare_list_and_errors(tmp_path, capsys):
    root = make_release(tmp_path / "src", IDS[:2])
    assert main(["datasets", "prepare", "segrap2023", "--source", str(root), "--contrast-channel"]) == 0
    assert "segrap2023: 2 cases" in capsys.readouterr().out
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    assert "segrap2023" in out and "prepared, 2 cases" in out and "lnq2023" in out and "phantom" in out

    _truncate("image.nii.gz")(root / RELEASE / "segrap_0001")
    assert main(["datasets", "prepare", "segrap2023", "--source", str(root)]) == 2
    assert "image.nii.gz" in capsys.readouterr().err
    assert main(["datasets", "prepare", "segrap2023"]) == 2
    assert "needs --source" in capsys.readouterr().err
    assert main(["datasets", "prepare", "phantom", "--source", str(root)]) == 2
    assert "takes no --source" in capsys.readouterr().err
