"""``LightUNet``: a lightweight 3D segmentation U-Net of depthwise-separable convolutions.

In the spirit of LNSNet-style lightweight specialists: every convolution is a depthwise kxkxk conv
(one filter per channel, the plans' kernel size and stride) followed by a pointwise 1x1x1 conv that
mixes channels, then norm and nonlinearity. A dense kxkxk conv from C to C' channels costs
C*C'*k^3 weights, the separable pair C*k^3 + C*C': at 3x3x3 and equal widths about 1/27 + 1/C of it.

Encoder: per stage two separable blocks, the first strided (the plans' strides: the same resolutions,
hence the same deep-supervision scales, as the foundation's U-Net). Decoder: per stage a pointwise
projection of the coarser features to the skip's width, nearest-neighbour upsampling, fusion by
addition (attention-free, no concatenation: no wider convs), one separable block and a 1x1x1
segmentation head. With deep supervision it returns one output per decoder stage, full resolution
first, like nnU-Net's ``UNetDecoder``, so nnU-Net's trainer and loss take it as they are.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn import functional as F

from bench.architectures import class_path, stage_outputs


def _listed(value, n: int) -> List[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


class SeparableConvBlock(nn.Module):
    """depthwise kxkxk (strided) -> pointwise 1x1x1 -> norm -> [dropout] -> nonlinearity."""

    def __init__(self, conv_op, in_channels: int, out_channels: int, kernel_size, stride, conv_bias: bool,
                 norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs):
        super().__init__()
        padding = [k // 2 for k in kernel_size] if isinstance(kernel_size, (list, tuple)) else kernel_size // 2
        self.depthwise = conv_op(in_channels, in_channels, kernel_size, stride, padding=padding,
                                 groups=in_channels, bias=conv_bias)
        self.pointwise = conv_op(in_channels, out_channels, 1, bias=conv_bias)
        self.norm = norm_op(out_channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()
        self.dropout = dropout_op(**(dropout_op_kwargs or {})) if dropout_op is not None else nn.Identity()
        self.nonlin = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()

    def forward(self, x):
        return self.nonlin(self.dropout(self.norm(self.pointwise(self.depthwise(x)))))


class LightStage(nn.Module):
    """A stage's blocks under ``blocks`` (nnU-Net's residual stages use the same attribute)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class LightEncoder(nn.Module):
    def __init__(self, input_channels: int, features_per_stage: Sequence[int], kernel_sizes, strides,
                 blocks_per_stage: int, **block_kwargs):
        super().__init__()
        self.stages = nn.ModuleList()
        channels = input_channels
        for features, kernel, stride in zip(features_per_stage, kernel_sizes, strides):
            blocks = [SeparableConvBlock(in_channels=channels, out_channels=features, kernel_size=kernel, stride=stride,
                                         **block_kwargs)]
            blocks += [SeparableConvBlock(in_channels=features, out_channels=features, kernel_size=kernel, stride=1,
                                          **block_kwargs) for _ in range(blocks_per_stage - 1)]
            self.stages.append(LightStage(blocks))
            channels = features
        # the attribute names of nnU-Net's encoders: methods and adapters read them
        self.output_channels = list(features_per_stage)
        self.kernel_sizes, self.strides = [list(k) for k in kernel_sizes], [list(s) for s in strides]
        for key, value in block_kwargs.items():
            setattr(self, key, value)

    def forward(self, x) -> List[torch.Tensor]:
        return stage_outputs(self.stages, x)


class LightDecoder(nn.Module):
    def __init__(self, encoder: LightEncoder, num_classes: int, deep_supervision: bool, **block_kwargs):
        super().__init__()
        conv_op, bias = block_kwargs["conv_op"], block_kwargs["conv_bias"]
        widths, kernels = encoder.output_channels, encoder.kernel_sizes
        self.deep_supervision, self.num_classes = deep_supervision, num_classes
        self.projections, self.stages, self.seg_layers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(len(widths) - 1, 0, -1):  # deepest first: stage s-1's skip receives stage s
            self.projections.append(conv_op(widths[s], widths[s - 1], 1, bias=bias))
            self.stages.append(LightStage([SeparableConvBlock(in_channels=widths[s - 1], out_channels=widths[s - 1],
                                                              kernel_size=kernels[s - 1], stride=1, **block_kwargs)]))
            self.seg_layers.append(conv_op(widths[s - 1], num_classes, 1, bias=True))

    def forward(self, skips: List[torch.Tensor]):
        x, outputs = skips[-1], []
        last = len(self.stages) - 1
        for i, (project, stage) in enumerate(zip(self.projections, self.stages)):
            skip = skips[-(i + 2)]
            x = stage(F.interpolate(project(x), size=skip.shape[2:], mode="nearest") + skip)
            if self.deep_supervision or i == last:
                outputs.append(self.seg_layers[i](x))
        outputs = outputs[::-1]  # full resolution first, as nnU-Net's loss expects
        return outputs if self.deep_supervision else outputs[0]


class LightUNet(nn.Module):
    """Built by nnU-Net from plans: ``architecture.network_class_name`` = ``bench.architectures.light.LightUNet``
    with the arch_kwargs of ``light_architecture``."""

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Sequence[int], conv_op,
                 kernel_sizes, strides, num_classes: int, conv_bias: bool = True, norm_op=None,
                 norm_op_kwargs: Optional[dict] = None, dropout_op=None, dropout_op_kwargs: Optional[dict] = None,
                 nonlin=None, nonlin_kwargs: Optional[dict] = None, deep_supervision: bool = False,
                 blocks_per_stage: int = 2):
        super().__init__()
        if not (len(features_per_stage) == len(kernel_sizes) == len(strides) == n_stages):
            raise ValueError(f"LightUNet: n_stages {n_stages} but {len(features_per_stage)} features, "
                             f"{len(kernel_sizes)} kernel sizes and {len(strides)} strides (one per stage each)")
        if int(blocks_per_stage) < 1:
            raise ValueError(f"LightUNet: blocks_per_stage must be >= 1, got {blocks_per_stage}")
        block_kwargs = dict(conv_op=conv_op, conv_bias=conv_bias, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs,
                            dropout_op=dropout_op, dropout_op_kwargs=dropout_op_kwargs, nonlin=nonlin,
                            nonlin_kwargs=nonlin_kwargs)
        self.encoder = LightEncoder(input_channels, features_per_stage, kernel_sizes, strides, int(blocks_per_stage),
                                    **block_kwargs)
        self.decoder = LightDecoder(self.encoder, num_classes, deep_supervision, **block_kwargs)

    def forward(self, x):
        return self.decoder(self.encoder(x))

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)


# arch_kwargs that name a class (nnU-Net's ``_kw_requires_import``)
CLASS_KWARGS = ("conv_op", "norm_op", "dropout_op", "nonlin")


def light_architecture(network: nn.Module, blocks_per_stage: int = 2) -> dict:
    """The plans ``architecture`` entry of a LightUNet with the stages (widths, kernels, strides), conv, norm
    and nonlinearity of ``network``, an nnU-Net U-Net (or any network whose encoder carries nnU-Net's
    attributes: ``output_channels``, ``kernel_sizes``, ``strides``, ``conv_op``, ...)."""
    enc = getattr(getattr(network, "_orig_mod", network), "encoder", None)  # torch.compile wraps the module
    missing = [a for a in ("output_channels", "kernel_sizes", "strides") + CLASS_KWARGS if not hasattr(enc, a)]
    if missing:
        raise ValueError(f"scratch-light: the foundation's {type(network).__name__} encoder lacks {missing}; "
                         "it needs an nnU-Net U-Net (PlainConvUNet, ResidualEncoderUNet, STUNet) to take "
                         "the stages from")
    kwargs = {"n_stages": len(enc.output_channels), "features_per_stage": [int(c) for c in enc.output_channels],
              "kernel_sizes": [[int(k) for k in _listed(v, 3)] for v in enc.kernel_sizes],
              "strides": [[int(s) for s in _listed(v, 3)] for v in enc.strides],
              "conv_bias": bool(getattr(enc, "conv_bias", True)),
              "norm_op_kwargs": dict(enc.norm_op_kwargs or {}), "dropout_op_kwargs": enc.dropout_op_kwargs,
              "nonlin_kwargs": dict(enc.nonlin_kwargs or {}), "blocks_per_stage": int(blocks_per_stage)}
    kwargs.update({k: class_path(getattr(enc, k)) if getattr(enc, k) is not None else None for k in CLASS_KWARGS})
    return {"network_class_name": class_path(LightUNet), "arch_kwargs": kwargs,
            "_kw_requires_import": list(CLASS_KWARGS)}
