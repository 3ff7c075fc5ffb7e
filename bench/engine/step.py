"""One training step with the method hooks, shared by the nnU-Net trainer and the tests.

Order (nnU-Net's own, plus hooks): zero grads -> forward + loss (+ method
regularizer) -> backward -> unscale (AMP) -> ``after_backward`` -> clip (12, as
nnU-Net) -> ``before_step`` -> optimizer step -> ``after_step``.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
from torch import nn

from bench.methods.base import Method

GRAD_CLIP = 12.0  # nnU-Net's value


def make_optimizer(name: str, param_groups, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":  # nnU-Net's optimizer
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay, momentum=0.99, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd' (nnU-Net's) or 'adamw'")


def training_step(network: nn.Module, method: Method, optimizer: torch.optim.Optimizer,
                  loss_fn: Callable, data, target, step: int,
                  grad_scaler: Optional["torch.amp.GradScaler"] = None) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    device_type = data.device.type
    amp = torch.autocast(device_type, enabled=True) if device_type == "cuda" else nullcontext()
    with amp:
        output = network(data)
        loss = loss_fn(output, target)
        reg = method.regularizer(network)
        if reg is not None:
            loss = loss + reg
    params = [p for p in network.parameters() if p.requires_grad]
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        grad_scaler.unscale_(optimizer)
    else:
        loss.backward()
    method.after_backward(network, step)
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    method.before_step(network, optimizer, step)
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()
    method.after_step(network, optimizer, step)
    return loss.detach()
