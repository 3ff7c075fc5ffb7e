"""``bench``: thin command line. Each sub-command is one module in ``bench/commands/``
exposing ``register(subparsers)``; it parses, calls the library and prints."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import bench.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench",
        description="Few-shot fine-tuning benchmark for 3D segmentation foundation models "
                    "(DGST, full fine-tuning, LoRA, adapters, ...) on nnU-Net. "
                    "State lives in $BENCH_HOME (default ~/.lnbench).",
        epilog="Start with:  bench run --method dgst --shots 3   then   bench methods",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(bench.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"bench.commands.{mod.name}").register(sub)
    _add_quiet(parser, default=False)
    return parser


def _add_quiet(parser: argparse.ArgumentParser, default) -> None:
    """``-q/--quiet`` before or after any (sub-)command name: ``bench -q run ...`` = ``bench run -q ...``."""
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bars or progress lines (results and messages are still printed)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_quiet(child, default=argparse.SUPPRESS)  # not given there: keep the outer value


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from bench.datasets.base import DatasetError
    from bench.protocols import ProtocolError
    from bench.registry import UnknownNameError
    from bench import progress
    try:
        with progress.settings(quiet=args.quiet):
            return int(args.func(args) or 0)
    except (UnknownNameError, DatasetError, ProtocolError, FileNotFoundError, ValueError, ConnectionError) as e:
        print(f"bench {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # nnU-Net uses spawn pools: keep the guard
    sys.exit(main())
