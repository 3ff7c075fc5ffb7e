"""STU-Net foundations: nnU-Net v1 checkpoints (written here in STU-Net's own layout) read safely, converted
to a v2 model folder, fine-tuned by every method and predicted by stock nnU-Net."""
from __future__ import annotations

import itertools
import json
import os
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bench.checkpoint import CheckpointError

FEATURES, BLOCKS = (4, 8, 16), (1, 2, 1)
POOLS = [[1, 2, 2], [2, 2, 2]]          # the v1 plans' pooling for the phantom's anisotropic voxels
PATCH, SPACING = [20, 40, 40], [3.0, 2.4, 2.4]


# ---- STU-Net's v1 module, written from the paper and the released code's layout (flat names) ---------------
class V1Block(nn.Module):
    def __init__(self, cin, cout, stride=1, project=False):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.conv3 = nn.Conv3d(cin, cout, 1, stride=stride) if project else None

    def forward(self, x):
        y = self.norm2(self.conv2(F.leaky_relu(self.norm1(self.conv1(x)), 0.01)))
        return F.leaky_relu(y + (self.conv3(x) if self.conv3 is not None else x), 0.01)


class V1Upsample(nn.Module):
    def __init__(self, cin, cout, scale):
        super().__init__()
        self.conv, self.scale = nn.Conv3d(cin, cout, 1), scale

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class V1STUNet(nn.Module):
    def __init__(self, cin, classes, dims, depth, pools):
        super().__init__()
        strides = [1] + [tuple(p) for p in pools]
        widths = [cin] + list(dims)
        self.conv_blocks_context = nn.ModuleList(
            nn.Sequential(V1Block(widths[d], dims[d], strides[d], True),
                          *[V1Block(dims[d], dims[d]) for _ in range(depth[d] - 1)])
            for d in range(len(dims)))
        self.upsample_layers = nn.ModuleList(V1Upsample(dims[-1 - u], dims[-2 - u], tuple(pools[-1 - u]))
                                             for u in range(len(pools)))
        self.conv_blocks_localization = nn.ModuleList(
            nn.Sequential(V1Block(2 * dims[-2 - u], dims[-2 - u], 1, True),
                          *[V1Block(dims[-2 - u], dims[-2 - u]) for _ in range(depth[-2 - u] - 1)])
            for u in range(len(pools)))
        self.seg_outputs = nn.ModuleList(nn.Conv3d(dims[-2 - u], classes, 1) for u in range(len(pools)))

    def forward(self, x):
        skips = []
        for stage in self.conv_blocks_context[:-1]:
            x = stage(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        for u, (up, stage) in enumerate(zip(self.upsample_layers, self.conv_blocks_localization)):
            x = stage(torch.cat((up(x), skips[-(u + 1)]), 1))
        return self.seg_outputs[-1](x)


def v1_plans() -> dict:
    """nnU-Net v1 plans as its planner pickles them: numpy arrays and scalars, OrderedDicts, int keys."""
    stage = {"batch_size": 2, "num_pool_per_axis": [1, 2, 2], "patch_size": np.array(PATCH),
             "median_patient_size_in_voxels": np.array([30, 80, 80]), "current_spacing": np.array(SPACING),
             "original_spacing": np.array(SPACING), "do_dummy_2D_data_aug": False,
             "pool_op_kernel_sizes": POOLS + [[2, 2, 2]] * 4,  # more than the network has: STU-Net cuts them
             "conv_kernel_sizes": [[3, 3, 3]] * 6}
    intensity = OrderedDict({0: OrderedDict(median=np.float64(45.0), mean=np.float64(40.0), sd=np.float64(90.0),
                                            mn=np.float64(-1000.0), mx=np.float64(900.0),
                                            percentile_99_5=np.float64(350.0), percentile_00_5=np.float64(-150.0))})
    return {"num_stages": 1, "num_modalities": 1, "modalities": {0: "CT"}, "normalization_schemes": OrderedDict({0: "CT"}),
            "use_mask_for_norm": OrderedDict({0: False}), "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "all_classes": [1], "num_classes": 1, "plans_per_stage": {0: stage},
            "dataset_properties": {"intensityproperties": intensity, "modalities": {0: "CT"}}}


def write_v1(folder, features=FEATURES, blocks=BLOCKS, seed=0):
    """<folder>/model_final_checkpoint.model and .model.pkl as nnU-Net v1 saves them; returns (path, module)."""
    torch.manual_seed(seed)
    net = V1STUNet(1, 2, features, blocks, POOLS)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # affine norms off (1, 0): a trained-looking network
    path = folder / "model_final_checkpoint.model"
    torch.save({"epoch": 4000, "state_dict": OrderedDict(net.state_dict()),
                "optimizer_state_dict": torch.optim.SGD(net.parameters(), 0.01, momentum=0.99).state_dict(),
                "lr_scheduler_state_dict": None, "amp_grad_scaler": {"scale": 65536.0, "growth_factor": 2.0},
                "plot_stuff": ([np.float64(0.5)], [np.float64(0.4)], [np.float64(0.3)], [np.float64(0.2)]),
                "best_stuff": (4000, np.float64(0.1), np.float64(0.2), 3999)}, path)
    info = {"init": ("plans.pkl", 0, "out", "data", True, 0, True, True, True), "name": "STUNetTrainer_small",
            "class": "<class 'nnunet.training.network_training.STUNetTrainer.STUNetTrainer_small'>",
            "plans": v1_plans()}
    path.with_name(path.name + ".pkl").write_bytes(pickle.dumps(info))
    return path, net


def test_converted_checkpoint_computes_what_stunet_v1_computes(tmp_path):
    from bench.engine.network import build_network
    from bench.foundation import load_foundation
    from bench.stunet import convert_stunet

    path, v1 = write_v1(tmp_path)
    f = load_foundation(convert_stunet(path, tmp_path / "v2"))
    cfg = f.plans["configurations"]["3d_fullres"]
    kw = cfg["architecture"]["arch_kwargs"]
    assert cfg["architecture"]["network_class_name"] == "bench.architectures.stunet.STUNet"
    assert kw["features_per_stage"] == list(FEATURES) and kw["n_blocks_per_stage"] == list(BLOCKS)
    assert kw["strides"] == [[1, 1, 1]] + POOLS  # the plans' pooling cut to the network's stages
    assert cfg["patch_size"] == PATCH and cfg["spacing"] == SPACING and cfg["normalization_schemes"] == ["CTNormalization"]
    assert f.plans["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"] == 350.0
    assert f.dataset_json["labels"] == {"background": 0, "class_1": 1} and f.mirror_axes == (0, 1, 2)
    net = build_network(f.plans, f.dataset_json, deep_supervision=False)
    net.load_state_dict(f.state_dict, strict=True)
    x = torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), v1.eval()(x), atol=1e-5)


def test_foundation_path_to_a_v1_file_converts_once_and_show_lists_it(tmp_path, bench_home, capsys):
    from bench.cli import main
    from bench.runner import foundation_identity

    path, v1 = write_v1(tmp_path)
    assert main(["foundation", "show", str(path)]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in v1.parameters())
    assert "bench.architectures.stunet.STUNet" in out and f"{n:,}" in out and "heads included" in out
    converted = list((bench_home / "foundations" / "converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "fold_0" / "checkpoint_final.pth").is_file()
    assert foundation_identity(str(path))["checkpoint"].startswith(str(converted[0]))
    assert main(["methods", "--foundation", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{n:,} parameters in the foundation network" in out and "scratch-light" in out


def test_convert_cli_names_labels_from_a_dataset_json(tmp_path, capsys):
    from bench.cli import main
    from bench.foundation import load_foundation

    path, _ = write_v1(tmp_path)
    labels = tmp_path / "dataset.json"
    labels.write_text(json.dumps({"labels": {"0": "background", "1": "lymph_node"}}))  # v1 style
    assert main(["foundation", "convert-stunet", str(path), "--out", str(tmp_path / "v2"), "--labels", str(labels)]) == 0
    assert "features [4, 8, 16]" in capsys.readouterr().out
    assert load_foundation(tmp_path / "v2").dataset_json["labels"] == {"background": 0, "lymph_node": 1}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pkl_that_would_run_code_is_refused_without_running_it(tmp_path):
    from bench.stunet import convert_stunet

    path, _ = write_v1(tmp_path)
    marker = tmp_path / "ran"
    path.with_name(path.name + ".pkl").write_bytes(pickle.dumps({"plans": {}, "payload": _Evil(marker)}))
    with pytest.raises(CheckpointError, match=r"refused: it pickles (posix|os)\.system"):
        convert_stunet(path, tmp_path / "v2")
    assert not marker.exists()


def test_checkpoint_that_is_not_stunet_is_refused(tmp_path):
    from bench.stunet import convert_stunet

    path, _ = write_v1(tmp_path)
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 1, 3, 3, 3)}}, path)
    with pytest.raises(CheckpointError, match="not an STU-Net state dict"):
        convert_stunet(path, tmp_path / "v2")
    path.with_name(path.name + ".pkl").unlink()
    with pytest.raises(FileNotFoundError, match="model.pkl"):
        convert_stunet(path, tmp_path / "v2")


@pytest.mark.parametrize("size,params", [("S", 14_596_941), ("B", 58_262_669)])
def test_published_widths_map_tensor_for_tensor(size, params):
    """STU-Net-S/B at the published widths (TotalSegmentator: 104 classes + background), shapes only: every
    v1 tensor has its v2 counterpart with the same shape, and the count is the paper's (14.6M, 58.26M)."""
    from bench.architectures.stunet import STUNET_SIZES, STUNet
    from bench.stunet import infer_architecture, to_v2_state

    spec = STUNET_SIZES[size]
    with torch.device("meta"):
        v1 = V1STUNet(1, 105, spec["features_per_stage"], spec["n_blocks_per_stage"], [[2, 2, 2]] * 5)
        v2 = STUNet(1, 105, 6, kernel_sizes=[[3, 3, 3]] * 6, strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
                    deep_supervision=True, **spec)
    arch = infer_architecture(v1.state_dict())
    assert arch["features"] == spec["features_per_stage"] and arch["blocks"] == spec["n_blocks_per_stage"]
    assert {k: v.shape for k, v in to_v2_state(v1.state_dict()).items()} == \
        {k: v.shape for k, v in v2.state_dict().items()}
    assert sum(p.numel() for p in v2.parameters()) == params


@pytest.mark.slow
def test_every_method_fine_tunes_the_converted_stunet_and_stock_nnunet_predicts(tmp_path, bench_home):
    """--foundation <v1 .model>: every trained method loads the converted weights, takes 2 harness steps
    (``training_step``, nnU-Net's Dice + CE with deep supervision), exports a model folder, and nnU-Net's own
    predictor loads that folder (plans naming STUNet or the method's architecture) and predicts with it."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from bench.engine.network import build_network
    from bench.engine.step import make_optimizer, training_step
    from bench.engine.trainer import load_weights
    from bench.foundation import load_foundation, save_model_folder
    from bench.methods import METHODS, get_method
    from bench.methods.base import MethodContext

    torch.set_num_threads(1)
    path, _ = write_v1(tmp_path)
    f = load_foundation(path)
    arch = f.plans["configurations"][f.configuration]["architecture"]
    g = torch.Generator().manual_seed(0)
    data = torch.randn(1, 1, *PATCH, generator=g)
    target = (torch.rand(1, 1, *PATCH, generator=g) > 0.8).float()
    image = np.random.default_rng(0).normal(40, 90, (1, 24, 44, 44)).astype(np.float32)

    for name in [n for n in METHODS.names() if METHODS.get(n).trains]:
        torch.manual_seed(0)
        net = build_network(f.plans, f.dataset_json, f.configuration)
        method = get_method(name)
        init = f.state_dict if method.uses_foundation else None
        if init is not None:
            assert not load_weights(net, init)["reinitialised"]
        net = method.prepare(net, MethodContext(foundation_state=init or {}, extra={"architecture": arch}))
        optimizer = make_optimizer("sgd", method.param_groups(net), 1e-2, 3e-5)
        method.on_train_start(_train_start(net, data, target))
        for step in range(2):
            training_step(net, method, optimizer, deep_supervision_loss, data, target, step)
        state, override = method.export(net)
        plans = json.loads(json.dumps(f.plans))
        if override:
            plans["configurations"][f.configuration]["architecture"].update(override)
        folder = save_model_folder(tmp_path / name, plans, f.dataset_json, f.configuration, state, f.mirror_axes)
        predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
        stock = predictor.network
        stock.load_state_dict(predictor.list_of_parameters[0])
        with torch.no_grad():
            assert torch.allclose(stock.eval()(data), _first(net.eval()(data)), atol=1e-4), name
        props = {"spacing": SPACING, "sitk_stuff": {"spacing": SPACING[::-1], "origin": (0.0, 0.0, 0.0),
                                                   "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}}
        seg = predictor.predict_single_npy_array(image, props)
        assert seg.shape == image.shape[1:], name


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def deep_supervision_loss(outputs, target):
    """nnU-Net's Dice + CE on every deep-supervision output (target downsampled by nearest neighbour)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    dice_ce = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             dice_class=MemoryEfficientSoftDiceLoss)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return sum(dice_ce(o, F.interpolate(target, size=o.shape[2:], mode="nearest")) for o in outputs)


def _train_start(network, data, target):
    """What ``Method.on_train_start`` gets (DGST's calibration): the network, batches, the loss on a batch."""
    from bench.methods.base import TrainStart
    return TrainStart(network, itertools.repeat({"data": data, "target": target}),
                      lambda batch: deep_supervision_loss(network(batch["data"]), batch["target"]))
