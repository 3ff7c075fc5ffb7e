"""Foundation checkpoints: nnU-Net's numpy values load with weights_only, anything else is refused without
being run; torch.compile / DDP prefixes are stripped and reported; an input-channel mismatch is named."""
import io
import pathlib
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch

from bench.checkpoint import CheckpointError
from bench.engine.network import build_network
from bench.engine.trainer import load_weights
from bench.foundation import CHECKPOINT, load_foundation, shipped_foundation_dir


@pytest.fixture(scope="module")
def shipped():
    return load_foundation(shipped_foundation_dir())


def nnunet_checkpoint(state: dict, foundation) -> dict:
    """What nnUNetTrainer.save_checkpoint writes: the weights plus numpy-valued logging and init args."""
    return {"network_weights": state,
            "optimizer_state": {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 1e-2}]},
            "grad_scaler_state": None,
            "logging": {"mean_fg_dice": [np.float64(0.41), np.float64(0.52)],
                        "ema_fg_dice": [np.float64(0.41), np.float64(0.42)],
                        "dice_per_class_or_region": [[np.float32(0.4)], [np.float32(0.5)]],
                        "train_losses": [np.float32(-0.2), np.float32(-0.3)],
                        "val_losses": [np.asarray(-0.1, np.float32), np.asarray(-0.2, np.float32)],
                        "lrs": [0.01, 0.0099], "epoch_start_timestamps": [1.0, 2.0]},
            "_best_ema": np.float64(0.42),
            "current_epoch": 2,
            "init_args": {"plans": foundation.plans, "configuration": foundation.configuration, "fold": 0,
                          "dataset_json": foundation.dataset_json, "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2)}


def model_folder(tmp_path, foundation, checkpoint: dict) -> pathlib.Path:
    folder = tmp_path / "model"
    (folder / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(foundation.folder / name, folder / name)
    torch.save(checkpoint, folder / "fold_0" / CHECKPOINT)
    return folder


def as_numpy1(path: pathlib.Path) -> None:
    """Rename numpy 2's ``numpy._core`` globals to numpy 1's ``numpy.core``, as older checkpoints have them."""
    with zipfile.ZipFile(path) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                # torch pickles with protocol 2: GLOBAL opcode, "module\nname\n"
                renamed = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
                assert renamed != data
                data = renamed
            z.writestr(info, data)
    path.write_bytes(buf.getvalue())


def assert_same_state(loaded: dict, expected: dict) -> None:
    assert list(loaded) == list(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("numpy_names", ["numpy2", "numpy1"])
def test_nnunet_checkpoint_with_numpy_values_loads_weights_only(tmp_path, shipped, numpy_names):
    folder = model_folder(tmp_path, shipped, nnunet_checkpoint(shipped.state_dict, shipped))
    if numpy_names == "numpy1":
        as_numpy1(folder / "fold_0" / CHECKPOINT)
    f = load_foundation(folder)
    assert_same_state(f.state_dict, shipped.state_dict)
    assert f.mirror_axes == (0, 1, 2) and f.load_notes == []


class Payload:
    """Stands for any object a checkpoint should not hold."""


def test_checkpoint_with_an_arbitrary_class_is_refused(tmp_path, shipped):
    ckpt = nnunet_checkpoint(shipped.state_dict, shipped)
    ckpt["extra"] = Payload()
    folder = model_folder(tmp_path, shipped, ckpt)
    with pytest.raises(CheckpointError) as err:
        load_foundation(folder)
    msg = str(err.value)
    assert str(folder / "fold_0" / CHECKPOINT) in msg and "test_checkpoint.Payload" in msg
    assert "weights_only=False" in msg   # the fix, for a trusted file


class Touch:
    """Unpickling it would create a file: proof of whether refused code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def test_refused_checkpoint_runs_nothing(tmp_path, shipped):
    marker = tmp_path / "unpickled"
    ckpt = nnunet_checkpoint(shipped.state_dict, shipped)
    ckpt["init_args"]["hook"] = Touch(marker)
    folder = model_folder(tmp_path, shipped, ckpt)
    with pytest.raises(CheckpointError, match="pathlib.Path"):
        load_foundation(folder)
    assert not marker.exists()


@pytest.mark.parametrize("wrap, prefixes", [
    (torch.compile, ["_orig_mod."]),
    (torch.nn.DataParallel, ["module."]),
    (lambda net: torch.nn.DataParallel(torch.compile(net)), ["module.", "_orig_mod."]),
], ids=["compile", "ddp", "ddp-of-compiled"])
def test_wrapped_module_prefixes_are_stripped_and_reported(tmp_path, shipped, wrap, prefixes):
    net = build_network(shipped.plans, shipped.dataset_json, shipped.configuration)
    net.load_state_dict(shipped.state_dict)
    wrapped = wrap(net).state_dict()   # the keys as torch writes them (compile is lazy: nothing compiles)
    assert all(k.startswith("".join(prefixes)) for k in wrapped)
    f = load_foundation(model_folder(tmp_path, shipped, nnunet_checkpoint(wrapped, shipped)))
    assert_same_state(f.state_dict, shipped.state_dict)
    assert len(f.load_notes) == len(prefixes)
    for note, prefix in zip(f.load_notes, prefixes):
        assert f"'{prefix}'" in note and f"from {len(wrapped)} keys" in note and CHECKPOINT in note
    fresh = build_network(shipped.plans, shipped.dataset_json, shipped.configuration)
    report = load_weights(fresh, f.state_dict)
    assert report["reinitialised"] == [] and len(report["loaded"]) == len(fresh.state_dict())


def test_input_channel_mismatch_is_refused_naming_both_counts_and_the_layer(shipped):
    two_channels = dict(shipped.dataset_json, channel_names={"0": "CT", "1": "CT"})
    plans = dict(shipped.plans, foreground_intensity_properties_per_channel={
        "0": shipped.plans["foreground_intensity_properties_per_channel"]["0"],
        "1": shipped.plans["foreground_intensity_properties_per_channel"]["0"]})
    net = build_network(plans, two_channels, shipped.configuration)
    first = next(iter(net.state_dict()))
    with pytest.raises(CheckpointError) as err:
        load_weights(net, shipped.state_dict)
    msg = str(err.value)
    assert "takes 1 input channel(s), the target 2" in msg and first in msg
    assert first == "encoder.stages.0.0.convs.0.conv.weight"


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path, shipped):
    folder = model_folder(tmp_path, shipped, nnunet_checkpoint(shipped.state_dict, shipped))
    path = folder / "fold_0" / CHECKPOINT
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: cannot be read as a PyTorch checkpoint")):
        load_foundation(folder)


def test_object_array_is_refused_naming_its_dtype(tmp_path, shipped):
    ckpt = nnunet_checkpoint(shipped.state_dict, shipped)
    ckpt["logging"]["notes"] = np.array(["a", 1], dtype=object)   # elements would be arbitrary objects
    with pytest.raises(CheckpointError, match="refused: it pickles numpy.dtypes.ObjectDType"):
        load_foundation(model_folder(tmp_path, shipped, ckpt))
