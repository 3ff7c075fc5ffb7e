"""Plan transfer: preprocess a target dataset with the foundation model's plans.

Preprocessed cases are cached per (dataset, plans) under
``$BENCH_HOME/nnunet/preprocessed/<DatasetNNN_Name>/<plans-hash>/`` so every run
with the same foundation reuses them. Each case is written to a temporary
folder and moved into place only when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from bench import progress
from bench.home import subdir
from bench.quiet import quiet


def plans_hash(plans: dict, configuration: str) -> str:
    blob = json.dumps({"c": configuration, "cfg": plans["configurations"][configuration],
                       "int": plans.get("foreground_intensity_properties_per_channel"),
                       "t": plans.get("transpose_forward")}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def transfer_plans(foundation_plans: dict, target_folder_name: str) -> dict:
    plans = json.loads(json.dumps(foundation_plans))
    plans["dataset_name"] = target_folder_name
    return plans


def preprocess(dataset, plans: dict, dataset_json: dict, configuration: str,
               case_ids: Iterable[str], log=print) -> Path:
    """Returns the preprocessed base folder (nnU-Net's ``preprocessed_dataset_folder_base``)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    base = subdir("nnunet", "preprocessed", dataset.folder_name, plans_hash(plans, configuration))
    folder = base / cm.data_identifier
    folder.mkdir(parents=True, exist_ok=True)
    (base / "plans.json").write_text(json.dumps(plans, indent=1))
    (base / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    fp = base / "dataset_fingerprint.json"
    if not fp.exists():  # nnU-Net's trainer copies it; with plan transfer there is no own fingerprint
        fp.write_text(json.dumps({"note": "plans transferred from the foundation model; no fingerprint"}))
    todo = [c for c in case_ids if not (folder / f"{c}.pkl").is_file()]
    if todo:
        log(f"preprocessing {len(todo)} case(s) of {dataset.name} with the foundation's plans -> {folder}")
    pre = DefaultPreprocessor(verbose=False)
    for cid in progress.track(todo, "preprocessing"):
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            with quiet():
                pre.run_case_save(os.path.join(tmp, cid), dataset.image_files(cid), dataset.label_file(cid),
                                  pm, cm, dataset_json)
            # the .pkl is moved last: its presence marks a complete case
            files = sorted(Path(tmp).iterdir(), key=lambda p: p.suffix == ".pkl")
            for f in files:
                shutil.move(str(f), folder / f.name)
    return base
