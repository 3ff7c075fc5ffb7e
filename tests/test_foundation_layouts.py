"""Foundations users arrive with, each written in its release's layout with random weights at reduced width:
load -> plan transfer -> fine-tune (2 iterations) -> export -> stock ``nnUNetPredictor``.

- TotalSegmentator v2: a results folder of another trainer (``nnUNetTrainerNoMirroring``), 117 labels (the
  target gets a new head), its own CT normalisation, a checkpoint pickling numpy values and a torch.device.
- Residual-encoder U-Net (nnU-Net's ResEnc presets, LN-Seg-FM's released architecture).
- SwinUNETR (MONAI's, as a registered architecture): DGST keeps its positional encoding frozen.
- nnssl / OpenMind checkpoints: encoder and stem only; methods that would freeze the random decoder refuse.
The published widths are checked for shape only (no training).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.checkpoint import CheckpointError
from bench.cli import main
from bench.datasets import get_dataset
from bench.engine.network import build_network, tiny_plans
from bench.foundation import load_foundation
from bench.foundation_info import describe

RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
SWIN = "bench.architectures.swin_unetr.SwinUNETRNet"
CT = {"max": 3000.0, "mean": 95.0, "median": 80.0, "min": -1024.0, "percentile_00_5": -970.0,
      "percentile_99_5": 1400.0, "std": 240.0}  # TotalSegmentator-like: the whole body, bone included
RUN = ["--shots", "1", "--iterations", "2", "--eval-every", "2", "--device", "cpu"]


def perturbed_state(plans: dict, dataset_json: dict, seed: int = 0) -> dict:
    """A stand-in for trained weights: nnU-Net's initialisation, every tensor perturbed."""
    torch.manual_seed(seed)
    net = build_network(plans, dataset_json)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.state_dict()


def nnunet_checkpoint(state: dict, plans: dict, dataset_json: dict, trainer: str, mirror) -> dict:
    """What nnU-Net v2's trainer saves: numpy values in the logs, a torch.device in init_args."""
    return {"network_weights": state, "optimizer_state": {"state": {}, "param_groups": []},
            "grad_scaler_state": None,
            "logging": {"ema_fg_dice": [np.float64(0.8), np.float64(0.81)], "mean_fg_dice": [np.float32(0.79)],
                        "epoch_start_timestamps": [1.7e9], "lrs": [0.01]},
            "_best_ema": np.float64(0.81), "current_epoch": 4000,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json,
                          "device": torch.device("cpu")},
            "trainer_name": trainer, "inference_allowed_mirroring_axes": mirror}


def write_results_folder(root: Path, dataset: str, trainer: str, plans_name: str, plans: dict,
                         dataset_json: dict, mirror=(0, 1, 2)) -> Path:
    folder = root / dataset / f"{trainer}__{plans_name}__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    state = perturbed_state(plans, dataset_json)
    torch.save(nnunet_checkpoint(state, plans, dataset_json, trainer, mirror), folder / "fold_0" / "checkpoint_final.pth")
    return folder


def resenc_plans(name: str, features=(4, 8, 16), blocks=(1, 2, 2), patch=(16, 32, 32), spacing=(3.0, 2.4, 2.4)):
    plans = tiny_plans(name, patch_size=patch, spacing=spacing, features=features)
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["network_class_name"] = RESENC
    arch["arch_kwargs"]["n_blocks_per_stage"] = list(blocks)
    arch["arch_kwargs"]["n_conv_per_stage_decoder"] = [1] * (len(features) - 1)
    arch["arch_kwargs"]["kernel_sizes"] = [[3, 3, 3]] * len(features)  # the ResEnc presets: isotropic 3x3x3
    arch["arch_kwargs"]["strides"] = [[1, 1, 1]] + [[2, 2, 2]] * (len(features) - 1)
    del arch["arch_kwargs"]["n_conv_per_stage"]
    return plans


def swin_plans(name: str, feature_size: int = 12) -> dict:
    plans = tiny_plans(name, patch_size=(32, 64, 64), spacing=(3.0, 2.4, 2.4))
    plans["configurations"]["3d_fullres"]["architecture"] = {
        "network_class_name": SWIN, "_kw_requires_import": [],
        "arch_kwargs": {"feature_size": feature_size, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                        "window_size": 4, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]}}
    plans["configurations"]["3d_fullres"]["batch_size"] = 1
    return plans


def one_label(name: str = "lymph_node") -> dict:
    return {"channel_names": {"0": "CT"}, "labels": {"background": 0, name: 1}, "file_ending": ".nii.gz"}


def finished_run(bench_home: Path) -> dict:
    results = list((bench_home / "runs").rglob("result.json"))
    assert len(results) == 1
    return json.loads(results[0].read_text())


def stock_prediction(model_dir: str) -> np.ndarray:
    """The exported folder through nnU-Net's own loading path (no harness code), on one phantom test case."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from bench.protocols import Protocol

    predictor = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_dir, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    case = Protocol.load("phantom").test[0]
    data, props = SimpleITKIO().read_images(get_dataset("phantom").image_files(case))
    return np.asarray(predictor.predict_single_npy_array(data, props))


@pytest.fixture(scope="module")
def totalseg(tmp_path_factory) -> Path:
    name = "Dataset297_TotalSegmentator_total_3mm_1559subj"
    plans = tiny_plans(name, patch_size=(16, 32, 32), spacing=(3.0, 3.0, 3.0), features=(4, 8, 16), intensity=CT)
    labels = {"background": 0, **{f"structure_{i:03d}": i for i in range(1, 118)}}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1082, "file_ending": ".nii.gz"}
    return write_results_folder(tmp_path_factory.mktemp("totalseg"), name, "nnUNetTrainerNoMirroring",
                                "nnUNetPlans", plans, dataset_json, mirror=None)


def test_totalsegmentator_folder_is_described_with_its_own_normalisation_and_a_new_head(totalseg):
    f = load_foundation(totalseg)
    assert f.name == totalseg.name and f.mirror_axes is None  # NoMirroring: no test-time mirroring
    out = describe(f, "phantom", one_label())
    assert "channel 0 CT: CTNormalization (clip -970 .. 1400, mean 95, std 240)" in out
    assert '"structure_117": 117' in out
    assert "re-initialised (label set differs): decoder.seg_layers." in out


@pytest.mark.slow
def test_totalsegmentator_folder_fine_tunes_exports_and_predicts_with_stock_nnunet(bench_home, totalseg, capsys):
    assert main(["run", "--method", "lora", "--foundation", str(totalseg), *RUN]) == 0
    out = capsys.readouterr().out
    assert "segmentation heads re-initialised" in out
    result = finished_run(bench_home)
    assert result["provenance"]["foundation"]["name"] == totalseg.name
    plans = json.loads((Path(result["model_dir"]) / "plans.json").read_text())
    # plan transfer: the target is preprocessed with the foundation's CT statistics and spacing
    assert plans["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"] == CT["percentile_99_5"]
    assert plans["configurations"]["3d_fullres"]["spacing"] == [3.0, 3.0, 3.0]
    seg = stock_prediction(result["model_dir"])
    assert seg.ndim == 3 and set(np.unique(seg)) <= {0, 1}


@pytest.mark.slow
def test_residual_encoder_foundation_fine_tunes_exports_and_predicts_with_stock_nnunet(bench_home, tmp_path):
    name = "Dataset888_LNFoundation"
    folder = write_results_folder(tmp_path, name, "nnUNetTrainer", "nnUNetResEncUNetMPlans",
                                  resenc_plans(name), one_label())
    assert main(["run", "--method", "dgst", "--foundation", str(folder), *RUN]) == 0
    result = finished_run(bench_home)
    assert result["foundation_load"]["reinitialised"] == 0  # same label set: heads loaded too
    assert 0 < result["params"]["changed"]
    exported = json.loads((Path(result["model_dir"]) / "plans.json").read_text())
    assert exported["configurations"]["3d_fullres"]["architecture"]["network_class_name"] == RESENC
    assert stock_prediction(result["model_dir"]).ndim == 3


def test_published_widths_build_with_the_expected_shapes():
    """Shape only: ResEnc-L (nnU-Net's preset, 6 stages up to 320 features) and SwinUNETR at feature size 48."""
    resenc = build_network(resenc_plans("ResEncL", features=(32, 64, 128, 256, 320, 320), blocks=(1, 3, 4, 6, 6, 6),
                                        patch=(64, 64, 64)), one_label())
    stem = resenc.state_dict()["encoder.stem.convs.0.conv.weight"]
    assert tuple(stem.shape) == (32, 1, 3, 3, 3)
    blocks = {k.split(".")[4] for k in resenc.state_dict() if k.startswith("encoder.stages.3.blocks.")}
    assert len(resenc.encoder.stages) == 6 and len(blocks) == 6
    swin = build_network(swin_plans("Swin", feature_size=48), one_label(), deep_supervision=False)
    assert tuple(swin.state_dict()["swinViT.patch_embed.proj.weight"].shape) == (48, 1, 2, 2, 2)
    assert tuple(swin.state_dict()["out.conv.conv.weight"].shape) == (2, 48, 1, 1, 1)
    with torch.no_grad():
        assert tuple(swin(torch.zeros(1, 1, 32, 64, 64)).shape) == (1, 2, 32, 64, 64)


def test_dgst_keeps_swin_positional_encoding_frozen_and_trains_its_head():
    from bench.methods.dgst import partition
    net = build_network(swin_plans("Swin"), one_label())
    groups = partition(net)
    tables = [n for n, _ in net.named_parameters() if n.endswith("relative_position_bias_table")]
    assert tables and set(tables) <= set(groups["frozen"])
    assert {"out.conv.conv.weight", "out.conv.conv.bias"} <= set(groups["dense"])  # the head: always trained


@pytest.mark.slow
def test_swin_unetr_foundation_fine_tunes_with_dgst_and_predicts_with_stock_nnunet(bench_home, tmp_path):
    name = "Dataset889_SwinFoundation"
    folder = write_results_folder(tmp_path, name, "nnUNetTrainer", "nnUNetPlans", swin_plans(name), one_label())
    before = load_foundation(folder).state_dict
    assert main(["run", "--method", "dgst", "--foundation", str(folder), *RUN]) == 0
    result = finished_run(bench_home)
    after = load_foundation(result["model_dir"]).state_dict
    tables = [k for k in before if k.endswith("relative_position_bias_table")]
    assert tables and all(torch.equal(before[k], after[k]) for k in tables)
    assert not torch.equal(before["out.conv.conv.weight"], after["out.conv.conv.weight"])
    assert stock_prediction(result["model_dir"]).ndim == 3


# --- nnssl / OpenMind: encoder and stem only ---------------------------------------------------------

NNSSL_KW = {"features_per_stage": [4, 8, 16], "n_blocks_per_stage": [1, 1, 1]}


@pytest.fixture(scope="module")
def nnssl_checkpoint(tmp_path_factory) -> Path:
    """An nnssl release: one .pth with the full pretraining network's weights and its adaptation plan."""
    plans = resenc_plans("nnssl", features=NNSSL_KW["features_per_stage"], blocks=NNSSL_KW["n_blocks_per_stage"])
    state = perturbed_state(plans, one_label("pretext"), seed=1)
    path = tmp_path_factory.mktemp("nnssl") / "OpenMind_ResEncL_MAE" / "checkpoint_final.pth"
    path.parent.mkdir()
    torch.save({"network_weights": state, "citations": [], "nnssl_adaptation_plan": {
        "architecture_plans": {"arch_class_name": "ResEncL", "arch_kwargs": NNSSL_KW},
        "pretrain_num_input_channels": 1,
        "pretrain_plan": {"configurations": {"onemmiso": {"spacing": [3.0, 2.4, 2.4], "patch_size": [16, 32, 32]}}},
        "recommended_downstream_patchsize": [16, 32, 32], "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem", "keys_to_in_proj": ["encoder.stem.convs.0.conv"], "key_to_lpe": None}}, path)
    return path


def test_nnssl_checkpoint_loads_encoder_and_stem_only_and_says_so(nnssl_checkpoint):
    f = load_foundation(nnssl_checkpoint)
    full = torch.load(nnssl_checkpoint, weights_only=True)["network_weights"]
    kept = {k for k in f.state_dict if not k.startswith("decoder.")}
    assert kept == {k for k in full if k.startswith(("encoder.stages", "encoder.stem"))}
    assert all(torch.equal(f.state_dict[k], full[k]) for k in kept)
    assert f.plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
    out = describe(f, "phantom", one_label())
    assert "encoder and stem only" in out
    assert "decoder.stages.0" in out  # named among the tensors initialised fresh


def test_nnssl_checkpoint_with_an_unsupported_architecture_is_refused(tmp_path, nnssl_checkpoint):
    ckpt = torch.load(nnssl_checkpoint, weights_only=True)
    ckpt["nnssl_adaptation_plan"]["architecture_plans"]["arch_class_name"] = "PrimusM"
    torch.save(ckpt, tmp_path / "primus.pth")
    with pytest.raises(CheckpointError, match="PrimusM.*not supported"):
        load_foundation(tmp_path / "primus.pth")


@pytest.mark.slow
def test_nnssl_checkpoint_fine_tunes_and_methods_freezing_the_random_decoder_refuse(bench_home, nnssl_checkpoint,
                                                                                   capsys):
    for method in ("linear-probe", "zero-shot"):
        assert main(["run", "--method", method, "--foundation", str(nnssl_checkpoint), *RUN]) == 2
        err = capsys.readouterr().err
        assert ("frozen at their random initialisation" in err) or ("nothing to predict with" in err), err
    assert main(["run", "--method", "dgst", "--foundation", str(nnssl_checkpoint), *RUN]) == 0
    assert "tensors the checkpoint lacks initialised fresh" in capsys.readouterr().out
    result = finished_run(bench_home)
    assert result["foundation_load"]["fresh"] > 0
    assert stock_prediction(result["model_dir"]).ndim == 3


def test_every_method_prepares_swin_unetr_or_refuses_naming_why():
    """Methods that select by nnU-Net's encoder/decoder split refuse SwinUNETR clearly; LoRA adapts its
    attention and MLP Linear layers too, and its merged export computes what the adapted network computes."""
    from bench.methods import METHODS, get_method
    from bench.methods.base import MethodContext
    refused = {}
    for name in METHODS.names():
        net = build_network(swin_plans("Swin"), one_label())
        ctx = MethodContext(foundation_state=net.state_dict(),
                            extra={"architecture": swin_plans("Swin")["configurations"]["3d_fullres"]["architecture"]})
        try:
            get_method(name).prepare(net, ctx)
        except ValueError as e:
            refused[name] = str(e)
    assert set(refused) == {"adapter", "decoder", "scratch-light"}, refused
    assert "SwinUNETRNet" in refused["adapter"] and "encoder/decoder split" in refused["decoder"]

    torch.manual_seed(0)
    lora = get_method("lora")
    net = lora.prepare(build_network(swin_plans("Swin"), one_label()), MethodContext(foundation_state={}))
    assert any(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in net.modules())
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    net.eval()
    x = torch.randn(1, 1, 32, 64, 64)
    state, _ = lora.export(net)
    stock = build_network(swin_plans("Swin"), one_label())
    stock.load_state_dict(state)
    stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(x)[0], net(x)[0], atol=1e-4, rtol=1e-4)
