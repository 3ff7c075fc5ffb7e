"""``STUNet``: STU-Net's scalable residual U-Net (Huang et al. 2023), in nnU-Net v2's module layout.

STU-Net scales nnU-Net's U-Net by depth (residual blocks per stage) and width (features per stage):

    size  features per stage (6 stages)    blocks per stage   parameters (1 channel, 105 classes)
    S     16 32 64 128 256 256             1                     14,596,941
    B     32 64 128 256 512 512            1                     58,262,669
    L     64 128 256 512 1024 1024         2                    440,302,605
    H     96 192 384 768 1536 1536         3                  1,457,326,221

(counted on this implementation; the paper reports 14.6M, 58.26M, 440.30M and 1457.33M.)

(``STUNET_SIZES`` holds the published settings.) Every block is residual: conv-norm-act-conv-norm, plus
the input (through a 1x1x1 conv where the width or resolution changes: the first block of a stage), then
act. Stage d > 0 downsamples with a stride-2 (the plans' pooling) first conv; the decoder upsamples by
nearest-neighbour interpolation followed by a 1x1x1 conv to the skip's width, concatenates the skip and
runs the stage's blocks; a 1x1x1 head per decoder stage gives the deep-supervision outputs. Convs are 3D
with bias, norms InstanceNorm3d (affine), nonlinearity LeakyReLU(0.01).

Parameter names. STU-Net's own (nnU-Net v1) module is flat: ``conv_blocks_context.{stage}.{block}.*``,
``upsample_layers.{i}.conv.*``, ``conv_blocks_localization.{i}.{block}.*``, ``seg_outputs.{i}.*``; a block's
tensors are ``conv1 norm1 conv2 norm2 conv3``. Here the same modules sit under nnU-Net v2's layout, so the
harness's methods (encoder/decoder split, heads in ``decoder.seg_layers``, adapters appended to a stage's
``blocks``) treat STU-Net like nnU-Net's own U-Nets: ``encoder.stages.{stage}.blocks.{block}.*``,
``decoder.upsample_layers.{i}.conv.*``, ``decoder.stages.{i}.blocks.{block}.*``, ``decoder.seg_layers.{i}.*``.
``v1_to_v2_key`` maps one onto the other (``bench.stunet`` converts released checkpoints with it).
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence

import torch
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from torch import nn
from torch.nn import functional as F

from bench.architectures import stage_outputs

# Published STU-Net sizes (the released trainers STUNetTrainer_small/base/large/huge).
STUNET_SIZES = {
    "S": {"features_per_stage": [16, 32, 64, 128, 256, 256], "n_blocks_per_stage": [1] * 6},
    "B": {"features_per_stage": [32, 64, 128, 256, 512, 512], "n_blocks_per_stage": [1] * 6},
    "L": {"features_per_stage": [64, 128, 256, 512, 1024, 1024], "n_blocks_per_stage": [2] * 6},
    "H": {"features_per_stage": [96, 192, 384, 768, 1536, 1536], "n_blocks_per_stage": [3] * 6},
}
NORM_KWARGS = {"eps": 1e-5, "affine": True}
NONLIN_KWARGS = {"inplace": True}


class ResBlock(nn.Module):
    """conv1-norm1-act1-conv2-norm2, plus the input (``conv3``: 1x1x1 projection when given), then act2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], stride: Sequence[int] = 1,
                 project: bool = False):
        super().__init__()
        padding = [k // 2 for k in kernel_size]
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.norm1 = nn.InstanceNorm3d(out_channels, **NORM_KWARGS)
        self.act1 = nn.LeakyReLU(**NONLIN_KWARGS)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size, padding=padding)
        self.norm2 = nn.InstanceNorm3d(out_channels, **NORM_KWARGS)
        self.act2 = nn.LeakyReLU(**NONLIN_KWARGS)
        self.conv3 = nn.Conv3d(in_channels, out_channels, 1, stride=stride) if project else None

    def forward(self, x):
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + (self.conv3(x) if self.conv3 is not None else x))


class ResStage(nn.Module):
    """A stage's residual blocks under ``blocks`` (the first one projects), as nnU-Net's residual stages."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, kernel_size, stride=1):
        super().__init__()
        self.blocks = nn.Sequential(ResBlock(in_channels, out_channels, kernel_size, stride, project=True),
                                    *[ResBlock(out_channels, out_channels, kernel_size) for _ in range(n_blocks - 1)])

    def forward(self, x):
        return self.blocks(x)


class UpsampleConv(nn.Module):
    """Nearest-neighbour upsampling to the skip's size, then a 1x1x1 conv to the skip's width."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class STUNetEncoder(nn.Module):
    # What the harness reads from an nnU-Net encoder (adapters, scratch-light), fixed by STU-Net's design.
    conv_op, norm_op, nonlin, dropout_op = nn.Conv3d, nn.InstanceNorm3d, nn.LeakyReLU, None
    norm_op_kwargs, nonlin_kwargs, dropout_op_kwargs, conv_bias = NORM_KWARGS, NONLIN_KWARGS, None, True

    def __init__(self, input_channels: int, features: Sequence[int], blocks: Sequence[int], kernel_sizes, strides):
        super().__init__()
        widths = [input_channels] + list(features)
        self.stages = nn.ModuleList(ResStage(widths[d], widths[d + 1], blocks[d], kernel_sizes[d], strides[d])
                                    for d in range(len(features)))
        self.output_channels = list(features)
        self.kernel_sizes, self.strides = [list(k) for k in kernel_sizes], [list(s) for s in strides]

    def forward(self, x) -> List[torch.Tensor]:
        return stage_outputs(self.stages, x)


class STUNetDecoder(nn.Module):
    def __init__(self, encoder: STUNetEncoder, num_classes: int, blocks: Sequence[int], deep_supervision: bool):
        super().__init__()
        widths, kernels = encoder.output_channels, encoder.kernel_sizes
        self.num_classes, self.deep_supervision = num_classes, deep_supervision
        up = range(len(widths) - 1, 0, -1)  # deepest first: stage s's output goes to stage s-1's skip
        self.upsample_layers = nn.ModuleList(UpsampleConv(widths[s], widths[s - 1]) for s in up)
        self.stages = nn.ModuleList(ResStage(2 * widths[s - 1], widths[s - 1], blocks[s - 1], kernels[s - 1])
                                    for s in up)
        self.seg_layers = nn.ModuleList(nn.Conv3d(widths[s - 1], num_classes, 1) for s in up)

    def forward(self, skips: List[torch.Tensor]):
        x, outputs = skips[-1], []
        last = len(self.stages) - 1
        for i, (upsample, stage) in enumerate(zip(self.upsample_layers, self.stages)):
            skip = skips[-(i + 2)]
            x = stage(torch.cat((upsample(x, skip.shape[2:]), skip), dim=1))
            if self.deep_supervision or i == last:
                outputs.append(self.seg_layers[i](x))
        outputs = outputs[::-1]  # full resolution first, as nnU-Net's loss expects
        return outputs if self.deep_supervision else outputs[0]


class STUNet(nn.Module):
    """Built by nnU-Net from plans: ``network_class_name`` ``bench.architectures.stunet.STUNet``; arch_kwargs
    ``n_stages``, ``features_per_stage``, ``n_blocks_per_stage``, ``kernel_sizes`` and ``strides`` (nnU-Net v2's
    convention: one per stage, the first stage's stride 1; STU-Net's pool kernels are ``strides[1:]``)."""

    def __init__(self, input_channels: int, num_classes: int, n_stages: int, features_per_stage: Sequence[int],
                 n_blocks_per_stage: Sequence[int], kernel_sizes, strides, deep_supervision: bool = False):
        super().__init__()
        lengths = {"features_per_stage": len(features_per_stage), "n_blocks_per_stage": len(n_blocks_per_stage),
                   "kernel_sizes": len(kernel_sizes), "strides": len(strides)}
        wrong = {k: v for k, v in lengths.items() if v != n_stages}
        if wrong:
            raise ValueError(f"STUNet: n_stages {n_stages}, but {wrong} (one entry per stage each)")
        self.encoder = STUNetEncoder(input_channels, features_per_stage, n_blocks_per_stage, kernel_sizes, strides)
        self.decoder = STUNetDecoder(self.encoder, num_classes, n_blocks_per_stage, deep_supervision)

    def forward(self, x):
        return self.decoder(self.encoder(x))

    @staticmethod
    def initialize(module):
        InitWeights_He(1e-2)(module)  # STU-Net's initialiser


def stunet_architecture(features: Sequence[int], blocks: Sequence[int], strides, kernel_sizes=None) -> dict:
    """The plans ``architecture`` entry of an STU-Net (``strides`` in nnU-Net v2's convention)."""
    from bench.architectures import class_path
    n = len(features)
    return {"network_class_name": class_path(STUNet),
            "arch_kwargs": {"n_stages": n, "features_per_stage": [int(f) for f in features],
                            "n_blocks_per_stage": [int(b) for b in blocks],
                            "kernel_sizes": [list(map(int, k)) for k in (kernel_sizes or [[3, 3, 3]] * n)],
                            "strides": [list(map(int, s)) for s in strides]},
            "_kw_requires_import": []}


_V1_KEY = re.compile(r"^(conv_blocks_context|conv_blocks_localization)\.(\d+)\.(\d+)\.(.+)$|"
                     r"^(upsample_layers|seg_outputs)\.(\d+)\.(.+)$")
_V1_PARTS = {"conv_blocks_context": "encoder.stages", "conv_blocks_localization": "decoder.stages",
             "upsample_layers": "decoder.upsample_layers", "seg_outputs": "decoder.seg_layers"}


def v1_to_v2_key(key: str) -> Optional[str]:
    """The v2-layout name of one tensor of STU-Net's v1 module; None for a name outside that layout."""
    m = _V1_KEY.match(key)
    if m is None:
        return None
    if m.group(1):
        return f"{_V1_PARTS[m.group(1)]}.{m.group(2)}.blocks.{m.group(3)}.{m.group(4)}"
    return f"{_V1_PARTS[m.group(5)]}.{m.group(6)}.{m.group(7)}"
