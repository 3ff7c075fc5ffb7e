"""SwinUNETR (MONAI's implementation) as a network nnU-Net builds from plans.

Plans name it as ``bench.architectures.swin_unetr.SwinUNETRNet`` with MONAI's keyword arguments
(``feature_size``, ``depths``, ``num_heads``, ...) in ``arch_kwargs``; nnU-Net's
``get_network_from_plans`` passes ``input_channels`` / ``num_classes`` / ``deep_supervision``, and
stock ``nnUNetPredictor`` loads an exported folder as long as this package is importable.

The class subclasses MONAI's ``SwinUNETR`` so its state-dict keys are MONAI's own (``swinViT.*``,
``encoder1.*``, ``out.*``): SwinUNETR checkpoints load by name. SwinUNETR has one output, so with deep
supervision the forward returns a one-element list; nnU-Net's deep-supervision loss then weights that
output alone (``strides`` gives nnU-Net the two downsampling levels its loss weighting needs).
Inputs must be divisible by 32 along every axis (patch embedding 2, four 2x merges).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

from monai.networks.nets import SwinUNETR

DEFAULT_STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2))


class SwinUNETRNet(SwinUNETR):
    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 strides: Sequence[Sequence[int]] = DEFAULT_STRIDES, **swin_kwargs):
        swin_kwargs.setdefault("spatial_dims", 3)
        super().__init__(in_channels=input_channels, out_channels=num_classes, **swin_kwargs)
        # nnU-Net switches deep supervision via ``network.decoder.deep_supervision``; a plain namespace
        # (not a module) so that no parameter is registered under a second name
        self.decoder = SimpleNamespace(deep_supervision=deep_supervision)
        self.strides = [list(s) for s in strides]

    def forward(self, x):
        out = super().forward(x)
        return [out] if self.decoder.deep_supervision else out
