"""L2-SP (Li et al., ICML 2018): full fine-tuning pulled towards the foundation weights.

loss + ``penalty`` * sum ||theta - theta_foundation||^2 over every trainable
tensor that has a foundation value of the same shape (re-initialised heads of
a different label set are not anchored). ``penalty`` plays the role of the
paper's alpha/2. The run's weight decay still applies; with nnU-Net's 3e-5 it
is negligible next to the anchor.
"""
from __future__ import annotations

from bench.methods import METHODS
from bench.methods.base import Method
from bench.methods.penalty import FoundationAnchor


@METHODS.register("l2sp")
class L2SP(Method):
    summary = "L2-SP: all parameters trained, L2 pull towards the foundation weights"
    defaults = {"penalty": 1e-2}

    def prepare(self, network, ctx):
        self.anchor = FoundationAnchor(network, ctx.foundation_state)
        return network

    def regularizer(self, network):
        return self.anchor.penalty(network, float(self.hp["penalty"]))

    @classmethod
    def search_space(cls, trial):
        return {"penalty": trial.suggest_float("penalty", 1e-4, 1.0, log=True)}
