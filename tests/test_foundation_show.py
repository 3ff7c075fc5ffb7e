"""``bench foundation show``: what a folder is, and what fine-tuning on a target loads or re-initialises."""
import pytest

from bench.cli import main
from bench.engine.network import build_network
from bench.foundation import load_foundation, shipped_foundation_dir
from bench.foundation_info import describe


@pytest.fixture(scope="module")
def shipped():
    return load_foundation(shipped_foundation_dir())


def test_show_prints_architecture_parameters_labels_spacing_normalisation_and_load_plan(shipped, capsys):
    assert main(["foundation", "show", str(shipped.folder)]) == 0
    out = capsys.readouterr().out
    cfg = shipped.plans["configurations"]["3d_fullres"]
    n = sum(p.numel() for p in build_network(shipped.plans, shipped.dataset_json).parameters())
    assert cfg["architecture"]["network_class_name"] in out
    assert f"parameters     {n:,}" in out
    assert f"spacing {cfg['spacing']} mm" in out
    assert '"lymph_node": 1' in out
    assert "channel 0 CT: CTNormalization (clip -150 .. 350, mean 40, std 90)" in out
    assert f"all {len(shipped.state_dict)} state-dict tensors loaded, segmentation heads included " \
           "(label set matches)" in out


def test_show_names_reinitialised_heads_for_another_label_set(shipped):
    target = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "node": 1, "tumour": 2}}
    out = describe(shipped, "three-labels", target)
    heads = [k for k in shipped.state_dict if ".seg_layers." in k]
    assert heads and f"re-initialised (label set differs): {', '.join(heads)}" in out
    assert f"{len(shipped.state_dict) - len(heads)} state-dict tensors loaded" in out


def test_show_says_a_channel_mismatch_is_refused(shipped):
    target = {"channel_names": {"0": "CT", "1": "CT"}, "labels": shipped.dataset_json["labels"]}
    out = describe(shipped, "two-channels", target)
    assert "refused: foundation checkpoint takes 1 input channel(s), the target 2" in out
