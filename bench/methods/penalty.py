"""L2 pull towards the foundation weights (DGST's R_penalty, L2-SP)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn


class FoundationAnchor:
    """Keeps a device copy of the foundation value of every trainable tensor whose shape matches."""

    def __init__(self, network: nn.Module, foundation_state: Dict[str, torch.Tensor]):
        self.ref: Dict[str, torch.Tensor] = {}
        for name, p in network.named_parameters():
            ref = foundation_state.get(name)
            if p.requires_grad and ref is not None and ref.shape == p.shape:
                self.ref[name] = ref.detach().to(p.device, p.dtype).clone()

    def penalty(self, network: nn.Module, weight: float) -> Optional[torch.Tensor]:
        if weight <= 0 or not self.ref:
            return None
        params = dict(network.named_parameters())
        total = sum(((params[n] - r) ** 2).sum() for n, r in self.ref.items())
        return weight * total
