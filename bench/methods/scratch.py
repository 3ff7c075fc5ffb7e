"""Training from scratch: the foundation's architecture, random initialisation.

The lower bound every fine-tuning method must beat. ``uses_foundation = False``
tells the runner not to load the foundation weights; ``prepare`` re-initialises
anyway (nnU-Net's own initialiser, seeded by the run seed), so the method is
from scratch whatever network it is handed.
"""
from __future__ import annotations

import torch

from bench.methods import METHODS
from bench.methods.base import Method


@METHODS.register("scratch")
class Scratch(Method):
    summary = "same architecture, random initialisation (no foundation), all parameters trained"
    uses_foundation = False

    def prepare(self, network, ctx):
        with torch.random.fork_rng():  # seeded, without touching the run's global RNG stream
            torch.manual_seed(ctx.seed)
            for module in network.modules():
                if hasattr(module, "reset_parameters"):  # norms back to (1, 0), convs to torch's default
                    module.reset_parameters()
            if hasattr(network, "initialize"):  # then nnU-Net's initialiser (He for convs, ...)
                network.apply(network.initialize)
        return network
