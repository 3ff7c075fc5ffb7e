"""A real CT through the whole path: release layout -> prepare -> preprocessing with a foundation's plans
(plan transfer) -> nnU-Net's prediction export -> metrics.

The CT is TotalSegmentator's test example (tests/data/totalseg_example/SOURCE.md): 122x101x30 voxels at
3 mm, direction (-1, -1, 1), int16 HU. Four small organs of its label map stand in for lymph nodes.
The "prediction" is the preprocessed reference label turned into one-hot logits and handed to nnU-Net's
``export_prediction_from_logits``: the resampling, un-cropping, un-transposing and geometry-restoring
code a real prediction goes through, with the answer known in advance (the reference itself).
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from bench.datasets import get_dataset
from bench.datasets.geometry import Geometry
from bench.engine.preprocess import preprocess, transfer_plans
from bench.foundation import load_foundation, shipped_foundation_dir
from bench.metrics import case_metrics
from test_datasets_lnq import write_nrrd

pytestmark = pytest.mark.usefixtures("bench_home")   # conftest: BENCH_HOME in tmp_path

DATA = Path(__file__).parent / "data" / "totalseg_example"
CT, SEG = DATA / "example_ct_sm.nii.gz", DATA / "example_seg.nii.gz"
NODE_LABELS = (8, 9, 88, 89)   # small structures (152-410 voxels each): node-sized stand-ins
RAS = np.array([-1.0, -1.0, 1.0])   # LPS -> RAS sign per axis


def node_mask() -> np.ndarray:
    return np.isin(sitk.GetArrayFromImage(sitk.ReadImage(str(SEG))), NODE_LABELS).astype(np.uint8)


def segrap_release(root: Path) -> str:
    """Layout A: the CT file itself as image.nii.gz, the node mask as GTVnd.nii.gz on its grid."""
    case = root / "SegRap2023_Training_Set_120cases" / "segrap_0000"
    case.mkdir(parents=True)
    shutil.copyfile(CT, case / "image.nii.gz")
    mask = sitk.GetImageFromArray(node_mask())
    mask.CopyInformation(sitk.ReadImage(str(CT)))
    sitk.WriteImage(mask, str(case / "GTVnd.nii.gz"), useCompression=True)
    return "segrap_0000"


def lnq_release(root: Path) -> str:
    """NRRD files as in the release: the CT in LPS space, the label in RAS (as some tools write it)."""
    geom = Geometry.of(sitk.ReadImage(str(CT)))
    axes = (np.asarray(geom.direction).reshape(3, 3) * geom.spacing).T   # rows: x, y, z axis vectors (LPS)
    folder = root / "LNQ2023" / "val"
    write_nrrd(folder / "lnq2023-val-0001-ct.nrrd", sitk.GetArrayFromImage(sitk.ReadImage(str(CT))),
               origin=geom.origin, directions=axes)
    write_nrrd(folder / "lnq2023-val-0001-seg.nrrd", node_mask(), origin=np.asarray(geom.origin) * RAS,
               directions=axes * RAS, space="right-anterior-superior")
    return "lnq2023_val_0001"


RELEASES = {"segrap2023": segrap_release, "lnq2023": lnq_release}


def foundation_plans(dataset, native_spacing: bool) -> dict:
    """The shipped foundation's plans transferred to the dataset; at 3.0 x 2.4 x 2.4 mm they resample
    the 3 mm CT in-plane, ``native_spacing`` replans them at the CT's own 3 mm (no resampling)."""
    plans = transfer_plans(load_foundation(shipped_foundation_dir()).plans, dataset.folder_name)
    if native_spacing:
        plans["configurations"]["3d_fullres"]["spacing"] = [3.0, 3.0, 3.0]
    return plans


def export_reference(dataset, plans: dict, case_id: str, out: Path) -> Path:
    """Preprocess the case with ``plans``, then export its preprocessed label as perfect logits."""
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((dataset.raw_dir() / "dataset.json").read_text())
    base = preprocess(dataset, plans, dataset_json, "3d_fullres", [case_id], log=lambda *_: None)
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    folder = str(base / cm.data_identifier)
    _, seg, _, props = infer_dataset_class(folder)(folder).load_case(case_id)
    label = torch.from_numpy(np.clip(np.asarray(seg[0]), 0, None).astype(np.int64))  # -1: outside the crop
    logits = torch.nn.functional.one_hot(label, 2).permute(3, 0, 1, 2).float()
    out.mkdir(parents=True, exist_ok=True)
    export_prediction_from_logits(logits, props, cm, pm, dataset_json, str(out / case_id))
    return out / f"{case_id}.nii.gz"


@pytest.mark.parametrize("native_spacing", [True, False], ids=["native-spacing", "resampled"])
@pytest.mark.parametrize("name", sorted(RELEASES))
def test_real_ct_round_trip(tmp_path, name, native_spacing):
    dataset = get_dataset(name)
    case_id = RELEASES[name](tmp_path / "release")
    dataset.prepare(tmp_path / "release")

    source, image = sitk.ReadImage(str(CT)), sitk.ReadImage(dataset.image_files(case_id)[0])
    assert image.GetPixelID() == source.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))  # HU untouched
    assert Geometry.of(image) == Geometry.of(source)
    reference = sitk.ReadImage(dataset.label_file(case_id))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(reference), node_mask())

    predicted = sitk.ReadImage(str(export_reference(dataset, foundation_plans(dataset, native_spacing), case_id,
                                                    tmp_path / "pred")))
    assert Geometry.of(predicted).size == Geometry.of(source).size
    np.testing.assert_allclose(predicted.GetSpacing(), source.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(predicted.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(predicted.GetDirection(), source.GetDirection(), atol=1e-6)

    pred, ref = sitk.GetArrayFromImage(predicted) > 0, sitk.GetArrayFromImage(reference) > 0
    dice = case_metrics(pred, ref, source.GetSpacing()[::-1])["dice"]
    if native_spacing:
        np.testing.assert_array_equal(pred, ref)
        assert dice == 1.0
    else:
        # 3 -> 2.4 -> 3 mm in-plane interpolates the boundary: a few voxels of ~1,100 may flip
        assert dice > 0.99


def test_runner_prediction_path_returns_the_reference_grid(tmp_path):
    """What ``bench run`` scores: nnU-Net's predictor on the prepared CT (the shipped foundation's weights,
    resampled to its 2.4 mm and back) returns a label map on the reference's voxel grid and spacing."""
    from bench.engine.predict import make_predictor, predict_case
    dataset = get_dataset("segrap2023")
    case_id = segrap_release(tmp_path / "release")
    dataset.prepare(tmp_path / "release")
    f = load_foundation(shipped_foundation_dir())
    predictor = make_predictor(foundation_plans(dataset, native_spacing=False), f.dataset_json, f.configuration,
                               f.state_dict, torch.device("cpu"))
    seg, spacing = predict_case(predictor, dataset.image_files(case_id))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(dataset.label_file(case_id)))
    assert seg.shape == reference.shape and spacing == sitk.ReadImage(str(CT)).GetSpacing()[::-1]
