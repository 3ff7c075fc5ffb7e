"""Partial fine-tuning: freeze the foundation except a named subset of its own parameters.

One base (``PartialFineTuning``), one predicate per method. The segmentation
heads (``seg_layers``: every deep-supervision output) are always trained:
with a few labelled cases a frozen head cannot adapt to the target domain's
label appearance, and every partial method in the literature trains it.
Nothing is added to the network, so ``export`` is the plain state_dict.
"""
from __future__ import annotations

from typing import Set

from torch import nn

from bench.methods import METHODS
from bench.methods.base import Method, MethodContext, encoder_of, is_head, norm_parameter_names


class PartialFineTuning(Method):
    """Train ``selected(network)`` plus the heads; everything else keeps requires_grad False."""

    def selected(self, network: nn.Module) -> Set[str]:
        raise NotImplementedError

    def prepare(self, network: nn.Module, ctx: MethodContext) -> nn.Module:
        chosen = self.selected(network)
        for name, p in network.named_parameters():
            p.requires_grad_(name in chosen or is_head(name))
        return network


@METHODS.register("linear-probe")
class LinearProbe(PartialFineTuning):
    summary = "segmentation head(s) only (all deep-supervision outputs)"

    def selected(self, network):
        return set()


@METHODS.register("decoder")
class DecoderOnly(PartialFineTuning):
    summary = "decoder (stage convs, transposed convs) and heads; encoder frozen"

    def selected(self, network):
        # nnU-Net's decoder holds a reference to the encoder (``decoder.encoder``): select by
        # tensor identity, not by name prefix, so encoder weights never count as decoder weights.
        encoder = {id(p) for p in encoder_of(network, self.name).parameters()}
        decoder = {id(p) for p in network.decoder.parameters()} - encoder
        return {n for n, p in network.named_parameters() if id(p) in decoder}


@METHODS.register("bitfit")
class BitFit(PartialFineTuning):
    summary = "BitFit: every bias (conv, transposed conv, norm) and the heads"

    def selected(self, network):
        return {n for n, _ in network.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}


@METHODS.register("norm")
class NormTuning(PartialFineTuning):
    summary = "normalisation affine parameters (scale and shift) and the heads"

    def selected(self, network):
        return norm_parameter_names(network)
