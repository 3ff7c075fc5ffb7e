"""``bench foundation build|show|convert-stunet``: the phantom foundation model, any foundation's summary, and
STU-Net's released nnU-Net v1 checkpoints converted to v2 model folders."""
from __future__ import annotations

from bench.options import positive_int


def register(sub) -> None:
    p = sub.add_parser("foundation", help="build or inspect the phantom foundation models")
    s = p.add_subparsers(dest="action", required=True)
    b = s.add_parser("build", help="pretrain a tiny foundation on phantom-source (same recipe, same seed)")
    b.add_argument("--recipe", default=None, metavar="NAME",
                   help="the suite's recipe: phantom-v2 (PlainConvUNet, the default) or phantom-stunet-v1 (STU-Net)")
    b.add_argument("--rebuild", action="store_true", help="discard the cached model first")
    b.add_argument("--iterations", type=positive_int, default=None, help="override the recipe (for quick checks)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--into", default=None, metavar="DIR",
                   help="write the model folder to DIR instead of the cache (the shipped copy is rebuilt with "
                        "`bench foundation build --rebuild --into bench/pretrained/<recipe name>`)")
    b.set_defaults(func=build)
    sh = s.add_parser("show", help="what a foundation folder is and what fine-tuning on a dataset would load",
                      description="Architecture, parameter count, labels, spacing, normalisation per channel, "
                                  "and which tensors fine-tuning on --target loads or re-initialises.")
    sh.add_argument("path", nargs="?", default=None,
                    help="a suite recipe's name (phantom-stunet-v1), an nnU-Net model folder, or an STU-Net v1 "
                         ".model file (default: the phantom foundation, followed by the list of suite recipes)")
    sh.add_argument("--target", default="phantom", metavar="DATASET",
                    help="dataset whose labels and channels the load check uses (default: phantom)")
    sh.set_defaults(func=show)
    cv = s.add_parser("convert-stunet", help="convert an STU-Net nnU-Net v1 checkpoint to an nnU-Net v2 model folder",
                      description="Reads <name>.model (weights only, numpy values allowed) and <name>.model.pkl "
                                  "(plans; no code is unpickled), writes plans.json (architecture "
                                  "bench.architectures.stunet.STUNet), dataset.json and fold_0/checkpoint_final.pth. "
                                  "`--foundation <name>.model` converts on first use instead (cached).")
    cv.add_argument("model", help="STU-Net checkpoint, e.g. small_ep4k.model")
    cv.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    cv.add_argument("--pkl", default=None, help="its .model.pkl (default: next to the .model file)")
    cv.add_argument("--labels", default=None, metavar="DATASET_JSON",
                    help="a v1 or v2 dataset.json whose labels name the classes (default: class_<k>)")
    cv.set_defaults(func=convert)


def build(args) -> int:
    from pathlib import Path

    from bench.foundation import (PHANTOM_RECIPE, build_phantom_foundation, get_phantom_foundation, load_foundation,
                                  phantom_recipe, rebuild_command)
    recipe = phantom_recipe(args.recipe, args.iterations)
    command = rebuild_command(args.recipe or PHANTOM_RECIPE["name"], args.iterations, recipe["name"])
    if args.into:
        f = load_foundation(build_phantom_foundation(Path(args.into), recipe, device=args.device, command=command))
    else:
        f = get_phantom_foundation(recipe=recipe, rebuild=args.rebuild, device=args.device, command=command)
    print(f"foundation {f.name}: {f.folder}")
    return 0


def show(args) -> int:
    from bench.datasets import get_dataset
    from bench.foundation import get_foundation
    from bench.foundation_info import describe, suite_foundations
    f = get_foundation(args.path)
    target = get_dataset(args.target)
    print(describe(f, target.name, target.dataset_json(0)))
    if args.path is None:
        print(suite_foundations())
    return 0


def convert(args) -> int:
    from bench.foundation import load_foundation
    from bench.stunet import convert_stunet
    folder = convert_stunet(args.model, args.out, pkl_path=args.pkl, labels_json=args.labels)
    f = load_foundation(folder)
    kw = f.plans["configurations"][f.configuration]["architecture"]["arch_kwargs"]
    print(f"converted {args.model} -> {folder}: STU-Net, features {kw['features_per_stage']}, "
          f"blocks {kw['n_blocks_per_stage']}, {len(f.dataset_json['labels'])} labels")
    return 0
