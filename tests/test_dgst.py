"""DGST's rule, checked at the update level with nnU-Net's SGD (momentum 0.99, weight decay), with AdamW
(lazy Adam: see bench/methods/dgst/__init__.py) and under a GradScaler on CPU."""
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


def setup(method_name="dgst", optimizer="sgd", lr=0.05, **hp):
    net = tiny_network()
    foundation = copy.deepcopy(net.state_dict())
    method = get_method(method_name, **hp)
    net = method.prepare(net, MethodContext(foundation_state=foundation, seed=0))
    opt = make_optimizer(optimizer, method.param_groups(net), lr=lr, weight_decay=3e-5)
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


def test_adamw_under_masking_is_lazy_adam_bit_for_bit():
    """Each step, a sparse tensor's selected entries take exactly torch's AdamW step on their own gradient,
    moments and the tensor's step count; unselected entries keep weight, exp_avg and exp_avg_sq bit for bit."""
    net, method, opt, x, y = setup(optimizer="adamw", lr=1e-2, gamma=2)
    params = dict(net.named_parameters())
    for step in range(4):
        before = {n: params[n].detach().clone() for n in method.sparse}
        state_before = {n: {k: v.clone() for k, v in opt.state.get(params[n], {}).items()} for n in method.sparse}
        training_step(net, method, opt, seg_loss, x, y, step)
        for name in method.sparse:
            p, idx, sel = params[name], method.selected[name], method.masks[name]
            state = opt.state[p]
            assert int(state["step"]) == step + 1  # one count per tensor, advanced by every step
            assert torch.equal(p.detach()[~sel], before[name][~sel]), f"{name}: unselected weight moved"
            old = state_before[name]
            for k in ("exp_avg", "exp_avg_sq"):
                was = old[k][~sel] if k in old else torch.zeros_like(state[k][~sel])
                assert torch.equal(state[k][~sel], was), f"{name}: unselected {k} changed at step {step}"
            # reference: torch's AdamW on the selected entries alone
            ref = before[name].flatten()[idx].clone().requires_grad_(True)
            ref.grad = p.grad.flatten()[idx].clone()  # the applied (selected, clipped) gradient
            ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=3e-5)
            if old:
                ref_opt.state[ref] = {"step": old["step"].clone(), "exp_avg": old["exp_avg"].flatten()[idx].clone(),
                                      "exp_avg_sq": old["exp_avg_sq"].flatten()[idx].clone()}
            ref_opt.step()
            assert torch.equal(p.detach().flatten()[idx], ref.detach()), f"{name}: selected update differs"
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[k].flatten()[idx], ref_opt.state[ref][k]), f"{name}: {k} differs"
        assert any(not torch.equal(before[n], params[n].detach()) for n in method.sparse)


def test_grad_scaler_path_on_cpu_matches_the_unscaled_step_and_skips_inf_steps():
    """The CUDA training path (GradScaler: scale, unscale_, step, update) run on CPU: with finite gradients
    it gives the unscaled result bit for bit (power-of-two scaling is exact); with an inf gradient the
    scaler skips the step and DGST leaves every tensor, shape and optimizer state as it was."""
    for optimizer in ("sgd", "adamw"):
        plain_net, plain_method, plain_opt, x, y = setup(optimizer=optimizer, gamma=2)
        net, method, opt, _, _ = setup(optimizer=optimizer, gamma=2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for step in range(2):
            training_step(plain_net, plain_method, plain_opt, seg_loss, x, y, step)
            training_step(net, method, opt, seg_loss, x, y, step, grad_scaler=scaler)
        for (n, a), b in zip(plain_net.named_parameters(), net.parameters()):
            assert torch.equal(a, b), f"{optimizer}: {n} differs between the scaled and the unscaled path"

        params = dict(net.named_parameters())
        weights = {n: p.detach().clone() for n, p in params.items()}
        states = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in params.items()}
        scale = scaler.get_scale()
        training_step(net, method, opt, lambda o, t: seg_loss(o, t) * float("inf"), x, y, 2, grad_scaler=scaler)
        assert scaler.get_scale() < scale  # the scaler saw the inf and backed off
        for n, p in params.items():
            assert p.shape == weights[n].shape and torch.equal(p.detach(), weights[n]), f"{optimizer}: {n} moved"
            for k, v in opt.state[p].items():
                assert v.shape == states[n][k].shape and torch.equal(v, states[n][k]), f"{optimizer}: {n} {k}"
