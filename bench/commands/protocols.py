"""``bench protocols show DATASET`` and ``bench protocols check DATASET``."""
from __future__ import annotations

import argparse
import textwrap
from typing import List


def register(subparsers) -> None:
    p = subparsers.add_parser("protocols", help="show the committed few-shot splits; check a prepared dataset",
                              description="Protocols are committed files bench/protocols/<dataset>/<version>.json: "
                                          "a fixed test set and, per shots and repeat, support and tuning ids.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print test set and, per shots/repeat, support and tuning ids")
    check = sub.add_parser("check", help="verify the prepared dataset has every case, with non-empty labels")
    for sp, func in ((show, show_protocol), (check, check_protocol)):
        sp.add_argument("dataset")
        sp.add_argument("--version", default=None, help="protocol version, e.g. v1 (default: the latest)")
        sp.set_defaults(func=func)


def _ids(label: str, ids: List[str], indent: str = "") -> str:
    return textwrap.fill(" ".join(ids), width=100, initial_indent=f"{indent}{label} ({len(ids)}): ",
                         subsequent_indent=indent + "    ")


def show_protocol(args: argparse.Namespace) -> int:
    from bench.protocols import Protocol
    p = Protocol.load(args.dataset, args.version)
    print(f"{p.dataset} protocol {p.version}  ({p.path})")
    print(textwrap.fill(f"notes: {p.data['notes']}", width=100, subsequent_indent="    "))
    print(f"procedure: {p.data['procedure']} (seed {p.data['seed']})")
    if p.extends:
        shared = p.parent.n_repeats
        print(f"extends {p.extends}: repeats 0-{shared - 1} are {p.extends}'s, with its seeds (their {p.extends} runs "
              f"are reused); repeats {shared}-{p.n_repeats - 1} are new")
    print(_ids("test", p.test))
    print(_ids("pool", p.pool))
    for k in p.shots:
        print(f"{k}-shot:")
        for r in range(p.n_repeats):
            s = p.split(k, r)
            print(f"  repeat {r}:")
            print(_ids("support", s.support, "    "))
            print(_ids("tune", s.tune, "    "))
    return 0


def check_protocol(args: argparse.Namespace) -> int:
    from bench.datasets.validation import check_prepared
    p = check_prepared(args.dataset, args.version)
    print(f"{p.dataset}: prepared data matches protocol {p.version} ({len(p.test)} test, {len(p.pool)} pool cases)")
    return 0
