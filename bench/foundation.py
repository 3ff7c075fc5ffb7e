"""Foundation models: any nnU-Net trained-model folder, or the tiny phantom foundation built here.

A foundation folder is nnU-Net's trained-model layout: ``plans.json``,
``dataset.json`` and ``fold_<k>/checkpoint_final.pth`` (a folder holding the
checkpoint next to the json files also works). An nnU-Net v1 STU-Net checkpoint
(``<name>.model`` with its ``.model.pkl``) is converted to such a folder once
(``bench.stunet``, cached under ``$BENCH_HOME/foundations/converted``).

The phantom foundations ship with the package (``bench/pretrained/<recipe name>/``:
weights only, its recipe, the command that rebuilt it and its Dice on held-out
source cases), so no run pretrains on first use. ``bench foundation build
--rebuild`` rebuilds one from the same recipe and seed into
``$BENCH_HOME/foundations/``, which then takes precedence over the shipped copy.
Two recipes share the data and the pretraining budget and differ in the network
(``RECIPES``): ``phantom-v2`` (PlainConvUNet, the default) and
``phantom-stunet-v1`` (STU-Net's residual blocks). ``--foundation`` takes a recipe
name or a path; ``get_foundation`` / ``existing_foundation_dir`` resolve both.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from bench import progress
from bench.checkpoint import load_checkpoint, match_weights, strip_prefixes
from bench.home import subdir

CHECKPOINT = "checkpoint_final.pth"

# The recipe of the phantom foundation (plans included). Changing it changes the model: bump the name.
PHANTOM_RECIPE = {"name": "phantom-v2", "iterations": 800, "lr": 1e-2, "optimizer": "adamw",
                  "weight_decay": 3e-5, "seed": 0, "eval_every": 50,
                  "plans": {"patch_size": [20, 40, 40], "spacing": [3.0, 2.4, 2.4], "features": [4, 8, 16, 32],
                            "batch_size": 2}}
# The same data, budget, optimiser, patch, spacing, widths and normalisation with STU-Net's network (one
# residual block per stage): a second phantom foundation of another architecture, scored in its own tables.
PHANTOM_STUNET_RECIPE = {**{k: v for k, v in PHANTOM_RECIPE.items() if k != "name"}, "name": "phantom-stunet-v1",
                         "architecture": {"network": "stunet", "n_blocks_per_stage": [1, 1, 1, 1]}}
RECIPES = {r["name"]: r for r in (PHANTOM_RECIPE, PHANTOM_STUNET_RECIPE)}  # the names --foundation accepts
SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained"
SOURCE_VAL_CASES = 8  # the last source cases: held out from pretraining, scored after it
# Intensity statistics for CT normalisation, measured on the source phantom's body voxels
# (nnU-Net would use label voxels only, which for small nodes would clip away all anatomy).
PHANTOM_INTENSITY = {"max": 900.0, "mean": 40.0, "median": 45.0, "min": -1000.0,
                     "percentile_00_5": -150.0, "percentile_99_5": 350.0, "std": 90.0}


@dataclass
class Foundation:
    name: str
    folder: Path
    plans: dict
    dataset_json: dict
    configuration: str
    state_dict: Dict[str, torch.Tensor]
    mirror_axes: Optional[Tuple[int, ...]]
    load_notes: List[str] = field(default_factory=list)  # what loading changed (prefixes stripped)


def _find_checkpoint(path: Path) -> Path:
    """The checkpoint a foundation path names: the file itself, or the folder's (first fold's)."""
    if path.is_file():
        return path
    direct = path / CHECKPOINT
    if direct.is_file():
        return direct
    folds = sorted(path.glob(f"fold_*/{CHECKPOINT}"))
    if not folds:
        raise FileNotFoundError(f"{path}: no {CHECKPOINT} (expected nnU-Net's trained-model folder with "
                                f"plans.json, dataset.json and fold_0/{CHECKPOINT}, or a checkpoint file)")
    return folds[0]


def foundation_name(path: Path) -> str:
    """A folder's name; for a checkpoint file, the folder holding it (releases name the folder)."""
    return path.parent.name if path.is_file() else path.name


def foundation_folder(path) -> Path:
    """The model path a ``--foundation`` path names: the folder or checkpoint file itself, or for an nnU-Net
    v1 STU-Net checkpoint (``<name>.model`` next to ``<name>.model.pkl``) its converted v2 folder
    (``bench.stunet``)."""
    from bench.stunet import converted_folder, is_v1_checkpoint
    path = Path(path).expanduser().resolve()
    return converted_folder(path) if is_v1_checkpoint(path) else path


def load_foundation(folder) -> Foundation:
    """An nnU-Net trained-model folder (any trainer: the plans say the architecture), a v1 STU-Net checkpoint
    (converted once), or a self-supervised nnssl checkpoint file (``bench.foundation_nnssl``: encoder and
    stem only)."""
    folder = foundation_folder(folder)
    ckpt_path = _find_checkpoint(folder)
    ckpt = load_checkpoint(ckpt_path)
    from bench.foundation_nnssl import ADAPTATION_PLAN, nnssl_foundation
    if ADAPTATION_PLAN in ckpt:
        return nnssl_foundation(ckpt_path, ckpt, foundation_name(folder))
    for base in (ckpt_path.parent, ckpt_path.parent.parent):
        if (base / "plans.json").is_file() and (base / "dataset.json").is_file():
            break
    else:
        raise FileNotFoundError(f"{folder}: plans.json and dataset.json not found next to {ckpt_path}")
    if "network_weights" not in ckpt:
        raise ValueError(f"{ckpt_path}: not an nnU-Net checkpoint (no 'network_weights')")
    plans = json.loads((base / "plans.json").read_text())
    configuration = ckpt.get("init_args", {}).get("configuration") or next(iter(plans["configurations"]))
    state, notes = strip_prefixes(ckpt["network_weights"])
    mirror = ckpt.get("inference_allowed_mirroring_axes")
    return Foundation(name=foundation_name(folder), folder=folder, plans=plans,
                      dataset_json=json.loads((base / "dataset.json").read_text()),
                      configuration=configuration, state_dict=state,
                      mirror_axes=tuple(mirror) if mirror is not None else None,
                      load_notes=[f"{ckpt_path}: {n}" for n in notes])


def target_load_report(foundation: Foundation, dataset_json: dict) -> Dict[str, List[str]]:
    """What fine-tuning on a dataset with ``dataset_json`` will load from the foundation and re-initialise,
    matched on the network its (transferred) plans build for that dataset: the check training makes, made
    before any preprocessing. Raises ``CheckpointError`` (other input channels, other architecture)."""
    from bench.engine.network import build_network
    net = build_network(foundation.plans, dataset_json, foundation.configuration)
    loaded, reinit = match_weights({k: tuple(v.shape) for k, v in net.state_dict().items()}, foundation.state_dict)
    return {"loaded": loaded, "reinitialised": reinit}


def save_model_folder(folder: Path, plans: dict, dataset_json: dict, configuration: str,
                      state_dict: Dict[str, torch.Tensor], mirror_axes=None, extra: Optional[dict] = None) -> Path:
    """Write nnU-Net's trained-model layout, loadable by ``nnUNetPredictor.initialize_from_trained_model_folder``
    and by ``nnUNetv2_predict``. The checkpoint holds only plain types (weights_only-loadable)."""
    folder = Path(folder)
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    ckpt = {"network_weights": {k: v.detach().cpu() for k, v in state_dict.items()},
            "init_args": {"configuration": configuration, "fold": 0},
            "trainer_name": "nnUNetTrainer", "current_epoch": 0,
            "inference_allowed_mirroring_axes": list(mirror_axes) if mirror_axes is not None else None}
    torch.save(ckpt, folder / "fold_0" / CHECKPOINT)
    if extra:
        (folder / "bench.json").write_text(json.dumps(extra, indent=1))
    return folder


def phantom_foundation_dir(recipe: dict = PHANTOM_RECIPE) -> Path:
    return subdir("foundations") / recipe["name"]


def shipped_foundation_dir(recipe: dict = PHANTOM_RECIPE) -> Optional[Path]:
    """The committed copy of this recipe's foundation, if the package holds one built from exactly it."""
    folder = SHIPPED_DIR / recipe["name"]
    info = folder / "bench.json"
    if info.is_file() and json.loads(info.read_text()).get("recipe") == recipe:
        return folder
    return None


def existing_phantom_foundation_dir(recipe: dict = PHANTOM_RECIPE) -> Optional[Path]:
    """The folder ``get_phantom_foundation`` loads without building: a rebuilt copy in $BENCH_HOME, else the
    shipped one; None when neither exists (the first run builds it)."""
    cached = phantom_foundation_dir(recipe)
    return cached if (cached / "bench.json").is_file() else shipped_foundation_dir(recipe)


def get_phantom_foundation(log=print, recipe: dict = PHANTOM_RECIPE, device: str = "auto",
                           rebuild: bool = False, command: Optional[str] = None) -> Foundation:
    """A rebuilt copy in $BENCH_HOME first, else the shipped one, else build it now (and cache it)."""
    folder = phantom_foundation_dir(recipe)
    if rebuild and folder.exists():
        shutil.rmtree(folder)
    existing = None if rebuild else existing_phantom_foundation_dir(recipe)
    if existing is None:
        existing = build_phantom_foundation(folder, recipe, log=log, device=device, command=command)
    return load_foundation(existing)


def phantom_recipe(name: Optional[str] = None, iterations: Optional[int] = None) -> dict:
    """The suite recipe called ``name`` (default: the default phantom foundation's); ``iterations`` overrides
    its budget under another name (``<name>-it<N>``, for quick checks), so it never stands for the shipped one."""
    name = name or PHANTOM_RECIPE["name"]
    if name not in RECIPES:
        raise ValueError(f"unknown foundation recipe {name!r}; the suite's recipes are {', '.join(RECIPES)} "
                         "(any other foundation is passed as a path: an nnU-Net model folder or checkpoint)")
    recipe = dict(RECIPES[name])
    if iterations:
        recipe.update(iterations=int(iterations), name=f"{name}-it{int(iterations)}")
    return recipe


def rebuild_command(recipe_name: str, iterations: Optional[int] = None, into: Optional[str] = None) -> str:
    """The ``bench foundation build`` command that rebuilds a recipe's shipped folder (recorded in bench.json)."""
    options = ("" if recipe_name == PHANTOM_RECIPE["name"] else f" --recipe {recipe_name}") \
        + (f" --iterations {iterations}" if iterations else "")
    return f"bench foundation build{options} --rebuild --into bench/pretrained/{into or recipe_name}"


def foundation_recipe(foundation: Optional[str]) -> Optional[dict]:
    """The suite recipe a ``--foundation`` value names: None is the default phantom foundation, a recipe name
    (``phantom-stunet-v1``) that recipe; None for anything else (a path: ``./phantom-stunet-v1`` for a folder
    that happens to carry a recipe's name)."""
    if foundation is None:
        return PHANTOM_RECIPE
    return RECIPES.get(str(foundation))


def existing_foundation_dir(foundation: Optional[str]) -> Optional[Path]:
    """The folder a ``--foundation`` value loads from: a suite recipe's rebuilt or shipped copy (None while
    neither exists), else the path itself (``foundation_folder``)."""
    recipe = foundation_recipe(foundation)
    return existing_phantom_foundation_dir(recipe) if recipe is not None else foundation_folder(foundation)


def get_foundation(foundation: Optional[str], log=print, device: str = "auto") -> Foundation:
    """The foundation a ``--foundation`` value names, a suite recipe built on first use if neither a rebuilt
    nor a shipped copy exists."""
    recipe = foundation_recipe(foundation)
    if recipe is None:
        return load_foundation(foundation)
    return get_phantom_foundation(log=log, recipe=recipe, device=device)


def phantom_plans(recipe: dict, dataset_name: str) -> dict:
    """The recipe's hand-written plans: nnU-Net's PlainConvUNet, or with ``architecture`` another network at
    the same widths, kernels and strides (``stunet``: STU-Net with ``n_blocks_per_stage`` residual blocks)."""
    from bench.engine.network import tiny_plans
    plans = tiny_plans(dataset_name, intensity=PHANTOM_INTENSITY, **recipe.get("plans", PHANTOM_RECIPE["plans"]))
    arch = recipe.get("architecture")
    if arch is not None:
        config = plans["configurations"]["3d_fullres"]
        config["architecture"] = _architecture(arch, config["architecture"]["arch_kwargs"], recipe["name"])
    return plans


def _architecture(arch: dict, plain: dict, recipe_name: str) -> dict:
    from bench.architectures.stunet import stunet_architecture
    if arch.get("network") != "stunet":
        raise ValueError(f"recipe {recipe_name}: architecture network {arch.get('network')!r} is not known; "
                         "'stunet' is (or no architecture key: nnU-Net's PlainConvUNet)")
    blocks = arch.get("n_blocks_per_stage") or [1] * plain["n_stages"]
    if len(blocks) != plain["n_stages"]:
        raise ValueError(f"recipe {recipe_name}: n_blocks_per_stage {blocks} has {len(blocks)} entries, the plans "
                         f"{plain['n_stages']} stages (features {plain['features_per_stage']})")
    return stunet_architecture(plain["features_per_stage"], blocks, plain["strides"], plain["kernel_sizes"])


def pretraining_config(recipe: dict):
    """The foundation recipe's training part (its other keys name the foundation and its plans)."""
    from bench.engine.recipe import HARNESS_DEFAULTS, Recipe
    from bench.engine.train import TrainConfig
    return TrainConfig(Recipe(recipe.get("optimizer", HARNESS_DEFAULTS["optimizer"]), float(recipe["lr"]),
                              float(recipe.get("weight_decay", HARNESS_DEFAULTS["weight_decay"]))),
                       iterations=int(recipe["iterations"]), eval_every=int(recipe.get("eval_every", 10)),
                       batch_size=recipe.get("batch_size"))


def build_phantom_foundation(folder: Path, recipe: dict = PHANTOM_RECIPE, log=print, device: str = "auto",
                             command: Optional[str] = None) -> Path:
    """Pretrain the tiny foundation on the phantom source domain from a seeded random init, then score
    it on the held-out source cases (recorded in bench.json, checked against the shipped copy by tests).
    ``command``: the one recorded as rebuilding it (default: ``rebuild_command`` of the recipe's name)."""
    from bench.datasets.phantom import PhantomSource
    from bench.methods import get_method
    from bench.engine.train import train_network

    log(f"building foundation {recipe['name']} ({recipe['iterations']} iterations on phantom-source); "
        "cached afterwards")
    source = PhantomSource()
    source.prepare()
    plans = phantom_plans(recipe, source.folder_name)
    dataset_json = json.loads((source.raw_dir() / "dataset.json").read_text())
    ids = source.case_ids()
    train_ids, val_ids = ids[:-SOURCE_VAL_CASES], ids[-SOURCE_VAL_CASES:]
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    outcome = train_network(dataset=source, plans=plans, dataset_json=dataset_json, configuration="3d_fullres",
                            method=get_method("full"), init_state=None,
                            train_ids=train_ids, val_ids=val_ids, out_dir=tmp / "training",
                            config=pretraining_config(recipe), seed=recipe.get("seed", 0), device=device, log=log,
                            label=f"pretraining {recipe['name']}")
    save_model_folder(tmp, plans, dataset_json, "3d_fullres", outcome.export_state, mirror_axes=None)
    info = {"recipe": recipe, "command": command or rebuild_command(recipe["name"]),
            "pretrain_ids": train_ids, "val_ids": val_ids, "train_seconds": round(outcome.train_seconds, 1),
            "source_dice": source_dice(tmp, source, val_ids, device)}
    (tmp / "bench.json").write_text(json.dumps(info, indent=1))  # written last: marks a complete folder
    shutil.rmtree(tmp / "training", ignore_errors=True)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    log(f"foundation saved to {folder}")
    return folder


def source_dice(folder: Path, source, case_ids, device: str = "auto") -> Dict[str, float]:
    """Dice per held-out source case of the model in ``folder`` (predicted with nnU-Net's predictor)."""
    import SimpleITK as sitk
    from bench.engine.predict import make_predictor, predict_case
    from bench.metrics import case_metrics
    from bench.engine.train import resolve_device

    f = load_foundation(folder)
    predictor = make_predictor(f.plans, f.dataset_json, f.configuration, f.state_dict, resolve_device(device))
    out = {}
    for cid in progress.track(case_ids, "scoring on source cases"):
        seg, spacing = predict_case(predictor, source.image_files(cid))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(source.label_file(cid)))
        out[cid] = round(float(case_metrics(seg > 0, ref > 0, spacing)["dice"]), 6)
    return out
