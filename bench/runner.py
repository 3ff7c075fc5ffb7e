"""Run one cell: (method, dataset, shots, repeat) -> fine-tune, predict, score, record.

The pipeline is the same for every method: prepare data, load the foundation,
transfer its plans, train (``bench.engine.train``: preprocessing, the one
``BenchTrainer``, the stock nnU-Net export), predict the evaluation cases
with nnU-Net's predictor, compute per-case metrics, write ``result.json``
(last, atomically: a killed run leaves no result) and log to MLflow.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

import bench
from bench import progress
from bench.engine.recipe import OPTIMIZERS, Recipe, resolve_recipe
from bench.engine.train import TrainConfig, resolve_device, train_network
from bench.home import bench_home, configure_nnunet_env
from bench.provenance import checkpoint_sha256, derive_seed, device_name, git_commit, versions

RESULT_SCHEMA_VERSION = 2  # 2: provenance block, resolved recipe and seed, foundation hash in the run id
# 3: several labels: ``labels`` and one ``cases`` row per (case, label) (bench.metrics.score_labels);
# single-label results keep schema 2
MULTI_LABEL_SCHEMA_VERSION = 3


@dataclass
class RunSpec:
    method: str
    dataset: str = "phantom"
    shots: int = 3
    repeat: int = 0
    seed: Optional[int] = None           # None: derived from the protocol and the repeat (provenance.derive_seed)
    iterations: Optional[int] = None     # forward/backward passes, a method's calibration passes included;
                                         # None: the dataset's budget for the cases trained on (Dataset.budget)
    lr: Optional[float] = None           # None (lr, optimizer, weight_decay): the method's recipe, else the
    optimizer: Optional[str] = None      # harness default (bench.engine.recipe)
    weight_decay: Optional[float] = None
    eval_every: Optional[int] = None     # None: the dataset's (Dataset.default_eval_every)
    batch_size: Optional[int] = None     # None: the plans' batch size
    hparams: Dict[str, Any] = field(default_factory=dict)
    foundation: Optional[str] = None     # None: the phantom foundation; a suite recipe's name or a path
    protocol_version: Optional[str] = None
    device: str = "auto"
    evaluate_on: str = "test"            # "tune" for hyper-parameter search: test cases never touched
    params_source: str = "default"       # "default" or the Optuna study that produced hparams
    augment: Optional[str] = None        # a training-data augmentation (bench.augment), e.g. "synth-nodes"

    def __post_init__(self):
        if self.iterations is None or self.eval_every is None:
            from bench.datasets import DATASETS
            ds = DATASETS.get(self.dataset)
            self.iterations = ds.budget(self.training_cases()) if self.iterations is None else self.iterations
            self.eval_every = ds.default_eval_every if self.eval_every is None else self.eval_every

    def training_cases(self) -> int:
        """How many labelled cases the run trains on: the support set's size, the whole pool for the
        oracle, none for a method that does not train. A protocol that cannot be read yet (or lacks this
        split) counts the shots; the run itself reports the bad split."""
        from bench.methods import METHODS
        from bench.protocols import Protocol, ProtocolError
        method = METHODS.get(self.method)
        if not method.trains:
            return 0
        try:
            protocol = Protocol.load(self.dataset, self.protocol_version)
            split = protocol.split(self.shots, self.repeat)
        except (ProtocolError, OSError, ValueError, KeyError):
            return self.shots
        return len(method.training_ids(split.support, protocol.pool))

    def recipe(self) -> Recipe:
        from bench.methods import METHODS
        explicit = {"optimizer": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay}
        return resolve_recipe(explicit, METHODS.get(self.method).spec_overrides, self.method)

    def resolved_protocol_version(self) -> str:
        from bench.protocols import Protocol
        return self.protocol_version or Protocol.load(self.dataset, None).version

    def resolved_seed(self) -> Tuple[int, str]:
        """(seed, where it came from)."""
        if self.seed is not None:
            return int(self.seed), "user"
        from bench.protocols import Protocol
        # a repeat shared with the version this one extends keeps that version's seed (Protocol.seed_version)
        version = Protocol.load(self.dataset, self.protocol_version).seed_version(self.repeat)
        return derive_seed(self.dataset, version, self.repeat), \
            f"derived: sha256('{self.dataset}/{version}/repeat{self.repeat}')[:4]"

    def identity(self) -> dict:
        """What makes two runs the same cell: the spec with every default resolved (recipe, seed,
        protocol version) and the foundation by its checkpoint's content, not by path or name."""
        fid = foundation_identity(self.foundation)
        if fid is None:
            from bench.foundation import foundation_recipe
            name = foundation_recipe(self.foundation)["name"]
            raise FoundationNotBuilt(f"the phantom foundation {name} is not built yet "
                                     f"(`bench foundation build --recipe {name}`, or any run builds it)")
        key = {k: v for k, v in asdict(self).items() if k not in ("device", "foundation")}
        if self.augment is None:  # only when set: runs made before the field existed keep their ids
            del key["augment"]
        key.update({k: v for k, v in asdict(self.recipe()).items() if k != "source"})
        key.update(seed=self.resolved_seed()[0], protocol_version=self.resolved_protocol_version(),
                   foundation_sha256=fid["sha256"], code_version=bench.__version__)
        from bench.datasets import get_dataset
        labels = get_dataset(self.dataset).labels
        if len(labels) > 2:   # a label set chosen at preparation (segrap2023-oars --labels) is part of the cell
            key["labels"] = labels
        return key

    def row_label(self) -> str:
        """The cell's row in tables: the method, or ``<method>+<augmentation label>`` (``dgst+synth``)."""
        from bench.augment import row_label
        return row_label(self.method, self.augment)

    def run_id(self) -> str:
        return hashlib.sha1(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:12]


class FoundationNotBuilt(RuntimeError):
    pass


def foundation_identity(foundation: Optional[str]) -> Optional[dict]:
    """Name, checkpoint path and sha256 of a spec's foundation; None while a phantom foundation (the default,
    or a suite recipe named by ``foundation``) is not built yet (then no run with it can have finished either)."""
    from bench.foundation import _find_checkpoint, existing_foundation_dir, foundation_name
    # a recipe: its rebuilt copy in $BENCH_HOME, else the shipped one; a v1 STU-Net checkpoint: its converted folder
    folder = existing_foundation_dir(foundation)
    if folder is None:
        return None
    ckpt = _find_checkpoint(folder)
    return {"name": foundation_name(folder), "sha256": checkpoint_sha256(ckpt), "checkpoint": str(ckpt)}


def run_path(spec: RunSpec) -> Path:
    """Where the cell's run lives (not created: for looking up)."""
    return bench_home() / "runs" / spec.dataset / spec.row_label() / f"shots{spec.shots}" / f"repeat{spec.repeat}" \
        / spec.run_id()


def run_dir(spec: RunSpec) -> Path:
    """The cell's run folder, created."""
    path = run_path(spec)
    path.mkdir(parents=True, exist_ok=True)
    return path


def augmentation_for(spec: RunSpec, method):
    """The spec's augmentation (None without one); refused for a method that does not train."""
    if spec.augment is None:
        return None
    from bench.augment import get_augmentation
    augmentation = get_augmentation(spec.augment)
    if not method.trains:
        raise ValueError(f"{spec.method} does not train, so --augment {spec.augment} has nothing to act on; "
                         "run it without --augment")
    return augmentation


def run(spec: RunSpec, log: Callable = print, tracking_uri: Optional[str] = None,
        epoch_callback=None, parent_run_id: Optional[str] = None) -> dict:
    from bench.datasets import get_dataset
    from bench.engine.predict import make_predictor, predict_case
    from bench.engine.preprocess import transfer_plans
    from bench.foundation import get_foundation, save_model_folder, target_load_report
    from bench.methods import get_method
    from bench.metrics import METRICS_VERSION, foreground_labels, run_summary, score_labels
    from bench.protocols import Protocol
    import SimpleITK as sitk

    configure_nnunet_env()
    method = get_method(spec.method, **spec.hparams)
    augmentation = augmentation_for(spec, method)
    recipe = spec.recipe()
    dataset = get_dataset(spec.dataset).ensure_prepared()
    protocol = Protocol.load(spec.dataset, spec.protocol_version)
    protocol.check(dataset.case_ids())
    split = protocol.split(spec.shots, spec.repeat)
    eval_ids = split.tune if spec.evaluate_on == "tune" else split.test
    if spec.evaluate_on == "tune":
        assert not set(eval_ids) & set(split.test), "tuning must never evaluate on test cases"

    dev = resolve_device(spec.device)
    foundation = get_foundation(spec.foundation, log=log, device=spec.device)
    fid = foundation_identity(spec.foundation)
    seed, seed_source = spec.resolved_seed()
    plans = transfer_plans(foundation.plans, dataset.folder_name)
    dataset_json = json.loads((dataset.raw_dir() / "dataset.json").read_text())
    run_id = spec.run_id()
    out = run_dir(spec)
    log(f"{spec.method}: {spec.dataset} {spec.shots}-shot repeat {spec.repeat} (protocol {protocol.version}); "
        f"support {', '.join(split.support)}; device {dev.type}")
    log(f"  foundation {fid['name']} (sha256 {fid['sha256'][:12]}); seed {seed} ({seed_source})")
    for note in foundation.load_notes:
        log(f"  foundation load: {note}")
    log(f"  recipe: {spec.iterations} iterations, {recipe.describe()}")
    log(f"  hyper-parameters: {spec.params_source}" + (f" ({method.describe()})" if method.hp else ""))
    if augmentation is not None:
        log(f"  augmentation: {augmentation.name} ({augmentation.summary}); row {spec.row_label()}")
    init_state = foundation.state_dict if method.uses_foundation else None
    if init_state is not None:
        target_load_report(foundation, dataset_json)  # refuse a mismatching checkpoint before preprocessing
    train_ids = method.training_ids(split.support, protocol.pool)
    if set(train_ids) & set(eval_ids):
        raise ValueError(f"{spec.method} trains on {spec.evaluate_on} cases; it cannot be evaluated on them")
    earlier = finished_ancestor(spec, protocol) or (None if method.depends_on_shots
                                                    else finished_twin(spec, protocol))
    if earlier is not None:
        return reuse_run(spec, *earlier, split, protocol.version, out, log, tracking_uri, parent_run_id)
    if method.trains:
        outcome = train_network(dataset=dataset, plans=plans, dataset_json=dataset_json,
                                configuration=foundation.configuration, method=method,
                                init_state=init_state, train_ids=train_ids,
                                val_ids=method.validation_ids(split.tune, split.support, protocol.pool),
                                out_dir=out / "training",
                                config=TrainConfig(recipe, spec.iterations, spec.eval_every, spec.batch_size),
                                device=dev, seed=seed, log=log, epoch_callback=epoch_callback,
                                augmentation=augmentation)
    else:
        from bench.methods.reference import foundation_as_is
        outcome = foundation_as_is(foundation, plans, dataset_json)
    export_plans = plans
    if outcome.arch_override:
        export_plans = json.loads(json.dumps(plans))
        export_plans["configurations"][foundation.configuration]["architecture"].update(outcome.arch_override)
    model_dir = save_model_folder(out / "model", export_plans, dataset_json, foundation.configuration,
                                  outcome.export_state, foundation.mirror_axes)

    predictor = make_predictor(export_plans, dataset_json, foundation.configuration, outcome.export_state, dev)
    cases = []
    labels = foreground_labels(dataset_json)
    log(f"predicting {len(eval_ids)} {spec.evaluate_on} case(s) with nnU-Net's predictor")
    for cid in progress.track(eval_ids, "predicting"):
        seg, spacing = predict_case(predictor, dataset.image_files(cid))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(dataset.label_file(cid)))
        cases += [{"case_id": cid, **row} for row in score_labels(seg, ref, spacing, labels,
                                                                   nsd_tolerance_mm=dataset.nsd_tolerance_mm)]

    summary = run_summary(cases)
    provenance = {
        "foundation": {"name": fid["name"], "sha256": fid["sha256"], "checkpoint": fid["checkpoint"]},
        "protocol": {"dataset": spec.dataset, "version": protocol.version},
        "recipe": {**recipe.as_dict(), "optimizer_detail": OPTIMIZERS[recipe.optimizer]},
        "budget": {"iterations": spec.iterations, "train_steps": outcome.train_steps,
                   "calibration_passes": outcome.calibration_passes, "batch_size": outcome.batch_size,
                   "patch_size": outcome.patch_size, "eval_every": spec.eval_every},
        "seed": {"value": seed, "source": seed_source},
        "hyperparameters": {"values": method.hp, "source": spec.params_source},
        "augment": outcome.augment,
        "updated_per_step": outcome.updated_per_step,
        "code": {"version": bench.__version__, **{f"git_{k}": v for k, v in git_commit().items()}},
        "versions": versions(),
        "device": {"type": dev.type, "name": device_name(dev)},
    }
    result = {
        "schema_version": RESULT_SCHEMA_VERSION if len(labels) <= 1 else MULTI_LABEL_SCHEMA_VERSION,
        **({"labels": list(labels)} if len(labels) > 1 else {}),
        "metrics_version": METRICS_VERSION, "run_id": run_id,
        "code_version": bench.__version__,
        "spec": {**asdict(spec), "lr": recipe.lr, "optimizer": recipe.optimizer,
                 "weight_decay": recipe.weight_decay, "seed": seed, "hparams": method.hp,
                 "foundation": foundation.name, "protocol_version": protocol.version, "device": dev.type},
        "provenance": provenance,
        "support": split.support, "trained_on": train_ids, "tune": split.tune, "evaluated": spec.evaluate_on,
        "test": eval_ids if spec.evaluate_on == "test" else [],
        "versions": provenance["versions"],
        "cost": {"train_seconds": outcome.train_seconds,
                 "step_seconds_median": float(np.median(outcome.step_times)) if outcome.step_times else None,
                 "peak_memory_mb": outcome.peak_memory_mb, "device": dev.type,
                 "forward_backward_passes": outcome.train_steps + outcome.calibration_passes,
                 "augment_seconds_per_step": (outcome.augment or {}).get("seconds_per_step")},
        "params": {"total": outcome.total, "trainable": outcome.trainable, "changed": outcome.changed,
                   "updated_per_step": outcome.updated_per_step},
        "foundation_load": {k: len(v) for k, v in outcome.load_report.items()},
        "epochs": outcome.epoch_scores, "summary": summary, "cases": cases, "model_dir": str(model_dir),
    }
    return record(result, out, tracking_uri, parent_run_id)


def record(result: dict, out: Path, tracking_uri: Optional[str], parent_run_id: Optional[str]) -> dict:
    """Log a finished run to MLflow, then write its result.json (last, atomically)."""
    from bench.tracking import log_result
    result["mlflow_run_id"] = log_result(result, out, tracking_uri=tracking_uri, parent_run_id=parent_run_id)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "result.json")
    return result


def shots_free_key(spec: RunSpec) -> str:
    """The spec with its shot count left out: what the runs of a method that does not read the shots
    (``Method.depends_on_shots``) share across shot counts."""
    return json.dumps({**asdict(spec), "shots": None}, sort_keys=True, default=str)


def finished_twin(spec: RunSpec, protocol) -> Optional[Tuple[Path, dict]]:
    """The folder and result of a finished run of ``spec`` at another of the protocol's shot counts: for a
    method that reads nothing of the shots (``Method.depends_on_shots``) it trained and predicted exactly
    what this run would (same cases, seed, budget, recipe)."""
    return _finished(replace(spec, shots=shots) for shots in protocol.shots if shots != spec.shots)


def finished_ancestor(spec: RunSpec, protocol) -> Optional[Tuple[Path, dict]]:
    """The folder and result of a finished run of ``spec`` under a version ``protocol`` extends that has its
    repeat: the same split, seed, budget and recipe (``Protocol.check_extends``, ``Protocol.seed_version``),
    hence the same experiment."""
    earlier = []
    parent = protocol.parent
    while parent is not None and spec.repeat < parent.n_repeats:
        earlier.append(replace(spec, protocol_version=parent.version))
        parent = parent.parent
    return _finished(earlier)


def _finished(specs) -> Optional[Tuple[Path, dict]]:
    for other in specs:
        folder = run_path(other)
        if (folder / "result.json").is_file():
            return folder, json.loads((folder / "result.json").read_text())
    return None


def reuse_run(spec: RunSpec, folder: Path, earlier: dict, split, protocol_version: str, out: Path, log: Callable,
              tracking_uri: Optional[str], parent_run_id: Optional[str]) -> dict:
    """Record an earlier run of the same experiment (``finished_twin``, ``finished_ancestor``) as this cell's
    run: its model, scores and extra evaluation, under this cell's own id, shots, protocol version and split,
    saying which run it reuses."""
    from bench.evaluation.extra import EXTRA_FILE
    was = earlier["spec"]
    why = (f"{spec.method} does not depend on the shot count" if was["shots"] != spec.shots
           else f"protocol {protocol_version} extends {was['protocol_version']} with this repeat unchanged")
    log(f"  reusing run {earlier['run_id']} ({was['shots']}-shot, protocol {was['protocol_version']}): {why}")
    result = json.loads(json.dumps(earlier))
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(folder / "model", model_dir)
    if (folder / EXTRA_FILE).is_file():   # scores of the same model on the auxiliary sets
        shutil.copyfile(folder / EXTRA_FILE, out / EXTRA_FILE)
    result.pop("mlflow_run_id", None)
    result["provenance"]["protocol"]["version"] = protocol_version
    result.update(run_id=spec.run_id(), support=split.support, tune=split.tune, model_dir=str(model_dir),
                  spec={**was, "shots": spec.shots, "protocol_version": protocol_version},
                  reused_from={"run_id": earlier["run_id"], "shots": was["shots"],
                               "protocol_version": was["protocol_version"]})
    return record(result, out, tracking_uri, parent_run_id)
