"""The CUDA path, for every method: autocast + GradScaler training steps on the GPU, frozen tensors
bit-identical, trainable ones changed, and the export loading into the stock network with the same output.
Skipped, with the reason, where torch sees no CUDA device (tests never depend on a GPU).
"""
from __future__ import annotations

import copy

import pytest
import torch

from bench.engine.network import build_network
from bench.engine.step import make_optimizer, training_step
from bench.methods import get_method
from bench.methods.base import MethodContext

from test_methods_registry import (ARCHS, DATASET_JSON, TRAINED, X, architecture, batches, foundation_network,
                                   forward, plans_for, seg_loss, train_start)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path is not run here")
CASES = [pytest.param(name, arch, id=f"{name}-{arch}") for name in TRAINED for arch in ARCHS]


@pytest.mark.parametrize("name,arch", CASES)
def test_method_trains_on_cuda_with_amp_and_exports(name, arch):
    device = torch.device("cuda")
    net = foundation_network(arch).to(device)
    foundation = copy.deepcopy(net.state_dict())
    method = get_method(name)
    ctx = MethodContext(foundation_state=foundation, device=device, seed=0,
                        extra={"architecture": architecture(plans_for(arch))})
    net = method.prepare(net, ctx).to(device)
    data = [{k: v.to(device) for k, v in b.items()} for b in batches()]
    method.on_train_start(train_start(net, data))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainable = {n: p.requires_grad for n, p in net.named_parameters()}
    opt = make_optimizer("sgd", method.param_groups(net), lr=1e-2, weight_decay=3e-5)
    scaler = torch.amp.GradScaler("cuda")
    for step in range(3):
        batch = data[step % len(data)]
        training_step(net, method, opt, seg_loss, batch["data"], batch["target"], step, scaler)
    after = dict(net.named_parameters())
    assert not [n for n, t in trainable.items() if not t and not torch.equal(before[n], after[n])]
    assert any(not torch.equal(before[n], after[n]) for n, t in trainable.items() if t)

    state, override = method.export(net)
    plans = plans_for(arch)
    if override:
        plans["configurations"]["3d_fullres"]["architecture"].update(override)
    stock = build_network(plans, DATASET_JSON).to(device)
    stock.load_state_dict(state)
    x = X.to(device)
    torch.testing.assert_close(forward(stock, x), forward(net, x), atol=1e-4, rtol=1e-4)
