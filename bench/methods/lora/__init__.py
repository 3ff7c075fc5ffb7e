"""LoRA (Hu et al., 2021) on nnU-Net's convolutions, built on peft (>= 0.14 for Conv3d).

Targets: every plain convolution of the backbone's conv blocks
(``ConvDropoutNormReLU.conv``): the encoder and decoder stage convs and, in
residual encoders, the stem, block convs and 1x1x1 skip projections. ``target``
restricts this to the "encoder" or "decoder". Each adapted conv W gets
W + (alpha / r) * B A with A a conv of W's kernel and r output channels and
B a zero-initialised 1x1 conv, so training starts from the foundation's output.

Not targeted, and why:
- segmentation heads (``seg_layers``, all deep-supervision outputs): 1x1x1 and
  tiny; trained fully when ``train_heads`` (default), as in every method here;
- transposed convs (``decoder.transpconvs``): peft's LoRA has no ConvTranspose
  layer (0.21: Linear, Embedding, Conv1/2/3d, MultiheadAttention). They stay
  frozen; training them fully would add in * out * prod(stride) parameters per
  level (1.8 M, ~6 % of nnU-Net's default 31 M network), beyond the low-rank budget.

Export merges B A into each conv and unwraps the peft layers: the exported
state_dict has exactly the foundation network's keys and shapes.
See ``conv.py`` for nnU-Net's conv aliasing, which a plain peft injection misses.
"""
from __future__ import annotations

from bench.methods import METHODS
from bench.methods.base import Method, is_head
from bench.options import fraction, positive_float, positive_int
from bench.methods.lora.conv import add_lora, lora_parameter_ids, merged_copy, target_module_names


@METHODS.register("lora")
class LoRA(Method):
    summary = "LoRA (peft) on every backbone conv, heads trained; merged into the convs at export"
    defaults = {"r": 8, "alpha": 16, "dropout": 0.0, "target": "all", "train_heads": True}
    hp_checks = {"r": positive_int, "alpha": positive_float, "dropout": fraction}

    def prepare(self, network, ctx):
        names = target_module_names(network, self.hp["target"])
        network = add_lora(network, names, self.hp["r"], self.hp["alpha"], self.hp["dropout"])
        lora = lora_parameter_ids(network)
        heads = bool(self.hp["train_heads"])
        for name, p in network.named_parameters():
            p.requires_grad_(id(p) in lora or (heads and is_head(name)))
        return network

    def export(self, network):
        return {k: v.detach() for k, v in merged_copy(network).state_dict().items()}, None

    @classmethod
    def search_space(cls, trial):
        r = trial.suggest_categorical("r", [4, 8, 16, 32])
        return {"r": r, "alpha": r * trial.suggest_categorical("alpha_over_r", [1, 2]),
                "dropout": trial.suggest_categorical("dropout", [0.0, 0.1]),
                "target": trial.suggest_categorical("target", ["all", "encoder", "decoder"])}
