"""Reference rows that every few-shot table is read between: the floor and the ceiling.

- ``zero-shot``: the foundation as it is, no training loop at all, evaluated on
  the same test cases. Applicable only when the target's label set is the one
  the foundation's head was trained on (same names, same values); otherwise its
  head would predict some other structure, and the run is refused.
- ``oracle``: full fine-tuning on every labelled non-test case of the protocol
  (its pool), with the dataset's budget for that many cases (``Dataset.budget``;
  batch and learning rate as the few-shot rows). It reads the tuning cases'
  labels too, so it cannot be tuned.

Neither reads the shot count: a run at one shot count is reused, not retrained,
at the others (``Method.depends_on_shots``; ``bench.runner``), so every table of
a dataset shows the same floor and ceiling.
"""
from __future__ import annotations

import json
from typing import Dict, List

from bench.methods import METHODS
from bench.methods.base import Method
from bench.methods.full import FullFineTuning

ORACLE_VALIDATION_CASES = 5


class NotApplicable(ValueError):
    """The method cannot be run on this (foundation, dataset) pair; the message says why."""


@METHODS.register("zero-shot")
class ZeroShot(Method):
    summary = "reference (floor): the foundation as it is, no training; needs the target's label set on its head"
    trains = False
    depends_on_shots = False

    def prepare(self, network, ctx):
        for p in network.parameters():
            p.requires_grad_(False)
        return network

    @classmethod
    def training_ids(cls, support: List[str], pool: List[str]) -> List[str]:
        return []


@METHODS.register("oracle")
class Oracle(FullFineTuning):
    summary = "reference (ceiling): full fine-tuning on the protocol's whole pool of labelled non-test cases"
    depends_on_shots = False

    @classmethod
    def training_ids(cls, support: List[str], pool: List[str]) -> List[str]:
        return list(pool)

    @classmethod
    def validation_ids(cls, tune: List[str], support: List[str], pool: List[str]) -> List[str]:
        """Every case it could validate on is a training case, so the pseudo-Dice only shows progress; the
        first pool cases, the same at every shot count (the run does not depend on the shots)."""
        return list(pool[:ORACLE_VALIDATION_CASES])


def foundation_as_is(foundation, plans: dict, dataset_json: dict):
    """The outcome of not training: the foundation's own weights (heads included), nothing changed."""
    from bench.engine.train import TrainOutcome, parameter_keys

    if getattr(foundation.state_dict, "fresh_prefixes", ()):
        raise NotApplicable(f"zero-shot is not applicable: foundation {foundation.name} is "
                            f"{foundation.state_dict.why}; there is nothing to predict with before fine-tuning.")
    theirs: Dict[str, int] = foundation.dataset_json["labels"]
    ours: Dict[str, int] = dataset_json["labels"]
    if theirs != ours:
        raise NotApplicable(f"zero-shot is not applicable: foundation {foundation.name} segments "
                            f"{json.dumps(theirs)}, dataset {dataset_json.get('name', '?')} has labels "
                            f"{json.dumps(ours)}; its head would predict other structures. Fine-tune instead "
                            "(e.g. --method linear-probe), or use a foundation trained on this label set.")
    keys = parameter_keys(plans, dataset_json, foundation.configuration, None)
    state = {k: v.clone() for k, v in foundation.state_dict.items()}
    config = plans["configurations"][foundation.configuration]
    return TrainOutcome(export_state=state, arch_override=None, train_seconds=0.0, step_times=[],
                        peak_memory_mb=None, trainable=0, total=int(sum(state[k].numel() for k in keys)),
                        changed=0, load_report={"loaded": sorted(state), "reinitialised": []}, epoch_scores=[],
                        train_steps=0, calibration_passes=0, updated_per_step=0,
                        batch_size=config.get("batch_size"), patch_size=list(config["patch_size"]))
