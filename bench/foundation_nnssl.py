"""Self-supervised nnssl / OpenMind checkpoints as foundations: encoder and stem only.

An nnssl checkpoint is one ``.pth`` holding ``network_weights`` and an ``nnssl_adaptation_plan``: the
architecture it was pretrained with (``architecture_plans.arch_class_name``, e.g. ``ResEncL``, with
``arch_kwargs`` or a preset), the pretraining input channels and plan, the recommended downstream patch
size, and the state-dict prefixes of the encoder (``key_to_encoder``) and stem (``key_to_stem``). Only
those are transferred, as nnssl's own fine-tuning does; the decoder and the segmentation head start from
nnU-Net's initialisation. Plans are written from the adaptation plan: the pretrained architecture, the
recommended patch, the pretraining spacing and per-image z-score normalisation (nnssl normalises that way).

Methods that keep the decoder frozen would train on a random decoder: the trainer refuses them
(``bench.engine.trainer.check_fresh_weights_trained``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List

import torch

from bench.checkpoint import CheckpointError, PartialState, strip_prefixes

ADAPTATION_PLAN = "nnssl_adaptation_plan"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
# nnssl's residual-encoder presets (its architecture registry: the ResEnc-L of nnU-Net's planners)
PRESETS = {"ResEncL": {"features_per_stage": [32, 64, 128, 256, 320, 320], "n_blocks_per_stage": [1, 3, 4, 6, 6, 6]}}
DEFAULT_PATCH = [160, 160, 160]


def _arch_kwargs(name: str, given, path: Path) -> dict:
    if name not in PRESETS:
        raise CheckpointError(f"{path}: nnssl architecture {name!r} is not supported as a foundation here "
                              f"(supported: {', '.join(PRESETS)}; transformer backbones such as Primus need "
                              "their own network class)")
    kw = dict(PRESETS[name], **(given or {}))
    n = len(kw["features_per_stage"])
    kw.setdefault("n_stages", n)
    kw.setdefault("kernel_sizes", [[3, 3, 3]] * n)
    kw.setdefault("strides", [[1, 1, 1]] + [[2, 2, 2]] * (n - 1))
    kw.setdefault("n_conv_per_stage_decoder", [1] * (n - 1))
    kw.update(conv_op="torch.nn.modules.conv.Conv3d", conv_bias=True,
              norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", norm_op_kwargs={"eps": 1e-5, "affine": True},
              dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})
    return kw


def _pretrain_spacing(plan: dict) -> List[float]:
    configs = (plan.get("pretrain_plan") or {}).get("configurations") or {}
    for config in configs.values():
        if config.get("spacing"):
            return [float(v) for v in config["spacing"]]
    return [1.0, 1.0, 1.0]


def nnssl_plans(plan: dict, path: Path) -> dict:
    from bench.engine.network import tiny_plans
    arch = plan.get("architecture_plans") or {}
    kw = _arch_kwargs(arch.get("arch_class_name"), arch.get("arch_kwargs"), path)
    channels = int(plan.get("pretrain_num_input_channels", 1))
    plans = tiny_plans("nnssl", patch_size=plan.get("recommended_downstream_patchsize") or DEFAULT_PATCH,
                       spacing=_pretrain_spacing(plan), features=kw["features_per_stage"])
    cfg = plans["configurations"]["3d_fullres"]
    cfg["architecture"] = {"network_class_name": RESENC, "arch_kwargs": kw,
                           "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    cfg["normalization_schemes"] = ["ZScoreNormalization"] * channels
    cfg["use_mask_for_norm"] = [False] * channels
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    plans["foreground_intensity_properties_per_channel"] = {str(c): copy.deepcopy(stats) for c in range(channels)}
    plans["experiment_planner_used"] = f"bench.foundation_nnssl (from the adaptation plan of {path.name})"
    return plans


def encoder_state(weights: Dict[str, torch.Tensor], plan: dict, path: Path) -> PartialState:
    """The encoder and stem tensors, also under ``decoder.encoder.`` (nnU-Net's decoders hold the encoder,
    so its state dict names every encoder tensor twice)."""
    prefixes = tuple(p for p in (plan.get("key_to_encoder"), plan.get("key_to_stem")) if p)
    if not prefixes:
        raise CheckpointError(f"{path}: the adaptation plan names neither key_to_encoder nor key_to_stem")
    state = {k: v for k, v in weights.items() if k.startswith(prefixes)}
    if not state:
        raise CheckpointError(f"{path}: no tensor under {', '.join(prefixes)} (the adaptation plan's encoder and "
                              f"stem keys); the checkpoint's keys start with "
                              f"{', '.join(sorted({k.split('.')[0] for k in weights}))}")
    state.update({f"decoder.{k}": v for k, v in list(state.items()) if k.startswith("encoder.")})
    return PartialState(state, fresh_prefixes=("decoder.",),
                        why="a self-supervised nnssl checkpoint: encoder and stem only, no decoder or head")


def nnssl_foundation(path: Path, ckpt: dict, name: str):
    from bench.foundation import Foundation
    plan = ckpt[ADAPTATION_PLAN]
    if "network_weights" not in ckpt:
        raise CheckpointError(f"{path}: nnssl checkpoint without 'network_weights'")
    weights, notes = strip_prefixes(ckpt["network_weights"])
    state = encoder_state(weights, plan, path)
    channels = int(plan.get("pretrain_num_input_channels", 1))
    dataset_json = {"channel_names": {str(c): f"channel{c}" for c in range(channels)},
                    # no head was pretrained: one placeholder foreground label, so the network can be built
                    "labels": {"background": 0, "untrained_head": 1}}
    notes = [f"{path}: {n}" for n in notes] + [
        f"{path}: {state.why}; {sum(not k.startswith('decoder.') for k in state)} encoder/stem tensors kept, "
        "the decoder and segmentation head are initialised fresh"]
    return Foundation(name=name, folder=path.parent, plans=nnssl_plans(plan, path), dataset_json=dataset_json,
                      configuration="3d_fullres", state_dict=state, mirror_axes=(0, 1, 2), load_notes=notes)
