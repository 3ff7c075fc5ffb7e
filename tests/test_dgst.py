"""DGST's rule, checked at the update level with nnU-Net's SGD (momentum 0.99, weight decay)."""
import copy

import pytest
import torch
from torch import nn

from bench.engine.network import tiny_network
from bench.engine.step import make_optimizer, training_step
from bench.methods import get_method
from bench.methods.base import MethodContext
from bench.methods.dgst import partition
from bench.methods.dgst.released import released_selection
from bench.methods.dgst.selection import entries_per_row, topk_mask


def seg_loss(outputs, target):
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return sum(nn.functional.cross_entropy(o, target) for o in outputs[:1])


def setup(method_name="dgst", **hp):
    net = tiny_network()
    foundation = copy.deepcopy(net.state_dict())
    method = get_method(method_name, **hp)
    net = method.prepare(net, MethodContext(foundation_state=foundation, seed=0))
    opt = make_optimizer("sgd", method.param_groups(net), lr=0.05, weight_decay=3e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 16, 16, generator=g)
    y = (torch.rand(2, 8, 16, 16, generator=g) > 0.7).long()
    return net, method, opt, x, y


def record_grads(method):
    """Wrap after_backward to keep the raw gradients the selection saw."""
    seen = {}
    orig = method.after_backward

    def wrapped(network, step):
        seen.clear()
        seen.update({n: p.grad.detach().clone() for n, p in network.named_parameters() if p.grad is not None})
        orig(network, step)
    method.after_backward = wrapped
    return seen


def reference_topk(grad, k):
    """Independent reference: full sort of each row (the released code's way)."""
    rows = grad.reshape(grad.shape[0], -1).abs()
    order = torch.argsort(rows, dim=1, descending=True)[:, :k]
    mask = torch.zeros_like(rows, dtype=torch.bool)
    for r in range(rows.shape[0]):
        mask[r, order[r]] = True
    return mask.view_as(grad)


@pytest.mark.parametrize("gamma", [1, 2, 5])
def test_each_step_changes_only_top_gamma_entries_per_kernel(gamma):
    net, method, opt, x, y = setup(gamma=gamma)
    grads = record_grads(method)
    groups = method.groups
    assert groups["sparse"] and groups["dense"]
    for step in range(3):  # several steps: momentum and weight decay must not leak
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        training_step(net, method, opt, seg_loss, x, y, step)
        params = dict(net.named_parameters())
        for name in groups["sparse"]:
            changed = before[name] != params[name].detach()
            selected = reference_topk(grads[name], entries_per_row(gamma, grads[name][0].numel()))
            assert torch.equal(method.masks[name], selected), name
            # nothing outside the selection moved, bit for bit
            assert not (changed & ~selected).any(), f"{name}: non-selected entries changed at step {step}"
            per_row = changed.reshape(changed.shape[0], -1).sum(1)
            assert int(per_row.max()) <= gamma
        assert any((before[n] != params[n]).any() for n in groups["sparse"])
        for name in groups["dense"]:
            assert not torch.equal(before[name], params[name].detach()), f"{name} (always trained) did not change"


def test_optimizer_state_of_unselected_entries_is_untouched():
    net, method, opt, x, y = setup(gamma=2)
    training_step(net, method, opt, seg_loss, x, y, 0)
    for name, p in method.sparse.items():
        buf = opt.state[p]["momentum_buffer"]
        assert torch.equal(buf[~method.masks[name]], torch.zeros_like(buf[~method.masks[name]])), name


def test_output_changes_and_full_finetuning_changes_every_tensor():
    for name in ("dgst", "full"):
        net, method, opt, x, y = setup(name)
        net.eval()
        with torch.no_grad():
            out0 = net(x)[0].clone() if isinstance(net(x), (list, tuple)) else net(x).clone()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        net.train()
        for step in range(2):
            training_step(net, method, opt, seg_loss, x, y, step)
        net.eval()
        with torch.no_grad():
            out = net(x)
            out1 = out[0] if isinstance(out, (list, tuple)) else out
        assert not torch.allclose(out0, out1), f"{name} did not change the network's output"
        if name == "full":
            for n, p in net.named_parameters():
                assert not torch.equal(before[n], p.detach()), f"full fine-tuning left {n} unchanged"


def test_partition_freezes_positional_embeddings_and_trains_norm_bias_head():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
            self.proj = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.decoder = nn.Module()
            self.decoder.seg_layers = nn.ModuleList([nn.Conv3d(8, 2, 1)])

    groups = partition(Tiny())
    assert set(groups["frozen"]) == {"pos_embed", "cls_token"}
    assert "proj.weight" in groups["sparse"] and "proj.bias" in groups["dense"]
    assert {"norm.weight", "norm.bias", "decoder.seg_layers.0.weight"} <= set(groups["dense"])
    flat = partition(Tiny(), hierarchical=False)
    assert not flat["dense"] and not flat["frozen"] and len(flat["sparse"]) == 8


def test_penalty_pulls_towards_foundation():
    net, method, opt, x, y = setup(penalty=0.0)
    assert method.regularizer(net) is None
    net, method, opt, x, y = setup(penalty=1.0)
    assert float(method.regularizer(net).detach()) == 0.0  # at the foundation
    with torch.no_grad():
        for p in method.sparse.values():
            p.add_(0.1)
    assert float(method.regularizer(net).detach()) > 0


def test_gamma_fraction_and_validation():
    assert entries_per_row(2, 27) == 2
    assert entries_per_row(0.1, 27) == 3
    assert entries_per_row(100, 27) == 27
    with pytest.raises(ValueError):
        entries_per_row(0, 27)


def test_released_selection_agrees_with_topk_and_leaves_masks_empty():
    torch.manual_seed(0)
    grads = {"a": torch.randn(6, 4, 3, 3, 3), "b": torch.randn(3, 5, 2, 2, 2)}
    assert released_selection(grads, 2) == {}  # the released behaviour: nothing masked
    filled = released_selection(grads, 2, fill_mask=True)
    for n, g in grads.items():
        assert torch.equal(filled[n], topk_mask(g, 2))


def test_random_and_static_ablations_select_gamma_per_row():
    net, method, opt, x, y = setup("dgst-random", gamma=3)
    training_step(net, method, opt, seg_loss, x, y, 0)
    for name, m in method.masks.items():
        assert int(m.reshape(m.shape[0], -1).sum(1).max()) == min(3, m[0].numel())


def test_clipping_and_gradient_see_only_the_selected_entries():
    """The gradient left on a sparse tensor after the step is the applied one: selected entries only."""
    net, method, opt, x, y = setup(gamma=2)
    grads = record_grads(method)
    training_step(net, method, opt, seg_loss, x, y, 0)
    params = dict(net.named_parameters())
    for name in method.groups["sparse"]:
        selected = method.masks[name]
        grad = params[name].grad
        assert grad.shape == params[name].shape
        assert torch.equal(grad[~selected], torch.zeros_like(grad[~selected])), name
        ratio = grad[selected] / grads[name][selected]  # one clip factor (<= 1) for every selected entry
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio)) and float(ratio.flatten()[0]) <= 1.0


def test_flat_indices_select_gamma_entries_of_every_row():
    from bench.methods.dgst.selection import topk_indices

    g = torch.randn(5, 3, 2, 2, 2)
    idx = topk_indices(g, 2)
    assert idx.numel() == 10 and torch.equal(idx // 24, torch.arange(5).repeat_interleave(2))
    assert torch.equal(topk_mask(g, 2), reference_topk(g, 2))
