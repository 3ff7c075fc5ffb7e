"""Sweeps: the grid (methods x datasets x shots x repeats) as independent cells on an
existing engine: local processes (one per GPU when there are GPUs), Ray, or SLURM
through submitit. No scheduler of our own.

Idempotent: a cell whose ``result.json`` exists (same resolved spec, foundation
checkpoint, protocol version and code version, see ``RunSpec.run_id``) is skipped
unless ``force``. ``result.json`` is written last, atomically, after the MLflow run
finished: a killed cell leaves no result and is redone by the next sweep. A failing
cell never stops the others.

With ``tune_trials``, a cell first tunes its method (one Optuna study per method,
dataset and shots, shared by the cell's repeats) with the cell's recipe, seed and
``eval_every``, then runs with the tuned parameters. Such a cell is done when its
tuned-params file matches this sweep's tuning set-up and the run with those
parameters has its ``result.json``. The first repeat of every study runs before
the others, so the study is complete (and its best trial final) before any other
repeat reads it: every repeat uses the same tuned parameters.
"""
from __future__ import annotations

import itertools
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from bench import progress
from bench.runner import RunSpec, run_dir

EXECUTORS = ("local", "ray", "slurm")


@dataclass
class CellOutcome:
    key: str
    status: str            # done | skipped | failed
    seconds: float = 0.0
    dice_mean: Optional[float] = None
    error: str = ""


def grid(methods: Sequence[str], datasets: Sequence[str], shots: Sequence[int],
         repeats: Optional[Sequence[int]] = None, **spec_fields) -> List[RunSpec]:
    """One spec per cell. ``methods`` are table rows: a method, or ``<method>+<label>`` for the method trained
    with an augmentation (``dgst+synth``, ``bench.augment``); ``augment`` in ``spec_fields`` applies to the
    rows that name none. ``repeats`` None: every repeat of each dataset's protocol."""
    from bench.augment import split_row_label
    from bench.protocols import Protocol
    rows = [split_row_label(m) for m in methods]
    repeats_of = {d: repeats if repeats is not None
                  else range(Protocol.load(d, spec_fields.get("protocol_version")).n_repeats) for d in datasets}
    specs = [RunSpec(**{**spec_fields, "augment": a or spec_fields.get("augment")}, method=m, dataset=d, shots=k,
                     repeat=r)
             for d, k, (m, a) in itertools.product(datasets, shots, rows) for r in repeats_of[d]]
    return list({cell_key(s): s for s in specs}.values())  # `dgst` with augment= and `dgst+synth`: one cell


def cell_key(spec: RunSpec) -> str:
    return f"{spec.row_label()}/{spec.dataset}/{spec.shots}shot/r{spec.repeat}"


def cell_budget(spec: RunSpec, tune_trials: int):
    """The study a tuned cell runs in: the cell's iterations, eval_every, recipe, seed and foundation."""
    from bench.tuning import StudyBudget
    return StudyBudget(trials=tune_trials, iterations=spec.iterations, eval_every=spec.eval_every,
                       optimizer=spec.optimizer, weight_decay=spec.weight_decay, seed=spec.seed,
                       foundation=spec.foundation)


def tuned_spec(spec: RunSpec, tune_trials: int) -> Optional[RunSpec]:
    """The spec a cell's test run uses: ``spec`` itself, or, with tuning, ``spec`` with the tuned
    parameters of a study run with this cell's set-up; None while there is no such study result."""
    if not tune_trials:
        return spec
    from bench.tuning import apply_tuned, load_tuned
    try:
        tuned = load_tuned(spec.method, spec.dataset, spec.shots)
    except (FileNotFoundError, ValueError):
        return None
    budget, wanted = tuned.data["budget"], cell_budget(spec, tune_trials)
    if any(budget.get(k) != getattr(wanted, k)
           for k in ("trials", "iterations", "eval_every", "optimizer", "weight_decay", "seed", "foundation")) \
            or tuned.data["protocol_version"] != spec.resolved_protocol_version():
        return None
    return apply_tuned(spec, tuned)


def is_done(spec: RunSpec, tune_trials: int = 0) -> bool:
    from bench.runner import FoundationNotBuilt
    final = tuned_spec(spec, tune_trials)
    try:
        return final is not None and (run_dir(final) / "result.json").is_file()
    except FoundationNotBuilt:  # nothing can have run with a foundation that does not exist yet
        return False


def run_cell(spec_dict: dict, tracking_uri: Optional[str], tune_trials: int = 0) -> dict:
    """Executed by a worker (process, Ray task or SLURM job): never raises."""
    from bench.home import configure_nnunet_env
    configure_nnunet_env()
    spec = RunSpec(**spec_dict)
    t0 = time.time()
    log_path = run_dir(spec) / "cell.log"
    try:
        with open(log_path, "a") as logf, progress.to_file(logf):  # not the sweep's terminal
            def log(msg):
                logf.write(f"{msg}\n")
                logf.flush()
            if tune_trials:
                from bench.tuning import tune
                tune(spec.method, spec.dataset, spec.shots, cell_budget(spec, tune_trials),
                     protocol_version=spec.protocol_version, device=spec.device, tracking_uri=tracking_uri, log=log)
                spec = tuned_spec(spec, tune_trials)
                if spec is None:
                    raise RuntimeError("tuning finished without tuned parameters (no trial completed)")
            from bench.runner import run
            result = run(spec, log=log, tracking_uri=tracking_uri)
        return asdict(CellOutcome(cell_key(spec), "done", time.time() - t0, result["summary"]["dice_mean"]))
    except BaseException as e:  # noqa: BLE001 - a cell's failure is data for the summary
        return asdict(CellOutcome(cell_key(spec), "failed", time.time() - t0,
                                  error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


def estimate_seconds(specs: Iterable[RunSpec], tune_trials: int = 0, device: Optional[str] = None) -> Dict[str, float]:
    """Cost per cell from measured step times (``bench.cost``); cells without one are left out."""
    from bench.cost import cell_costs
    from bench.tuning import DEFAULT_REPEATS
    specs = list(specs)
    device = device or device_type(specs)
    return {c.key: c.seconds for c in cell_costs(specs, tune_trials, DEFAULT_REPEATS, device) if c.seconds is not None}


def device_type(specs: List[RunSpec]) -> str:
    """The device type the cells will train on ("auto": CUDA where torch sees it)."""
    asked = {s.device for s in specs} - {"auto"}
    if asked:
        return sorted(asked)[0]
    return "cuda" if _gpu_count() else "cpu"


def _gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:  # pragma: no cover
        return 0


def _pin_gpu(queue) -> None:
    """Local-executor worker initializer: one GPU per worker process."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(queue.get())


def _share_cpus(threads: int) -> None:
    """Local-executor worker initializer on a CPU-only machine: the cores are split between the
    workers. Left alone, every worker's torch takes all cores and parallel cells run slower than
    one at a time (measured: 2 workers on 2 cores, 194 s vs 106 s wall for 6 cells)."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)


def _submit_local(todo, tracking_uri, workers, tune_trials):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    ctx = mp.get_context("spawn")  # nnU-Net and CUDA need spawn, not fork
    gpus = _gpu_count()
    kwargs = {}
    if gpus:
        workers = min(workers, gpus)
        q = ctx.Manager().Queue()
        for i in range(workers):
            q.put(i)
        kwargs = {"initializer": _pin_gpu, "initargs": (q,)}
    elif workers > 1:
        kwargs = {"initializer": _share_cpus, "initargs": (max(1, (os.cpu_count() or 1) // workers),)}
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, **kwargs)
    futures = {pool.submit(run_cell, asdict(s), tracking_uri, tune_trials): s for s in todo}
    from concurrent.futures import as_completed
    for fut in as_completed(futures):
        try:
            yield fut.result()
        except Exception as e:  # the worker process itself died (killed, OOM)
            yield asdict(CellOutcome(cell_key(futures[fut]), "failed", error=f"worker died: {e!r}"))
    pool.shutdown()


def _start_ray(address: Optional[str], workers: int) -> str:
    """Join the Ray cluster at ``address`` (else $RAY_ADDRESS; "auto": the one `ray start` started on
    this machine), or start a private local instance with ``workers`` CPUs; returns where the cells
    will run, for the sweep's first line."""
    import ray
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        # "local": without it ray.init() silently joins a cluster `ray start` left on this machine
        try:
            ray.init(address=address or "local", num_cpus=None if address else workers,
                     include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                               if k.startswith(("BENCH_", "nnUNet_"))}})
        except ConnectionError as e:
            raise ConnectionError(f"{e}{_ray_auth_hint(address)}") from e
    gcs, cpus = ray.get_runtime_context().gcs_address, int(ray.cluster_resources().get("CPU", 0))
    where = f"the Ray cluster at {gcs}" if address else f"a private local Ray instance ({gcs})"
    return f"{where} ({len(ray.nodes())} node(s), {cpus} CPU(s))"


def _ray_auth_hint(address: Optional[str]) -> str:
    """Recent Ray releases start clusters with token authentication when the head finds a token
    (~/.ray/auth_token), but a driver given an explicit address sends its token only with RAY_AUTH_MODE=token:
    the head then answers InvalidAuthToken and ray.init reports only a failed connection."""
    if not address or address == "auto" or os.environ.get("RAY_AUTH_MODE"):
        return ""
    return ("; if the cluster uses token authentication (`ray start` enables it when the head has "
            "~/.ray/auth_token), set RAY_AUTH_MODE=token and give this machine the cluster's token: "
            "~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on the head prints it)")


def _check_slurm(slurm: Optional[dict]) -> None:
    """submitit's AutoExecutor silently runs the jobs as local processes where there is no SLURM:
    a user who asked for the cluster is told instead (``slurm={"cluster": "local"}`` asks for that)."""
    import shutil
    if (slurm or {}).get("cluster") is None and shutil.which("srun") is None:
        raise ValueError("--executor slurm: SLURM is not available on this machine (no `srun` on PATH), and "
                         "the cells would run here as local processes; use --executor local to run them here, "
                         "or start the sweep on a SLURM login node")


def _submit_ray(todo, tracking_uri, workers, tune_trials):
    import ray
    remote = ray.remote(num_gpus=1 if _gpu_count() else 0, max_retries=0)(run_cell)
    pending = {remote.remote(asdict(s), tracking_uri, tune_trials): s for s in todo}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            spec = pending.pop(ref)
            try:
                yield ray.get(ref)
            except Exception as e:
                yield asdict(CellOutcome(cell_key(spec), "failed", error=f"ray task failed: {e!r}"))


def _submit_slurm(todo, tracking_uri, workers, tune_trials, slurm: Optional[dict] = None):
    import submitit
    from bench.home import subdir
    slurm = dict(slurm or {})
    cluster = slurm.pop("cluster", None)  # "local" runs the same jobs as local processes (tests)
    executor = submitit.AutoExecutor(folder=str(subdir("sweeps", "submitit")), cluster=cluster)
    params = {"timeout_min": slurm.pop("timeout_min", 240)}
    if cluster != "local":
        params.update(gpus_per_node=slurm.pop("gpus_per_node", 1), slurm_array_parallelism=workers)
    executor.update_parameters(**params, **slurm)
    jobs = [(executor.submit(run_cell, asdict(s), tracking_uri, tune_trials), s) for s in todo]
    for job, spec in jobs:
        try:
            yield job.result()
        except Exception as e:
            yield asdict(CellOutcome(cell_key(spec), "failed", error=f"job {job.job_id} failed: {e!r}"))


def _prepare_shared_inputs(specs: List[RunSpec], log: Callable, tracking_uri: Optional[str]) -> None:
    """Create the tracking store, generate embedded datasets and build the suite's foundations once,
    before cells run in parallel, so workers never race to create the same things."""
    from bench.datasets import get_dataset
    from bench.foundation import foundation_recipe, get_foundation
    from bench.tracking import open_store
    open_store(tracking_uri)  # MLflow creates its SQLite schema on first use; two workers doing it collide
    for name in sorted({s.dataset for s in specs}):
        ds = get_dataset(name)
        if not ds.needs_source:  # a missing release is each cell's own, reported failure
            ds.ensure_prepared()
    for foundation in sorted({s.foundation for s in specs if foundation_recipe(s.foundation)}, key=str):
        get_foundation(foundation, log=log, device=specs[0].device)


def sweep(specs: List[RunSpec], executor: str = "local", workers: int = 1, force: bool = False,
          tracking_uri: Optional[str] = None, tune_trials: int = 0, log: Callable = print,
          slurm: Optional[dict] = None, ray_address: Optional[str] = None) -> List[CellOutcome]:
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if executor == "slurm":
        _check_slurm(slurm)
    if ray_address and executor != "ray":
        raise ValueError(f"--ray-address is for --executor ray, not --executor {executor}")
    _prepare_shared_inputs(specs, log, tracking_uri)
    done = {id(s) for s in specs if not force and is_done(s, tune_trials)}
    outcomes = [CellOutcome(cell_key(s), "skipped") for s in specs if id(s) in done]
    todo = [s for s in specs if id(s) not in done]
    for s in todo:
        run_dir(s)  # create the folders up front (cell.log lives there)
    waves = [w for wave in (_tuning_waves(todo) if tune_trials else [todo]) for w in _twin_waves(wave)]
    estimate = estimate_seconds(todo, tune_trials)
    where = _start_ray(ray_address, workers) if executor == "ray" and todo else executor
    log(f"sweep: {len(specs)} cells, {len(outcomes)} already done, {len(todo)} to run on {where} "
        f"with {workers} worker(s); estimated {sum(estimate.values()) / max(workers, 1) / 60:.1f} min")
    submit = {"local": _submit_local, "ray": _submit_ray, "slurm": _submit_slurm}[executor]
    extra = {"slurm": slurm} if executor == "slurm" else {}
    t0 = time.time()
    jobs = itertools.chain.from_iterable(submit(w, tracking_uri, workers, tune_trials, **extra) for w in waves if w)
    with progress.cells(len(todo), workers, sum(estimate.values())) as cells:
        for out in jobs:
            outcome = CellOutcome(**out)
            outcomes.append(outcome)
            state = cells.finished(outcome.seconds, failed=outcome.status == "failed")
            score = f"Dice {outcome.dice_mean:.3f}" if outcome.dice_mean is not None else outcome.error.splitlines()[0]
            log(f"[{state}] {outcome.key}: {outcome.status} in {outcome.seconds:.0f} s; {score}")
    wall = time.time() - t0
    ran = [o for o in outcomes if o.status != "skipped"]
    log(f"sweep finished in {wall:.0f} s wall; {sum(o.seconds for o in ran):.0f} device-seconds in cells "
        f"({'GPU' if _gpu_count() else 'CPU'}); done {sum(o.status == 'done' for o in ran)}, "
        f"skipped {len(outcomes) - len(ran)}, failed {sum(o.status == 'failed' for o in ran)}")
    for o in ran:
        if o.status == "failed":
            log(f"  FAILED {o.key}: {o.error}")
    _write_summary(outcomes, wall, executor, workers, tracking_uri)
    return outcomes


def _tuning_waves(todo: List[RunSpec]) -> List[List[RunSpec]]:
    """First one cell per study (method, dataset, shots), which tunes; then the rest, which find
    the study complete and only read its best trial."""
    first, rest, seen = [], [], set()
    for s in todo:
        study = (s.method, s.dataset, s.shots)
        (rest if study in seen else first).append(s)
        seen.add(study)
    return [first, rest]


def _twin_waves(todo: List[RunSpec]) -> List[List[RunSpec]]:
    """A method that does not read the shots (``Method.depends_on_shots``: the reference rows) trains once
    per repeat: one of its cells runs in the first wave, the other shot counts wait for it and reuse its run
    (two workers starting both would train twice)."""
    from bench.methods import METHODS
    from bench.runner import shots_free_key
    first, twins, seen = [], [], set()
    for s in todo:
        if METHODS.get(s.method).depends_on_shots:
            first.append(s)
            continue
        twin = shots_free_key(s)
        (twins if twin in seen else first).append(s)
        seen.add(twin)
    return [first, twins]


def _write_summary(outcomes, wall, executor, workers, tracking_uri) -> Path:
    from bench.home import subdir
    path = subdir("sweeps") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.json"
    summary = {"wall_seconds": wall, "executor": executor, "workers": workers,
               "cell_seconds_total": sum(o.seconds for o in outcomes),
               "cells": [asdict(o) for o in outcomes]}
    path.write_text(json.dumps(summary, indent=1))
    try:
        from bench import tracking
        with tracking.start_run(path.stem, {"kind": "sweep"}, tracking_uri):
            tracking.log_metrics({"wall_seconds": wall, "cell_seconds_total": summary["cell_seconds_total"],
                                  "cells_failed": sum(o.status == "failed" for o in outcomes)})
            tracking.log_artifact(str(path))
    except Exception as e:  # the summary file is the record; tracking is best effort here
        print(f"note: sweep summary not logged to MLflow ({e})")
    return path


def load_sweep_file(path: Path) -> dict:
    """A committed sweep file: {"methods": [...], "datasets": [...], "shots": [...], "repeats": N, ...}.
    ``methods``: "all", names, and rows with an augmentation (``["all", "dgst+synth"]``)."""
    data = json.loads(Path(path).read_text())
    unknown = set(data) - {"methods", "datasets", "shots", "repeats", "iterations", "tune_trials", "executor",
                           "workers", "foundation", "seed", "eval_every", "augment"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    return data
