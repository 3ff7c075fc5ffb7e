"""The training recipe of a run: optimizer, learning rate, weight decay.

Three sources, first one set wins (recorded per field in ``Recipe.source``):

1. ``user``: an explicit value in the run spec (``bench run --optimizer/--lr/--weight-decay``);
2. ``method``: the method's ``spec_overrides`` (e.g. ``dgst-released`` runs the released
   LN-Seg-FM trainer's nnU-Net SGD at lr 1e-3);
3. ``harness``: ``HARNESS_DEFAULTS``.

A run spec field left at ``None`` means "the recipe's value".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional

# AdamW: nnU-Net's SGD at lr 1e-2 often stayed all-background for hundreds of iterations on the
# tiny phantom network; methods that need nnU-Net's SGD set it in their recipe.
HARNESS_DEFAULTS: Dict[str, Any] = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 3e-5}
RECIPE_FIELDS = tuple(HARNESS_DEFAULTS)
# What each optimizer name builds (bench.engine.step.make_optimizer), for headers and captions.
OPTIMIZERS = {"sgd": "SGD (nnU-Net's: momentum 0.99, nesterov)", "adamw": "AdamW (betas 0.9, 0.999)"}


@dataclass(frozen=True)
class Recipe:
    optimizer: str
    lr: float
    weight_decay: float
    source: Dict[str, str] = field(default_factory=dict)  # field -> user | method | harness

    def describe(self) -> str:
        parts = [f"{OPTIMIZERS[self.optimizer]}, lr {self.lr:g}, weight decay {self.weight_decay:g}"]
        fixed = [f for f in RECIPE_FIELDS if self.source.get(f) == "method"]
        mine = [f for f in RECIPE_FIELDS if self.source.get(f) == "user"]
        if fixed:
            parts.append(f"from the method's recipe: {', '.join(fixed)}")
        if mine:
            parts.append(f"set by the user: {', '.join(mine)}")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_recipe(explicit: Mapping[str, Optional[Any]], method_overrides: Mapping[str, Any],
                   method_name: str = "method") -> Recipe:
    """``explicit``: the spec's values (None = not set); ``method_overrides``: ``Method.spec_overrides``."""
    unknown = set(method_overrides) - set(RECIPE_FIELDS)
    if unknown:
        raise ValueError(f"{method_name}.spec_overrides sets {sorted(unknown)}; a recipe may set "
                         f"{', '.join(RECIPE_FIELDS)}")
    values, source = {}, {}
    for f in RECIPE_FIELDS:
        if explicit.get(f) is not None:
            values[f], source[f] = explicit[f], "user"
        elif f in method_overrides:
            values[f], source[f] = method_overrides[f], "method"
        else:
            values[f], source[f] = HARNESS_DEFAULTS[f], "harness"
    if values["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {values['optimizer']!r}; use one of {', '.join(OPTIMIZERS)}")
    return Recipe(str(values["optimizer"]), float(values["lr"]), float(values["weight_decay"]), source)
