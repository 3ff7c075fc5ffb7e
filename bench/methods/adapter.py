"""Adapters: zero-initialised residual bottleneck convs after every encoder and decoder stage.

``ConvAdapter``: x + up(nonlin(down(x))), ``down``/``up`` 1x1x1 convs through
``channels // reduction`` channels, ``up`` zero-initialised so the network's
output is initially unchanged. The backbone is frozen; adapters and (by
default) the heads are trained.

An adapter is appended to the Sequential a stage runs (``StackedConvBlocks.convs``
or ``StackedResidualBlocks.blocks``), so the stock keys are untouched and the
adapters add keys such as ``decoder.stages.0.convs.2.down.weight``: foundation
weights load into the adapted network as they are.

Adapters cannot be merged (nonlinear). ``export`` therefore returns an
architecture override naming ``AdapterPlainConvUNet`` or
``AdapterResidualEncoderUNet`` (``AdapterSTUNet`` for STU-Net): stock nnU-Net classes that insert the same
adapters in ``__init__`` from two extra kwargs, so ``get_network_from_plans``
rebuilds the network from a plans.json whose architecture entry was replaced.
Building the override needs the foundation's plans architecture entry, passed
by the engine as ``MethodContext.extra["architecture"]``.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import numpy as np
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from bench.architectures.stunet import STUNet
from bench.methods import METHODS
from bench.methods.base import Method, MethodContext, is_head
from bench.options import positive_int

TARGETS = ("all", "encoder", "decoder")


class ConvAdapter(nn.Module):
    def __init__(self, conv_op, channels: int, reduction: int, nonlin=None, nonlin_kwargs=None):
        super().__init__()
        self.channels, self.bottleneck = channels, max(1, channels // int(reduction))
        self.down = conv_op(channels, self.bottleneck, 1)
        self.nonlin = (nonlin or nn.LeakyReLU)(**(nonlin_kwargs or {}))
        self.up = conv_op(self.bottleneck, channels, 1)
        self.zero_up()

    def zero_up(self) -> None:
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(self.nonlin(self.down(x)))

    def compute_conv_feature_map_size(self, input_size):
        """nnU-Net's VRAM estimate walks every block of a stage (adapters sit among them)."""
        return np.int64((self.bottleneck + self.channels) * np.prod(input_size, dtype=np.int64))


def _stage_sequence(stage: nn.Module) -> nn.Sequential:
    """The Sequential a stage runs: StackedConvBlocks.convs / StackedResidualBlocks.blocks,
    possibly behind a pooling op (nnU-Net wraps the stage in a Sequential then)."""
    for candidate in (stage, stage[-1] if isinstance(stage, nn.Sequential) else None):
        for attr in ("convs", "blocks"):
            seq = getattr(candidate, attr, None)
            if isinstance(seq, nn.Sequential):
                return seq
    raise ValueError(f"adapters: cannot find the block sequence of a {type(stage).__name__} stage "
                     "(supported: nnU-Net's PlainConvUNet and ResidualEncoderUNet, STUNet)")


def insert_adapters(network: nn.Module, reduction: int, target: str = "all") -> List[ConvAdapter]:
    """Append one adapter to every encoder and/or decoder stage of an nnU-Net U-Net, in place."""
    if target not in TARGETS:
        raise ValueError(f"adapter target {target!r} is not one of {list(TARGETS)}")
    enc = network.encoder
    parts = {"encoder": zip(enc.stages, enc.output_channels),
             "decoder": zip(network.decoder.stages, list(enc.output_channels)[-2::-1])}
    added = []
    for part in ("encoder", "decoder"):
        if target not in ("all", part):
            continue
        for stage, channels in parts[part]:
            adapter = ConvAdapter(enc.conv_op, channels, reduction, enc.nonlin, enc.nonlin_kwargs)
            device = next(stage.parameters()).device
            _stage_sequence(stage).append(adapter.to(device))
            added.append(adapter)
    return added


def _keeps_adapters_identity(initialize):
    """nnU-Net's initialiser (applied after __init__) would He-initialise ``up``: zero it again."""
    def init(module):
        initialize(module)
        if isinstance(module, ConvAdapter):
            module.zero_up()
    return staticmethod(init)


class _WithAdapters:
    def __init__(self, *args, adapter_reduction: int = 4, adapter_target: str = "all", **kwargs):
        super().__init__(*args, **kwargs)
        insert_adapters(self, adapter_reduction, adapter_target)


class AdapterPlainConvUNet(_WithAdapters, PlainConvUNet):
    """PlainConvUNet with residual conv adapters (rebuilt by nnU-Net from plans)."""
    initialize = _keeps_adapters_identity(PlainConvUNet.initialize)


class AdapterResidualEncoderUNet(_WithAdapters, ResidualEncoderUNet):
    """ResidualEncoderUNet with residual conv adapters (rebuilt by nnU-Net from plans)."""
    initialize = _keeps_adapters_identity(ResidualEncoderUNet.initialize)


class AdapterSTUNet(_WithAdapters, STUNet):
    """STU-Net with residual conv adapters (rebuilt by nnU-Net from plans)."""
    initialize = _keeps_adapters_identity(STUNet.initialize)


ADAPTED = {PlainConvUNet: AdapterPlainConvUNet, ResidualEncoderUNet: AdapterResidualEncoderUNet,
           STUNet: AdapterSTUNet}


def adapted_class(network: nn.Module) -> type:
    cls = ADAPTED.get(type(network))
    if cls is None:
        raise ValueError(f"adapters support {', '.join(c.__name__ for c in ADAPTED)}; the foundation is a "
                         f"{type(network).__name__}")
    return cls


@METHODS.register("adapter")
class Adapter(Method):
    summary = "zero-initialised residual bottleneck conv adapters after every stage; backbone frozen"
    defaults = {"reduction": 4, "target": "all", "train_heads": True}
    hp_checks = {"reduction": positive_int}

    def prepare(self, network: nn.Module, ctx: MethodContext) -> nn.Module:
        self.cls = adapted_class(network)
        self.architecture: Optional[dict] = ctx.extra.get("architecture")
        adapters = {id(p) for a in insert_adapters(network, self.hp["reduction"], self.hp["target"])
                    for p in a.parameters()}
        heads = bool(self.hp["train_heads"])
        for name, p in network.named_parameters():
            p.requires_grad_(id(p) in adapters or (heads and is_head(name)))
        return network

    def arch_override(self) -> dict:
        if self.architecture is None:
            raise ValueError("adapter export needs the foundation's plans architecture entry "
                             "(MethodContext.extra['architecture'] = plans['configurations'][cfg]['architecture'])")
        override = copy.deepcopy(self.architecture)  # keeps _kw_requires_import
        override["network_class_name"] = f"{self.cls.__module__}.{self.cls.__qualname__}"
        override["arch_kwargs"].update(adapter_reduction=int(self.hp["reduction"]),
                                       adapter_target=str(self.hp["target"]))
        return override

    def export(self, network: nn.Module):
        state: Dict = {k: v.detach().clone() for k, v in network.state_dict().items()}
        return state, self.arch_override()

    @classmethod
    def search_space(cls, trial):
        return {"reduction": trial.suggest_categorical("reduction", [2, 4, 8, 16]),
                "target": trial.suggest_categorical("target", list(TARGETS))}
