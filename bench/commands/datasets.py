"""``bench datasets list`` and ``bench datasets prepare NAME [--source DIR] [options]``."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

# Dataset options offered as flags; each dataset accepts only its own (others are refused by name).
FLAGS = {
    "contrast_channel": "segrap2023: add image_contrast.nii.gz as a second input channel",
    "include_partial_train": "lnq2023: also convert the partially annotated train cases "
                             "(never test, support or tuning cases)",
}


def register(subparsers) -> None:
    p = subparsers.add_parser("datasets", help="list datasets; convert a local release to nnU-Net format",
                              description="Datasets live in $BENCH_HOME/nnunet/raw. Real data is never "
                                          "downloaded: point --source at your local copy of the release.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="registered datasets, whether prepared, case counts")
    ls.set_defaults(func=list_datasets)
    pr = sub.add_parser("prepare", help="check and convert a dataset (idempotent: unchanged input is skipped)")
    pr.add_argument("name", help="dataset name, see `bench datasets list`")
    pr.add_argument("--source", type=Path, help="folder holding the release (not for phantom, which is generated)")
    for option, text in FLAGS.items():
        pr.add_argument("--" + option.replace("_", "-"), dest=option, action="store_true", help=text)
    pr.add_argument("--labels", metavar="NAMES", help="segrap2023-oars: the structures to label, comma-separated, "
                                                      "in label-value order (default: GTVnd, parotid and "
                                                      "submandibular glands)")
    pr.set_defaults(func=prepare)


def list_datasets(args: argparse.Namespace) -> int:
    from bench.datasets import DATASETS, get_dataset
    for name in DATASETS.names():
        ds = get_dataset(name)
        state = f"prepared, {len(ds.case_ids())} cases" if ds.is_prepared() else "not prepared"
        print(f"{name:<16} {state:<22} {ds.description}")
    return 0


def prepare(args: argparse.Namespace) -> int:
    from bench.datasets import DatasetError, get_dataset
    ds = get_dataset(args.name)
    options = {k: True for k in FLAGS if getattr(args, k)}
    if args.labels is not None:
        options["labels"] = args.labels
    if not ds.needs_source and (args.source is not None or options):
        given = (["--source"] if args.source is not None else []) + ["--" + k.replace("_", "-") for k in options]
        raise DatasetError(f"{ds.name} is generated, it takes no {', '.join(given)}")
    _show_progress()
    path = ds.prepare(args.source, **options) if ds.needs_source else ds.prepare()
    print(f"{ds.name}: {len(ds.case_ids())} cases in {path}")
    return 0


def _show_progress() -> None:
    """The converters log what they did (e.g. 'nothing changed'); show it on the terminal."""
    logger = logging.getLogger("bench.datasets")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
