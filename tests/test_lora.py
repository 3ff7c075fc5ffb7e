"""LoRA on nnU-Net: the adapted convs must be in the forward path, and export must be stock nnU-Net.

Documents the measured trap: ``ConvDropoutNormReLU.forward`` runs ``all_modules``,
a Sequential aliasing ``conv``; peft replaces only ``conv`` (the name
``named_modules()`` reports), so a plain injection is never called.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bench.engine.network import tiny_network
from bench.engine.step import make_optimizer, training_step
from bench.methods import get_method
from bench.methods.base import MethodContext
from bench.methods.lora.conv import delta_weight, lora_layers, target_module_names

X = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # micro networks: threads only add OpenMP synchronisation
    yield
    torch.set_num_threads(before)


def called_layers(network):
    """Run one forward and return (called, all) LoRA layers, by module name."""
    names = {id(m): n for n, m in network.named_modules()}
    layers = lora_layers(network)
    called = set()
    handles = [layer.register_forward_hook(lambda m, i, o: called.add(names[id(m)])) for layer in layers]
    with torch.no_grad():
        network(X)
    for h in handles:
        h.remove()
    return called, {names[id(layer)] for layer in layers}


def prepared(**hp):
    net = tiny_network()
    foundation = copy.deepcopy(net.state_dict())
    method = get_method("lora", **hp)
    return method, method.prepare(net, MethodContext(foundation_state=foundation)), foundation


def test_naive_peft_injection_is_never_called():
    """The trap, kept as a test: peft on ``...conv`` leaves ``all_modules[0]`` on the bare conv."""
    from peft import LoraConfig, inject_adapter_in_model
    net = tiny_network()
    names = target_module_names(net, "all")
    net = inject_adapter_in_model(LoraConfig(r=2, target_modules=names), net)
    called, layers = called_layers(net)
    assert layers == set(names) and called == set()


@pytest.mark.parametrize("target", ["all", "encoder", "decoder"])
def test_every_lora_layer_runs_in_forward(target):
    _, net, _ = prepared(target=target)
    called, layers = called_layers(net)
    assert layers and called == layers
    block = net.encoder.stages[0][0].convs[0]
    if target != "decoder":
        assert block.all_modules[0] is block.conv  # the alias now holds the LoRA layer


def test_targets_cover_backbone_convs_only():
    net = tiny_network()
    enc, dec, both = (set(target_module_names(net, t)) for t in ("encoder", "decoder", "all"))
    assert enc and dec and not enc & dec and enc | dec == both
    assert all(n.startswith("encoder.") for n in enc) and all(n.startswith("decoder.stages.") for n in dec)
    assert not any("seg_layers" in n or "transpconvs" in n for n in both)


def test_training_moves_only_lora_and_heads_and_export_is_stock():
    method, net, foundation = prepared()
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    assert any(".base_layer." in n for n in frozen)
    opt = make_optimizer("sgd", method.param_groups(net), lr=1e-2, weight_decay=3e-5)
    target = (torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.7).long()
    for step in range(3):
        training_step(net, method, opt, lambda out, y: nn.functional.cross_entropy(out[0], y), X, target, step)
    params = dict(net.named_parameters())
    assert all(torch.equal(v, params[n]) for n, v in frozen.items()), "a frozen base weight moved"

    state, override = method.export(net)
    assert override is None
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in foundation.items()}
    for key in state:  # nnU-Net stores each block's conv twice; both copies carry the merged weight
        if ".all_modules.0." in key:
            assert torch.equal(state[key], state[key.replace(".all_modules.0.", ".conv.")])
    conv = "encoder.stages.1.0.convs.1.conv.weight"
    assert not torch.equal(state[conv], foundation[conv])
    assert torch.equal(state["decoder.transpconvs.0.weight"], foundation["decoder.transpconvs.0.weight"])
    assert "lora_A" not in "".join(state) and any("lora_A" in n for n in params)  # training net untouched


@pytest.mark.parametrize("kernel", [(1, 1, 1), (1, 1, 3), (1, 3, 3), (3, 3, 3)])
def test_merge_matches_the_lora_forward_for_3d_kernels(kernel):
    """peft 0.21's own merge fails for (1, 1, k) kernels (a 2-D 1x1 test); ours must not."""
    from peft import LoraConfig, inject_adapter_in_model
    conv = nn.Sequential(nn.Conv3d(3, 5, kernel, padding=[k // 2 for k in kernel]))
    conv = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["0"]), conv)
    layer = conv[0]
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(1, 3, 5, 6, 7)
    expected = layer(x)
    base = layer.get_base_layer()
    merged = nn.functional.conv3d(x, base.weight + delta_weight(layer), base.bias, base.stride, base.padding)
    assert torch.allclose(merged, expected, atol=1e-5)
