"""Full fine-tuning: every parameter trained from the foundation weights."""
from bench.methods import METHODS
from bench.methods.base import Method


@METHODS.register("full")
class FullFineTuning(Method):
    summary = "all parameters trained (upper bound on capacity)"
