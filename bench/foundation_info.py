"""``bench foundation show``: what a foundation folder is, and what fine-tuning on a target would load."""
from __future__ import annotations

import json
from typing import List

from bench.checkpoint import CheckpointError, is_head
from bench.foundation import RECIPES, Foundation, existing_phantom_foundation_dir, shipped_foundation_dir, \
    target_load_report

PERCENTILES = ("percentile_00_5", "percentile_99_5")


def _normalisation(foundation: Foundation) -> List[str]:
    """One line per input channel: name, nnU-Net scheme, and the statistics CT normalisation clips with."""
    cfg = foundation.plans["configurations"][foundation.configuration]
    stats = foundation.plans.get("foreground_intensity_properties_per_channel", {})
    lines = []
    for i, (c, name) in enumerate(sorted(foundation.dataset_json["channel_names"].items(), key=lambda kv: int(kv[0]))):
        scheme = cfg["normalization_schemes"][i]
        line = f"channel {c} {name}: {scheme}"
        if scheme == "CTNormalization" and c in stats:
            s = stats[c]
            line += (f" (clip {s[PERCENTILES[0]]:g} .. {s[PERCENTILES[1]]:g}, mean {s['mean']:g}, "
                     f"std {s['std']:g})")
        if cfg.get("use_mask_for_norm", [False] * (i + 1))[i]:
            line += ", inside the non-zero mask"
        lines.append(line)
    return lines


def _target_lines(foundation: Foundation, target_name: str, target_json: dict) -> List[str]:
    head = f"fine-tuning on {target_name} (labels {json.dumps(target_json['labels'])}):"
    try:
        report = target_load_report(foundation, target_json)
    except CheckpointError as e:
        return [head, f"  refused: {e}"]
    n = len(report["loaded"])
    heads = [k for k in report["reinitialised"] if is_head(k)]
    fresh = [k for k in report["reinitialised"] if not is_head(k)]
    lines = [head]
    if not report["reinitialised"]:
        same = foundation.dataset_json["labels"] == target_json["labels"]
        return lines + [f"  all {n} state-dict tensors loaded, segmentation heads included"
                        + (" (label set matches)" if same else " (same number of labels, other names: check them)")]
    lines.append(f"  {n} state-dict tensors loaded" + ("; re-initialised (label set differs): " + ", ".join(heads)
                                                       if heads else ""))
    if fresh:
        lines.append(f"  initialised fresh (not in the checkpoint): {len(fresh)} tensors: "
                     + ", ".join(fresh[:6]) + (" ..." if len(fresh) > 6 else ""))
    return lines


def describe(foundation: Foundation, target_name: str, target_json: dict) -> str:
    from bench.engine.network import build_network
    cfg = foundation.plans["configurations"][foundation.configuration]
    arch = cfg["architecture"]
    kw = arch["arch_kwargs"]
    # parameters of the network, not of the state dict: nnU-Net registers some tensors under two names
    n = sum(p.numel() for p in build_network(foundation.plans, foundation.dataset_json,
                                             foundation.configuration).parameters())
    lines = [f"{foundation.name} ({foundation.folder})",
             f"  architecture   {arch['network_class_name']}"
             + (f", {kw['n_stages']} stages, features {kw['features_per_stage']}" if "n_stages" in kw else ""),
             f"  parameters     {n:,}",
             f"  configuration  {foundation.configuration}: patch {cfg['patch_size']}, spacing {cfg['spacing']} mm "
             f"(z, y, x), batch {cfg.get('batch_size')}",
             f"  labels         {json.dumps(foundation.dataset_json['labels'])}"]
    lines += [f"  normalisation  {line}" for line in _normalisation(foundation)]
    lines += [f"  loading        {note}" for note in foundation.load_notes]
    lines += ["  " + line for line in _target_lines(foundation, target_name, target_json)]
    return "\n".join(lines)


def suite_foundations() -> str:
    """The suite's phantom foundations (``--foundation NAME``): network and where each one loads from."""
    lines = ["suite foundations (--foundation NAME; the first is the default):"]
    for name, recipe in RECIPES.items():
        arch = recipe.get("architecture")
        network = "PlainConvUNet" if arch is None else \
            f"{arch['network']} ({arch.get('n_blocks_per_stage')} residual blocks per stage)"
        folder = existing_phantom_foundation_dir(recipe)
        if folder is None:
            where = "not built: the first run builds it"
        else:
            where = ("shipped" if folder == shipped_foundation_dir(recipe) else "rebuilt") + f" ({folder})"
            dice = json.loads((folder / "bench.json").read_text()).get("source_dice", {})
            if dice:
                where += f", source Dice {sum(dice.values()) / len(dice):.3f}"
        lines.append(f"  {name:<20} {network}: {where}")
    return "\n".join(lines)
