"""segrap2023-oars: GTVnd and organ masks (one file per structure, as the training release ships them) into
one label map; synthetic volumes in the release layout, BENCH_HOME in a temporary folder."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from bench.cli import main
from bench.datasets import DatasetError, get_dataset
from bench.datasets.validation import DatasetWarning
from bench.datasets.segrap2023 import protocol_v1 as nodes_protocol
from bench.datasets.segrap2023_oars import protocol_v1
from bench.protocols import Protocol
from test_datasets_segrap import IDS, RELEASE, SHAPE, label, make_release, node_mask, write

pytestmark = pytest.mark.usefixtures("bench_home")


def parotid(i: int) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[5:8, 9:13, 1 + i:4 + i] = 1
    return m


def submandibular(i: int) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[1:3, 10:14, 10:13] = 1
    return m


def release_with_organs(root):
    make_release(root)
    for i, cid in enumerate(IDS):
        write(root / RELEASE / cid / "Parotid_L.nii.gz", parotid(i))
        write(root / RELEASE / cid / "Submandibular_L.nii.gz", submandibular(i))
    return root


def test_structures_become_one_label_map_in_the_order_given(tmp_path):
    ds = get_dataset("segrap2023-oars")
    ds.prepare(release_with_organs(tmp_path / "src"), labels="GTVnd,Parotid_L,Submandibular_L")
    fresh = get_dataset("segrap2023-oars")       # a later process reads the label set from dataset.json
    assert fresh.labels == {"background": 0, "GTVnd": 1, "Parotid_L": 2, "Submandibular_L": 3}
    meta = json.loads((ds.raw_dir() / "dataset.json").read_text())
    assert meta["labels"] == fresh.labels
    for i, cid in enumerate(IDS):
        expected = node_mask(i) * 1
        expected[parotid(i) == 1] = 2
        expected[submandibular(i) == 1] = 3
        np.testing.assert_array_equal(label(fresh, cid), expected)
    # organs alone: GTVnd's file is then not needed
    (tmp_path / "src" / RELEASE / IDS[0] / "GTVnd.nii.gz").unlink()
    ds.prepare(tmp_path / "src", labels=["Submandibular_L", "Parotid_L"])
    assert get_dataset("segrap2023-oars").labels == {"background": 0, "Submandibular_L": 1, "Parotid_L": 2}
    np.testing.assert_array_equal(label(ds, IDS[0]), submandibular(0) + 2 * parotid(0))


def test_the_command_line_takes_labels_and_other_datasets_refuse_them(tmp_path, capsys):
    src = release_with_organs(tmp_path / "src")
    assert main(["datasets", "prepare", "segrap2023-oars", "--source", str(src), "--labels",
                 "Parotid_L,GTVnd"]) == 0
    assert get_dataset("segrap2023-oars").labels == {"background": 0, "Parotid_L": 1, "GTVnd": 2}
    assert main(["datasets", "prepare", "segrap2023", "--source", str(src), "--labels", "GTVnd"]) == 2
    assert "has no option labels" in capsys.readouterr().err


def test_default_label_set_needs_each_organ_file_and_names_the_missing_ones(tmp_path):
    src = release_with_organs(tmp_path / "src")
    with pytest.raises(DatasetError) as err:
        get_dataset("segrap2023-oars").prepare(src)          # default: also Parotid_R, Submandibular_R
    msg = str(err.value)
    assert f"{IDS[0]}/Parotid_R.nii.gz" in msg and "Submandibular_R" in msg and "nothing was written" in msg


@pytest.mark.parametrize("labels, message", [
    ("Parotid_l", "unknown structure.*Parotid_l.*Parotid_L"),
    ("GTVnd,GTVnd", "more than once"),
    (" , ", "names no structure"),
])
def test_bad_label_names_are_refused_before_reading(tmp_path, labels, message):
    with pytest.raises(DatasetError, match=message):
        get_dataset("segrap2023-oars").prepare(tmp_path / "nowhere", labels=labels)


def test_nested_structures_warn_and_the_later_one_wins(tmp_path):
    src = release_with_organs(tmp_path / "src")
    for i, cid in enumerate(IDS):   # a "lens" inside the parotid, as Lens_L lies inside Eye_L in the release
        inner = np.zeros(SHAPE, np.uint8)
        inner[5, 10:12, 2 + i] = 1
        write(src / RELEASE / cid / "Lens_L.nii.gz", inner)
    with pytest.warns(DatasetWarning, match="2 voxels of Lens_L are also in Parotid_L"):
        get_dataset("segrap2023-oars").prepare(src, labels="Parotid_L,Lens_L")
    lab = label(get_dataset("segrap2023-oars"), IDS[1])
    assert lab[5, 10, 3] == 2 and lab[6, 9, 2] == 1


def test_a_non_binary_organ_file_is_refused(tmp_path):
    src = release_with_organs(tmp_path / "src")
    write(src / RELEASE / IDS[2] / "Parotid_L.nii.gz", parotid(2) * 7)
    with pytest.raises(DatasetError, match=r"Parotid_L.nii.gz: unexpected values \[7\] in the Parotid_L mask"):
        get_dataset("segrap2023-oars").prepare(src, labels="Parotid_L")


def test_protocol_shares_segrap2023_cases_and_draws():
    p, nodes = Protocol.load("segrap2023-oars"), Protocol.load("segrap2023")
    assert p.version == "v1" and p.data == json.loads(json.dumps(protocol_v1()))
    assert (p.test, p.pool, p.data["repeats"]) == (nodes.test, nodes.pool, nodes.data["repeats"])
    assert json.loads(json.dumps(nodes_protocol())) == nodes.data


def test_the_label_set_is_part_of_a_cells_identity(tmp_path):
    from bench.runner import RunSpec
    src = release_with_organs(tmp_path / "src")
    get_dataset("segrap2023-oars").prepare(src, labels="GTVnd,Parotid_L")
    first = RunSpec("full", dataset="segrap2023-oars").run_id()
    get_dataset("segrap2023-oars").prepare(src, labels="GTVnd,Submandibular_L")
    assert RunSpec("full", dataset="segrap2023-oars").run_id() != first   # not "already done" by a sweep
