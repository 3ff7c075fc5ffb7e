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
    sh = s.add_parser("show", help="print a foundation's plans summary and parameter count")
    sh.add_argument("path", nargs="?", default=None, help="nnU-Net model folder (default: phantom foundation)")
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
    from bench.foundation import get_phantom_foundation, load_foundation
    f = load_foundation(args.path) if args.path else get_phantom_foundation()
    cfg = f.plans["configurations"][f.configuration]
    n = sum(v.numel() for v in f.state_dict.values() if v.is_floating_point())
    print(f"{f.name} ({f.folder})\n  configuration {f.configuration}: patch {cfg['patch_size']}, spacing "
          f"{cfg['spacing']}\n  architecture {cfg['architecture']['network_class_name']}\n  labels "
          f"{f.dataset_json['labels']}\n  {n:,} parameters (state dict)")
    return 0
