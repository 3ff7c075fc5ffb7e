"""peft LoRA on nnU-Net convolutions: injection that reaches the forward path, and merging.

nnU-Net trap: ``ConvDropoutNormReLU`` registers its conv twice, as ``conv`` and
as ``all_modules[0]``, and its ``forward`` runs ``all_modules``.
``named_modules()`` de-duplicates, so peft sees (and replaces) only ``...conv``;
``all_modules[0]`` keeps pointing at the bare conv and the LoRA layer is never
called. ``replace_everywhere`` re-points every holder of a replaced module.

Merging uses its own delta instead of peft's ``merge``: peft 0.21's
``_ConvNd.get_delta_weight`` takes its 1x1 shortcut when ``kernel[2:4] == (1, 1)``,
a 2-D test that fails for 3-D kernels (1, 1, k), e.g. the 1x1x1 skip projections
of residual encoders.

peft is imported on first use: it pulls in transformers (seconds), which every
``bench`` command would otherwise pay for loading the method registry.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Set

import torch
from torch import nn

from bench.methods.base import encoder_of, is_head

# exact types: peft has no LoRA for ConvTranspose. Linear: attention and MLP layers of transformer
# foundations (SwinUNETR); nnU-Net's U-Nets have none.
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def target_module_names(network: nn.Module, target: str) -> List[str]:
    """Names (as peft sees them) of the backbone convs in ``target``: "all", "encoder" or "decoder"."""
    encoder = {id(m) for m in encoder_of(network, f"LoRA target {target!r}").modules()} if target != "all" else set()
    region = {"all": lambda m: True,
              "encoder": lambda m: id(m) in encoder,
              "decoder": lambda m: id(m) not in encoder}  # decoder.encoder is the encoder itself
    if target not in region:
        raise ValueError(f"LoRA target {target!r} is not one of {sorted(region)}")
    names = [n for n, m in network.named_modules()
             if type(m) in CONV_TYPES and not is_head(n) and region[target](m)]
    if not names:
        raise ValueError(f"LoRA found no convolution to adapt in the {target!r} part of "
                         f"{type(network).__name__}")
    return names


def lora_layers(network: nn.Module) -> List[nn.Module]:
    from peft.tuners.lora import LoraLayer
    return [m for m in network.modules() if isinstance(m, LoraLayer)]


def lora_parameter_ids(network: nn.Module) -> Set[int]:
    return {id(p) for layer in lora_layers(network)
            for part in (layer.lora_A, layer.lora_B) for p in part.parameters()}


def replace_everywhere(network: nn.Module, mapping: Dict[int, nn.Module]) -> None:
    """Make every parent that holds a module ``m`` with ``id(m)`` in ``mapping`` hold its replacement."""
    for parent in list(network.modules()):
        for key, child in list(parent._modules.items()):
            new = mapping.get(id(child))
            if new is not None and new is not parent:  # a LoRA layer keeps its own base_layer
                setattr(parent, key, new)


def add_lora(network: nn.Module, names: List[str], r: int, alpha: float, dropout: float) -> nn.Module:
    """Inject peft LoRA layers into ``names`` in place and make them the modules forward runs."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=list(names),
                        bias="none")
    network = inject_adapter_in_model(config, network)
    replace_everywhere(network, {id(layer.get_base_layer()): layer for layer in lora_layers(network)})
    return network


def delta_weight(layer: nn.Module) -> torch.Tensor:
    """scaling * B @ A: for a conv, A carries the kernel and B is 1x1, so the product is a conv weight; for a
    Linear it is the (out, in) matrix product."""
    base = layer.get_base_layer()
    if getattr(base, "groups", 1) != 1:
        raise NotImplementedError("merging LoRA into grouped convolutions is not supported")
    delta = torch.zeros_like(base.weight)
    for name in layer.active_adapters:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        delta += torch.einsum("or,ri...->oi...", b.flatten(1), a).to(delta.dtype) * layer.scaling[name]
    return delta


def merged_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` with every LoRA layer merged into its conv and unwrapped: stock modules and keys,
    the conv aliasing (``conv`` / ``all_modules.0``) restored. The training network is left untouched."""
    merged = copy.deepcopy(network)
    layers = lora_layers(merged)
    with torch.no_grad():
        for layer in layers:
            layer.get_base_layer().weight += delta_weight(layer)
    replace_everywhere(merged, {id(layer): layer.get_base_layer() for layer in layers})
    return merged
