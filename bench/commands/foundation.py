"""``bench foundation build|show``: the cached phantom foundation model."""
from __future__ import annotations

from bench.options import positive_int


def register(sub) -> None:
    p = sub.add_parser("foundation", help="build or inspect the phantom foundation model")
    s = p.add_subparsers(dest="action", required=True)
    b = s.add_parser("build", help="pretrain the tiny foundation on phantom-source (same recipe, same seed)")
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
    sh.add_argument("path", nargs="?", default=None, help="nnU-Net model folder (default: phantom foundation)")
    sh.add_argument("--target", default="phantom", metavar="DATASET",
                    help="dataset whose labels and channels the load check uses (default: phantom)")
    sh.set_defaults(func=show)


def build(args) -> int:
    from pathlib import Path

    from bench.foundation import PHANTOM_RECIPE, build_phantom_foundation, get_phantom_foundation, load_foundation
    recipe = dict(PHANTOM_RECIPE)
    if args.iterations:
        recipe.update(iterations=args.iterations, name=f"{recipe['name']}-it{args.iterations}")
    if args.into:
        f = load_foundation(build_phantom_foundation(Path(args.into), recipe, device=args.device))
    else:
        f = get_phantom_foundation(recipe=recipe, rebuild=args.rebuild, device=args.device)
    print(f"foundation {f.name}: {f.folder}")
    return 0


def show(args) -> int:
    from bench.datasets import get_dataset
    from bench.foundation import get_phantom_foundation, load_foundation
    from bench.foundation_info import describe
    f = load_foundation(args.path) if args.path else get_phantom_foundation()
    target = get_dataset(args.target)
    print(describe(f, target.name, target.dataset_json(0)))
    return 0
