"""STU-Net's released nnU-Net v1 checkpoints, read safely and converted to an nnU-Net v2 model folder.

A v1 release is two files: ``<name>.model`` (``torch.save`` of a dict: ``state_dict`` plus the
trainer's ``optimizer_state_dict``, ``amp_grad_scaler``, ``plot_stuff``, ...) and ``<name>.model.pkl``
(a plain pickle: ``init`` (the trainer's arguments), ``name`` (its class), ``plans`` (the v1 plans)).

- ``.model``: ``bench.checkpoint.load_checkpoint`` (``weights_only`` with the numpy allow-list); only
  ``state_dict`` is used.
- ``.model.pkl``: a restricted unpickler (``find_class`` resolves only numpy arrays/scalars/dtypes and
  ``OrderedDict``; anything else is refused naming the type), so no code in the file runs.

The architecture (widths, blocks per stage, kernel sizes, input channels, classes) is read off the tensor
shapes; the pooling off the v1 plans of the trained stage, as STU-Net's trainer does (its first five
``pool_op_kernel_sizes``, padded with [1, 1, 1]). The v2 folder names ``bench.architectures.stunet.STUNet``
in plans.json, so stock ``nnUNetPredictor`` (with this package importable) and every method load it.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from bench.checkpoint import CheckpointError, load_checkpoint, numpy_globals, strip_prefixes

CONFIGURATION = "3d_fullres"
# v1 normalisation scheme -> v2 normaliser (nnU-Net v1's 'CT2' clips and z-scores like 'CT')
NORMALISATION = {"CT": "CTNormalization", "CT2": "CTNormalization", "nonCT": "ZScoreNormalization",
                 "noNorm": "NoNormalization"}
# v1 intensity property -> v2 name
INTENSITY = {"max": "mx", "mean": "mean", "median": "median", "min": "mn", "percentile_00_5": "percentile_00_5",
             "percentile_99_5": "percentile_99_5", "std": "sd"}


def is_v1_checkpoint(path) -> bool:
    """A v1 ``.model`` file (the converter's input), not a v2 model folder."""
    path = Path(path)
    return path.is_file() and path.suffix == ".model"


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def _pkl_allowed() -> Dict[Tuple[str, str], object]:
    allowed = {("collections", "OrderedDict"): OrderedDict, ("builtins", "set"): set,
               ("builtins", "frozenset"): frozenset}
    for g in numpy_globals():
        obj, name = g if isinstance(g, tuple) else (g, f"{g.__module__}.{g.__qualname__}")
        module, _, attr = name.rpartition(".")
        allowed[(module, attr)] = obj
    return allowed


class _PlansUnpickler(pickle.Unpickler):
    """Rebuilds containers, numbers, strings and numpy values; refuses every other global."""

    def find_class(self, module, name):
        obj = _pkl_allowed().get((module, name))
        if obj is None:
            raise CheckpointError(f"refused: it pickles {module}.{name}, which only a full unpickle could rebuild "
                                  "(and a full unpickle can run arbitrary code)")
        return obj


def read_v1_pkl(path) -> dict:
    """The ``.model.pkl`` next to a v1 checkpoint, unpickled with numpy values and containers only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing. A v1 checkpoint comes with <name>.model.pkl (its plans); put "
                                "it next to the .model file or pass --pkl PATH")
    try:
        info = _PlansUnpickler(io.BytesIO(path.read_bytes())).load()
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}. Expected nnU-Net v1's .model.pkl (init, name, plans).") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable nnU-Net v1 .model.pkl ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("plans"), dict):
        raise CheckpointError(f"{path}: no 'plans' dict; expected nnU-Net v1's .model.pkl (init, name, plans)")
    return info


def read_v1_state(path) -> Dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'state_dict'; expected an nnU-Net v1 .model checkpoint "
                              f"(found keys {sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__})")
    return strip_prefixes(dict(state))[0]


# --------------------------------------------------------------------------------------------------
# architecture from the tensors
# --------------------------------------------------------------------------------------------------
def _count(state, template: str) -> int:
    """How many consecutive indices 0, 1, ... fill ``template`` to a key of ``state``."""
    n = 0
    while template.format(n) in state:
        n += 1
    return n


def infer_architecture(state: Dict[str, torch.Tensor], path="checkpoint") -> dict:
    """Input channels, classes, widths, blocks per stage and kernel sizes of an STU-Net v1 state dict."""
    n_stages = _count(state, "conv_blocks_context.{}.0.conv1.weight")
    if n_stages < 2 or "seg_outputs.0.weight" not in state:
        sample = ", ".join(list(state)[:4])
        raise CheckpointError(f"{path}: not an STU-Net state dict (expected conv_blocks_context.<stage>.<block>.conv1 "
                              f"and seg_outputs.<i> tensors; found {sample} ...)")
    first = [state[f"conv_blocks_context.{d}.0.conv1.weight"] for d in range(n_stages)]
    return {"input_channels": int(first[0].shape[1]), "num_classes": int(state["seg_outputs.0.weight"].shape[0]),
            "features": [int(w.shape[0]) for w in first],
            "blocks": [_count(state, f"conv_blocks_context.{d}.{{}}.conv1.weight") for d in range(n_stages)],
            "kernel_sizes": [[int(k) for k in w.shape[2:]] for w in first]}


def stunet_pools(v1_pools: Optional[List], n_pools: int) -> List[List[int]]:
    """STU-Net's trainer: the plans' pooling, cut to ``n_pools`` or padded with [1, 1, 1]."""
    pools = [[int(v) for v in p] for p in (v1_pools or [])][:n_pools]
    return pools + [[1, 1, 1]] * (n_pools - len(pools))


def to_v2_state(state: Dict[str, torch.Tensor], path="checkpoint") -> Dict[str, torch.Tensor]:
    from bench.architectures.stunet import v1_to_v2_key
    out, unknown = {}, []
    for key, value in state.items():
        new = v1_to_v2_key(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise CheckpointError(f"{path}: tensors outside STU-Net's layout: {unknown[:5]}"
                              + (" ..." if len(unknown) > 5 else ""))
    return out


# --------------------------------------------------------------------------------------------------
# plans.json and dataset.json
# --------------------------------------------------------------------------------------------------
def _stage(info: dict):
    per_stage = info["plans"].get("plans_per_stage")
    if not per_stage:
        raise CheckpointError("v1 plans without 'plans_per_stage'")
    init = info.get("init")
    stage = init[5] if isinstance(init, (list, tuple)) and len(init) > 5 and init[5] in per_stage else None
    return per_stage[stage if stage is not None else max(per_stage)]


def v2_plans(info: dict, arch: dict, name: str) -> dict:
    from bench.architectures.stunet import stunet_architecture
    from bench.engine.network import tiny_plans

    v1, stage = info["plans"], _stage(info)
    channels = range(arch["input_channels"])
    schemes = v1.get("normalization_schemes") or {c: "CT" for c in channels}
    unknown = {c: s for c, s in schemes.items() if s not in NORMALISATION}
    if unknown:
        raise CheckpointError(f"v1 normalization scheme(s) {unknown} have no nnU-Net v2 equivalent here "
                              f"(known: {sorted(NORMALISATION)})")
    intensity = (v1.get("dataset_properties") or {}).get("intensityproperties") or {}
    pools = stunet_pools(stage.get("pool_op_kernel_sizes"), len(arch["features"]) - 1)
    spacing = [float(s) for s in stage["current_spacing"]]
    plans = tiny_plans(name, patch_size=[int(p) for p in stage["patch_size"]], spacing=spacing,
                       features=arch["features"], batch_size=int(stage.get("batch_size", 2)))
    plans.update(plans_name="nnUNetPlans", experiment_planner_used=f"bench.stunet (converted from nnU-Net v1 "
                 f"{info.get('name', 'STU-Net trainer')})",
                 transpose_forward=[int(v) for v in v1.get("transpose_forward", [0, 1, 2])],
                 transpose_backward=[int(v) for v in v1.get("transpose_backward", [0, 1, 2])],
                 original_median_spacing_after_transp=spacing,
                 foreground_intensity_properties_per_channel={
                     str(c): {k: float(intensity[c][v1k]) for k, v1k in INTENSITY.items()}
                     for c in channels if c in intensity})
    cfg = plans["configurations"][CONFIGURATION]
    mask = v1.get("use_mask_for_norm") or {}
    cfg.update(normalization_schemes=[NORMALISATION[schemes[c]] for c in channels],
               use_mask_for_norm=[bool(mask.get(c, False)) for c in channels],
               architecture=stunet_architecture(arch["features"], arch["blocks"], [[1, 1, 1]] + pools,
                                                arch["kernel_sizes"]))
    return plans


def v2_dataset_json(info: dict, arch: dict, labels: Optional[dict] = None) -> dict:
    """Channel names from the v1 plans' modalities; label names from ``labels`` (a v1 or v2 dataset.json's
    ``labels``), else ``class_<k>`` for the plans' classes."""
    v1 = info["plans"]
    modalities = v1.get("modalities") or (v1.get("dataset_properties") or {}).get("modalities") or {}
    channels = {str(c): str(modalities.get(c, f"channel_{c}")) for c in range(arch["input_channels"])}
    n = arch["num_classes"]
    if labels:  # v1: {"0": "background", ...}; v2: {"background": 0, ...}
        named = {str(v): int(k) for k, v in labels.items()} if all(str(k).isdigit() for k in labels) \
            else {str(k): int(v) for k, v in labels.items()}
        if sorted(named.values()) != list(range(n)):
            raise ValueError(f"labels {named} do not give the checkpoint's {n} classes 0..{n - 1} one name each")
    else:
        named = {"background": 0, **{f"class_{k}": k for k in range(1, n)}}
    return {"channel_names": channels, "labels": named, "numTraining": 0, "file_ending": ".nii.gz"}


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_stunet(model_path, out_dir, pkl_path=None, labels_json=None) -> Path:
    """Write the v2 model folder (plans.json, dataset.json, fold_0/checkpoint_final.pth, bench.json) of an
    STU-Net v1 checkpoint; the weights are checked to load strictly into the architecture first."""
    from bench.engine.network import build_network
    from bench.foundation import save_model_folder

    model_path = Path(model_path).expanduser().resolve()
    pkl_path = Path(pkl_path) if pkl_path else model_path.with_name(model_path.name + ".pkl")
    info = read_v1_pkl(pkl_path)
    v1_state = read_v1_state(model_path)
    arch = infer_architecture(v1_state, model_path)
    labels = json.loads(Path(labels_json).read_text())["labels"] if labels_json else None
    plans = v2_plans(info, arch, f"STUNet_{model_path.stem}")
    dataset_json = v2_dataset_json(info, arch, labels)
    state = to_v2_state(v1_state, model_path)
    network = build_network(plans, dataset_json, CONFIGURATION)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{model_path}: the tensors do not fit the STU-Net they describe: "
                              f"{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else e}") from None
    extra = {"converted_from": {"checkpoint": str(model_path), "sha256": _sha256(model_path), "pkl": str(pkl_path),
                                "format": "nnU-Net v1 (STU-Net)", "trainer": str(info.get("name", "?"))},
             "architecture": {k: arch[k] for k in ("features", "blocks", "kernel_sizes")},
             "parameters": sum(p.numel() for p in network.parameters())}
    # v1 trainers predict with mirroring on all three axes
    return save_model_folder(Path(out_dir), plans, dataset_json, CONFIGURATION, state, mirror_axes=(0, 1, 2),
                             extra=extra)


def converted_folder(model_path) -> Path:
    """The cached v2 folder of a v1 checkpoint under $BENCH_HOME/foundations/converted (converted once,
    keyed by the checkpoint's content)."""
    from bench.home import subdir
    model_path = Path(model_path).expanduser().resolve()
    folder = subdir("foundations", "converted") / f"{model_path.stem}-{_sha256(model_path)[:12]}"
    if not (folder / "bench.json").is_file():
        tmp = folder.with_name(folder.name + ".partial")
        convert_stunet(model_path, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder
