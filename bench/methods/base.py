"""The one interface every fine-tuning method implements.

The engine (``bench.engine.trainer.BenchTrainer``) calls these hooks and never
asks which method it holds. A method decides what is trainable (``prepare``),
what the optimizer sees (``param_groups``), may edit gradients or updates
(``after_backward`` / ``after_step``), may add a loss term (``regularizer``)
and returns plain nnU-Net weights (``export``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from bench.checkpoint import is_head  # noqa: F401 - methods import it from here
from bench.options import OptionError, check_for_default


@dataclass
class MethodContext:
    """What a method may know about the run: the foundation weights and the spec."""
    foundation_state: Dict[str, torch.Tensor]
    device: torch.device = torch.device("cpu")
    seed: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainStart:
    """What ``Method.on_train_start`` may use, and nothing else of the trainer: the prepared network,
    an endless source of training batches (nnU-Net's ``{"data", "target"}`` dicts), the loss of the
    network on one batch (forward + nnU-Net's loss; the caller calls ``backward``) and the device."""
    network: nn.Module
    batches: Iterator[dict]
    loss_on_batch: Callable[[dict], torch.Tensor]
    device: torch.device = torch.device("cpu")


def encoder_of(network: nn.Module, what: str) -> nn.Module:
    """The encoder of a U-Net with nnU-Net's encoder/decoder split, or a clear refusal for ``what`` needs it."""
    if isinstance(getattr(network, "encoder", None), nn.Module) and isinstance(getattr(network, "decoder", None),
                                                                                nn.Module):
        return network.encoder
    raise ValueError(f"{what} needs a network with an encoder/decoder split (nnU-Net's PlainConvUNet, "
                     f"ResidualEncoderUNet, ...); {type(network).__name__} has none: use a method that does not "
                     "select by encoder or decoder (e.g. full, dgst, lora with target=all)")


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                               nn.modules.instancenorm._InstanceNorm))


def norm_parameter_names(network: nn.Module) -> set:
    names = set()
    for mname, module in network.named_modules():
        if is_norm(module):
            for pname, _ in module.named_parameters(recurse=False):
                names.add(f"{mname}.{pname}" if mname else pname)
    return names


class Method:
    """Base class: full fine-tuning semantics unless a hook is overridden."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""
    # Method-specific hyper-parameters and their defaults; shared ones (lr,
    # iterations, optimizer, weight decay) live in the run spec.
    defaults: ClassVar[Dict[str, Any]] = {}
    # Checks (``bench.options``) stricter than the one a default implies (its type, not negative).
    hp_checks: ClassVar[Dict[str, Callable[[Any], Any]]] = {}
    # The method's training recipe: optimizer, lr, weight_decay (bench.engine.recipe), applied
    # unless the user sets them (e.g. the released DGST trainer's SGD at lr 1e-3).
    spec_overrides: ClassVar[Dict[str, Any]] = {}
    # Whether the network is initialised from the foundation weights.
    uses_foundation: ClassVar[bool] = True
    # False: no training loop at all, the foundation is evaluated as it is (``zero-shot``).
    trains: ClassVar[bool] = True
    # False: the run reads nothing of its shot count (no support set, no tuning set: the reference rows), so
    # the runner reuses a finished run of the same cell at another shot count instead of training again.
    depends_on_shots: ClassVar[bool] = True

    def __init__(self, **hparams: Any):
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise ValueError(f"method {self.name!r} has no hyper-parameter(s) {sorted(unknown)}; "
                             f"it accepts: {sorted(self.defaults) or 'none'}")
        self.hp: Dict[str, Any] = {**self.defaults, **{k: self._checked(k, v) for k, v in hparams.items()}}

    def _checked(self, key: str, value: Any) -> Any:
        check = self.hp_checks.get(key) or check_for_default(self.defaults[key])
        try:
            return check(value)
        except OptionError as e:
            raise OptionError(f"method {self.name!r}: hyper-parameter {key} {e} (--hp {key}=VALUE)") from None

    # --- set-up ---------------------------------------------------------------------------
    def prepare(self, network: nn.Module, ctx: MethodContext) -> nn.Module:
        """Freeze, wrap or insert modules. Returns the network to train."""
        return network

    def param_groups(self, network: nn.Module) -> List[dict]:
        return [{"params": [p for p in network.parameters() if p.requires_grad]}]

    def on_train_start(self, start: TrainStart) -> None:
        """Called once after ``prepare`` and before the first step, when training batches exist
        (e.g. calibration passes; each one counts in ``calibration_passes``)."""

    @classmethod
    def training_ids(cls, support: List[str], pool: List[str]) -> List[str]:
        """The cases whose labels training reads: the split's support set (``oracle``: the whole pool)."""
        return list(support)

    @classmethod
    def validation_ids(cls, tune: List[str], support: List[str], pool: List[str]) -> List[str]:
        """The cases whose pseudo-Dice training logs every ``eval_every`` iterations (the tuner prunes on
        it): the split's tuning set, else the support set."""
        return list(tune or support)

    def calibration_passes(self) -> int:
        """Forward/backward passes ``on_train_start`` spends outside training steps. They count in the
        iteration budget: the trainer runs that many fewer steps, so every method does the same number
        of forward/backward passes."""
        return 0

    def updates_per_step(self, network: nn.Module) -> Optional[int]:
        """Parameter entries one step updates, for methods that update a subset of the trainable
        entries each step; None: every trainable entry."""
        return None

    # --- per step -------------------------------------------------------------------------
    def regularizer(self, network: nn.Module) -> Optional[torch.Tensor]:
        return None

    def after_backward(self, network: nn.Module, step: int) -> None:
        """Gradients are available (already unscaled under AMP), before clipping and the step."""

    def before_step(self, network: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Right before ``optimizer.step()``."""

    def after_step(self, network: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Right after ``optimizer.step()``."""

    # --- results --------------------------------------------------------------------------
    def export(self, network: nn.Module) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
        """Weights loadable by stock nnU-Net, and an optional architecture override for plans.json
        (``{"network_class_name": ..., "arch_kwargs": {...}}``) when the method changes the architecture."""
        return {k: v.detach().clone() for k, v in network.state_dict().items()}, None

    @classmethod
    def search_space(cls, trial) -> Dict[str, Any]:
        """Optuna space of this method's own hyper-parameters (shared ones are added by the tuner)."""
        return {}

    def describe(self) -> str:
        hp = ", ".join(f"{k}={v}" for k, v in self.hp.items())
        return f"{self.name}({hp})"


def count(params: Iterable[torch.Tensor]) -> int:
    return int(sum(p.numel() for p in params))
