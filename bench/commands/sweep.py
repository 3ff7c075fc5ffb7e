"""``bench sweep``: the full grid on local processes, Ray or SLURM (submitit); resumable."""
from __future__ import annotations

from bench.options import OptionError, comma_list, nonneg_int, positive_int, seed

# Numeric settings, given as flags or in the sweep file: the same check either way.
CHECKS = {"shots": comma_list(positive_int), "repeats": positive_int, "iterations": positive_int,
          "tune_trials": nonneg_int, "workers": positive_int, "seed": seed, "eval_every": positive_int}


def _csv(text):
    return [t for t in str(text).split(",") if t]


def _checked_file(path) -> dict:
    from bench.sweep import load_sweep_file
    cfg = load_sweep_file(path)
    for key, check in CHECKS.items():
        if key in cfg:
            try:
                cfg[key] = check(cfg[key])
            except OptionError as e:
                raise ValueError(f"{path}: {key!r} {e}") from None
    return cfg


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run the grid methods x datasets x shots x repeats (resumable)",
                       description="Each cell (method, dataset, shots, repeat) is one job. Finished cells are "
                                   "skipped; killed or failed ones are redone on the next invocation.")
    p.add_argument("--file", default=None, help="sweep file (JSON) with the same keys; flags override it")
    p.add_argument("--methods", default=None, help="comma list, or 'all' (default dgst,full)")
    p.add_argument("--datasets", default=None, help="comma list (default phantom)")
    p.add_argument("--shots", type=CHECKS["shots"], default=None, metavar="K[,K...]",
                   help="comma list (default 1,3,5)")
    p.add_argument("--repeats", type=CHECKS["repeats"], default=None, help="repeats 0..N-1 per cell (default 5)")
    p.add_argument("--iterations", type=CHECKS["iterations"], default=None,
                   help="training iterations per cell (default 60)")
    p.add_argument("--tune-trials", type=CHECKS["tune_trials"], default=None,
                   help="tune each cell first with this many trials")
    p.add_argument("--executor", choices=["local", "ray", "slurm"], default=None,
                   help="local processes (default); ray: the cluster at --ray-address / $RAY_ADDRESS, else a "
                        "private Ray instance on this machine; slurm: jobs through submitit, refused where SLURM "
                        "is not installed")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="join this running Ray cluster (as started by `ray start --head`; default: $RAY_ADDRESS)")
    p.add_argument("--workers", type=CHECKS["workers"], default=None,
                   help="parallel cells (local: one per GPU if any)")
    p.add_argument("--foundation", default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--force", action="store_true", help="recompute finished cells")
    p.add_argument("--dry-run", action="store_true", help="list cells and estimate their cost; run nothing")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--tracking-uri", default=None)
    from bench.commands.evaluate import add_extra_arguments
    add_extra_arguments(p)
    p.add_argument("--no-extra-eval", action="store_true",
                   help="skip forgetting and node-free false positives of the finished cells (`bench evaluate`)")
    p.set_defaults(func=main)


def main(args) -> int:
    from bench.methods import resolve_methods
    from bench.datasets import DATASETS
    from bench.sweep import cell_key, estimate_seconds, grid, is_done, sweep

    cfg = _checked_file(args.file) if args.file else {}
    pick = lambda name, default: getattr(args, name) if getattr(args, name) is not None else cfg.get(name, default)
    methods = resolve_methods(pick("methods", "dgst,full"))
    datasets = _csv(pick("datasets", "phantom")) if isinstance(pick("datasets", ""), str) else cfg["datasets"]
    shots = pick("shots", [1, 3, 5])
    for d in datasets:
        DATASETS.get(d)
    extra = {k: cfg[k] for k in ("seed", "eval_every") if k in cfg}  # sweep-file only
    specs = grid(methods, datasets, shots, range(pick("repeats", 5)), iterations=pick("iterations", 60),
                 foundation=pick("foundation", None), device=args.device, **extra)
    trials = pick("tune_trials", 0)
    from bench.commands.evaluate import check_retention
    check_retention(args)
    if args.dry_run:
        est = estimate_seconds(specs, trials)
        for s in specs:
            print(f"{cell_key(s):<40} {'done' if is_done(s, trials) else 'todo':<5} ~{est[cell_key(s)]:.0f} s")
        todo = sum(v for s in specs if not is_done(s, trials) for k, v in est.items() if k == cell_key(s))
        print(f"{len(specs)} cells; remaining cost ~{todo / 3600:.2f} device-hours")
        return 0
    slurm = {"slurm_partition": args.slurm_partition} if args.slurm_partition else None
    outcomes = sweep(specs, executor=pick("executor", "local"), workers=pick("workers", 1), force=args.force,
                     tracking_uri=args.tracking_uri, tune_trials=trials, slurm=slurm, ray_address=args.ray_address)
    if not args.no_extra_eval:  # after the cells, here: one process, skipping runs already evaluated
        from bench.evaluation.extra import evaluate_runs
        from bench.sweep import run_dir, tuned_spec
        finals = [tuned_spec(s, trials) for s in specs]
        folders = [run_dir(f) for f in finals if f is not None and (run_dir(f) / "result.json").is_file()]
        evaluate_runs(folders, retention=args.retention, device=args.device)
    return 1 if any(o.status == "failed" for o in outcomes) else 0
