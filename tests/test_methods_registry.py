"""Contract tests generated from the method registry: a new method gets all of them for free.

Every registered method is prepared on a tiny nnU-Net network (a PlainConvUNet,
a ResidualEncoderUNet and an STU-Net), trained for 3 steps with nnU-Net's SGD (momentum
0.99, weight decay) and Dice + CE loss through the engine's ``training_step``,
then checked: frozen tensors bit-identical, every trainable tensor changed, the
output changed, trainable counts consistent, and the export loads into the
stock network (or the method's architecture override) with the same output.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict

import optuna
import pytest
import torch
from torch.nn import functional as F

from bench.engine.network import ONE_LABEL_DATASET_JSON, build_network, tiny_plans
from bench.engine.step import make_optimizer, training_step
from bench.methods import METHODS, get_method
from bench.methods.base import Method, MethodContext, TrainStart, count

PATCH, FEATURES, STEPS = (8, 16, 16), (4, 8), 3
DATA = (4, 8, 8)  # input smaller than the patch: same code paths, a fraction of the CPU time
DATASET_JSON = ONE_LABEL_DATASET_JSON
ARCHS = ("plain", "resenc", "stunet")
TRAINED = [name for name in METHODS.names() if METHODS.get(name).trains]  # zero-shot: tests/test_reference_rows.py
CASES = [pytest.param(name, arch, id=f"{name}-{arch}") for name in TRAINED for arch in ARCHS]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Micro networks gain nothing from threads; on a busy 2-core box OpenMP's barriers made
    instance norm ~200x slower with 2 threads than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def plans_for(arch: str) -> dict:
    plans = tiny_plans("Dataset999_Tiny", patch_size=PATCH, features=FEATURES)  # = tiny_network's plans
    if arch == "resenc":  # residual encoder: stem, BasicBlockD, 1x1x1 skip projection
        a = plans["configurations"]["3d_fullres"]["architecture"]
        a["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        a["arch_kwargs"]["n_blocks_per_stage"] = [1] * len(FEATURES)
        del a["arch_kwargs"]["n_conv_per_stage"]
    if arch == "stunet":  # STU-Net (bench.architectures.stunet): residual blocks, upsample + 1x1x1 conv, concat
        from bench.architectures.stunet import stunet_architecture
        a = plans["configurations"]["3d_fullres"]["architecture"]
        plans["configurations"]["3d_fullres"]["architecture"] = stunet_architecture(
            FEATURES, [1] * len(FEATURES), a["arch_kwargs"]["strides"], a["arch_kwargs"]["kernel_sizes"])
    return plans


def architecture(plans: dict) -> dict:
    return plans["configurations"]["3d_fullres"]["architecture"]


def foundation_network(arch: str, seed: int = 0):
    """Stand-in for a trained foundation: nnU-Net's initialisation, then every tensor perturbed. A fresh
    ResidualEncoderUNet zeroes the last norm of each residual branch, which makes the branch dead
    (exactly zero gradients) - no trained foundation looks like that."""
    torch.manual_seed(seed)
    net = build_network(plans_for(arch), DATASET_JSON)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


_DICE_CE = None


def seg_loss(outputs, target):
    """nnU-Net's Dice + CE on every deep-supervision output (target downsampled by nearest neighbour)."""
    global _DICE_CE
    if _DICE_CE is None:
        from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        _DICE_CE = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                  dice_class=MemoryEfficientSoftDiceLoss)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return sum(_DICE_CE(o, F.interpolate(target, size=o.shape[2:], mode="nearest")) for o in outputs)


def batches(n: int = 2):
    g = torch.Generator().manual_seed(1)
    return [{"data": torch.randn(2, 1, *DATA, generator=g),
             "target": (torch.rand(2, 1, *DATA, generator=g) > 0.7).float()} for _ in range(n)]


def train_start(network, data) -> TrainStart:
    """What ``Method.on_train_start`` gets: the network, a batch source, the loss on a batch."""
    return TrainStart(network, itertools.cycle(data), lambda batch: seg_loss(network(batch["data"]), batch["target"]))


def forward(net, x) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        out = net(x)
    net.train()
    return (out[0] if isinstance(out, (list, tuple)) else out).clone()


@dataclass
class Trained:
    method: Method
    net: torch.nn.Module
    foundation: Dict[str, torch.Tensor]
    out_foundation: torch.Tensor
    out_prepared: torch.Tensor
    before: Dict[str, torch.Tensor]         # parameters after prepare / on_train_start
    trainable: Dict[str, bool]
    group_count: int


X = torch.randn(2, 1, *DATA, generator=torch.Generator().manual_seed(2))


@lru_cache(maxsize=None)
def trained(name: str, arch: str, hparams: tuple = ()) -> Trained:
    """``name`` (with ``hparams``, sorted (key, value) pairs) prepared and trained for STEPS steps."""
    net = foundation_network(arch)
    foundation = copy.deepcopy(net.state_dict())
    out_foundation = forward(net, X)
    method = get_method(name, **dict(hparams))
    ctx = MethodContext(foundation_state=foundation, seed=0, extra={"architecture": architecture(plans_for(arch))})
    net = method.prepare(net, ctx)
    data = batches()
    method.on_train_start(train_start(net, data))
    out_prepared = forward(net, X)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainable = {n: p.requires_grad for n, p in net.named_parameters()}
    groups = method.param_groups(net)
    params = {id(p): p for g in groups for p in g["params"]}
    assert all(p.requires_grad for p in params.values()), "param_groups hands the optimizer a frozen tensor"
    opt = make_optimizer("sgd", groups, lr=1e-2, weight_decay=3e-5)
    for step in range(STEPS):
        batch = data[step % len(data)]
        training_step(net, method, opt, seg_loss, batch["data"], batch["target"], step)
    return Trained(method, net, foundation, out_foundation, out_prepared, before, trainable,
                   count(params.values()))


@pytest.mark.parametrize("name,arch", CASES)
def test_frozen_tensors_are_bit_identical(name, arch):
    t = trained(name, arch)
    after = dict(t.net.named_parameters())
    moved = [n for n, frozen in t.trainable.items() if not frozen and not torch.equal(t.before[n], after[n])]
    assert not moved, f"{name}: frozen tensors changed: {moved[:5]}"


@pytest.mark.parametrize("name,arch", CASES)
def test_every_trainable_tensor_changes(name, arch):
    t = trained(name, arch)
    after = dict(t.net.named_parameters())
    still = [n for n, on in t.trainable.items() if on and torch.equal(t.before[n], after[n])]
    assert any(t.trainable.values()), f"{name} trains nothing"
    assert not still, f"{name}: declared trainable but unchanged after {STEPS} steps: {still[:5]}"


@pytest.mark.parametrize("name,arch", CASES)
def test_output_changes(name, arch):
    t = trained(name, arch)
    assert not torch.allclose(forward(t.net, X), t.out_prepared), f"{name}: training did not change the output"


@pytest.mark.parametrize("name,arch", CASES)
def test_trainable_counts_agree(name, arch):
    t = trained(name, arch)
    declared = sum(t.before[n].numel() for n, on in t.trainable.items() if on)
    after = dict(t.net.named_parameters())
    changed = sum(int((t.before[n] != after[n]).sum()) for n in t.before)
    assert declared == t.group_count, f"{name}: requires_grad count {declared} != param_groups count {t.group_count}"
    assert changed <= declared, f"{name}: {changed} entries changed but only {declared} are trainable"


@pytest.mark.parametrize("name,arch", CASES)
def test_prepare_starts_from_the_foundation_or_declares_it(name, arch):
    """Methods that use the foundation start from its function (zero-initialised LoRA B / adapter up);
    ``scratch`` (uses_foundation False) starts from different weights."""
    t = trained(name, arch)
    if t.method.uses_foundation:
        assert torch.allclose(t.out_prepared, t.out_foundation, atol=1e-6), f"{name}: prepare changed the output"
    else:
        same = [k for k in t.before if k in t.foundation and torch.equal(t.before[k], t.foundation[k])]
        assert not same, f"{name}: starts from foundation weights {same[:5]}"


@pytest.mark.parametrize("name,arch", CASES)
def test_export_loads_into_stock_nnunet_with_the_same_output(name, arch):
    assert_export_round_trip(trained(name, arch), arch)


def assert_export_round_trip(t: Trained, arch: str) -> None:
    name = t.method.name
    state, override = t.method.export(t.net)
    plans = plans_for(arch)
    if override is not None:
        assert set(architecture(plans)["_kw_requires_import"]) <= set(override["_kw_requires_import"])
        plans["configurations"]["3d_fullres"]["architecture"] = override
    else:
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in t.foundation.items()}
    torch.manual_seed(123)
    stock = build_network(plans, DATASET_JSON)  # what nnU-Net's predictor builds from plans.json
    stock.load_state_dict(state, strict=True)
    assert torch.allclose(forward(stock, X), forward(t.net, X), atol=1e-5), f"{name}: exported output differs"


@pytest.mark.parametrize("name", TRAINED)
def test_configurations_the_tuner_samples_train_and_export(name):
    """`bench tune` then `bench run --params tuned` works for every method: what the tuner samples
    (lr, iterations and the method's own search space) builds, changes the output and exports."""
    from bench.tuning import suggest

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        fields, hparams = suggest(study.ask(), METHODS.get(name), iterations=STEPS, tune_iterations=True)
        assert fields["lr"] > 0 and fields["iterations"] >= 1
        t = trained(name, "plain", tuple(sorted(hparams.items())))
        assert t.method.hp == {**METHODS.get(name).defaults, **hparams}
        assert not torch.allclose(forward(t.net, X), t.out_prepared), f"{name} {hparams}: output unchanged"
        assert_export_round_trip(t, "plain")


@pytest.mark.parametrize("name", METHODS.names())
def test_declares_hyper_parameters_and_a_search_space(name):
    cls = METHODS.get(name)
    assert cls.summary and cls.name == name
    space = cls.search_space(optuna.create_study().ask())
    assert set(space) <= set(cls.defaults), f"{name}: search space {sorted(space)} vs defaults {sorted(cls.defaults)}"
    assert get_method(name, **space).hp == {**cls.defaults, **space}
    with pytest.raises(ValueError, match="no hyper-parameter"):
        get_method(name, not_a_hyper_parameter=1)


def test_method_table_lists_every_method_with_its_trainable_share():
    from bench.methods.inventory import format_table, method_table
    rows = method_table(lambda: foundation_network("plain"))
    assert [r["method"] for r in rows] == METHODS.names()
    by_name = {r["method"]: r for r in rows}
    total = by_name["full"]["total"]
    assert by_name["full"]["trainable"] == total and by_name["full"]["share_percent"] == 100.0
    assert 0 < by_name["linear-probe"]["trainable"] < by_name["decoder"]["trainable"] < total
    assert all(name in format_table(rows) for name in METHODS.names())


def test_resolve_methods_all_list_reference_and_unknown_names():
    from bench.methods import resolve_methods

    assert resolve_methods("all") == METHODS.names()
    assert resolve_methods("dgst, lora,dgst") == ["dgst", "lora"]
    assert resolve_methods(["lora", "full"], first="full") == ["full", "lora"]
    assert resolve_methods("all", first="full")[0] == "full"
    with pytest.raises(KeyError, match="dgst"):
        resolve_methods("dgts")
