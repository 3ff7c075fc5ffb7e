"""Training from scratch: the foundation's architecture, random initialisation.

The lower bound every fine-tuning method must beat. ``uses_foundation = False``
tells the runner not to load the foundation weights; ``prepare`` re-initialises
anyway (nnU-Net's own initialiser, seeded by the run seed), so the method is
from scratch whatever network it is handed.

``scratch-light`` trains a different, much smaller network from scratch: the
depthwise-separable ``LightUNet`` (``bench.architectures.light``) with the
foundation's stages (widths, kernels, strides: same deep-supervision scales).
``prepare`` swaps it in for the network it is handed; ``export`` names it in
an architecture override, so the exported plans.json builds it in stock nnU-Net.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from bench.methods import METHODS
from bench.methods.base import Method


@METHODS.register("scratch")
class Scratch(Method):
    summary = "same architecture, random initialisation (no foundation), all parameters trained"
    uses_foundation = False

    def prepare(self, network, ctx):
        return reinitialise(network, ctx.seed)


def reinitialise(network, seed: int):
    """nnU-Net's initialiser on fresh parameters, seeded, without touching the run's global RNG stream."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in network.modules():
            if hasattr(module, "reset_parameters"):  # norms back to (1, 0), convs to torch's default
                module.reset_parameters()
        if hasattr(network, "initialize"):  # then nnU-Net's initialiser (He for convs, ...)
            network.apply(network.initialize)
    return network


@METHODS.register("scratch-light")
class ScratchLight(Method):
    summary = ("lightweight specialist from scratch: depthwise-separable U-Net (bench.architectures.light) "
               "with the foundation's stages, all parameters trained")
    uses_foundation = False

    def prepare(self, network, ctx):
        from bench.architectures.light import light_architecture
        from bench.engine.network import build_from_architecture

        self.architecture = light_architecture(network)
        inner = getattr(network, "_orig_mod", network)
        light = build_from_architecture(self.architecture, input_channels=first_conv(inner).in_channels,
                                        num_classes=inner.decoder.num_classes,
                                        deep_supervision=bool(inner.decoder.deep_supervision))
        return reinitialise(light, ctx.seed).to(ctx.device)

    def export(self, network):
        state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        return state, copy.deepcopy(self.architecture)


def first_conv(network):
    """The network's first convolution (its in_channels are the input channels)."""
    for module in network.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module
    raise ValueError(f"{type(network).__name__} has no convolution")
