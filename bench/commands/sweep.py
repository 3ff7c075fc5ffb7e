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
    p.add_argument("--methods", default=None,
                   help="comma list, or 'all' (default dgst,full); METHOD+synth adds the method trained with "
                        "--augment synth-nodes as its own row, e.g. all,dgst+synth")
    p.add_argument("--augment", default=None, metavar="NAME",
                   help="training-data augmentation for every listed method (e.g. synth-nodes); rows: METHOD+synth")
    p.add_argument("--datasets", default=None, help="comma list (default phantom)")
    p.add_argument("--shots", type=CHECKS["shots"], default=None, metavar="K[,K...]",
                   help="comma list (default 1,3,5)")
    p.add_argument("--repeats", type=CHECKS["repeats"], default=None,
                   help="repeats 0..N-1 per cell (default: every repeat of the dataset's protocol, e.g. phantom 10)")
    p.add_argument("--iterations", type=CHECKS["iterations"], default=None,
                   help="training iterations per cell (default: each dataset's budget, e.g. phantom 20 per "
                        "training case and at least 60, segrap2023 / lnq2023 12,500)")
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
    p.add_argument("--foundation", default=None, metavar="NAME|PATH",
                   help="a suite recipe's name (phantom-stunet-v1) or a model folder (default: phantom-v2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--force", action="store_true", help="recompute finished cells")
    p.add_argument("--dry-run", action="store_true",
                   help="list cells and their cost from measured step times; run nothing. With --paper: the "
                        "paper-scale grid (every method x segrap2023, lnq2023 x 1/3/5 shots x 5 repeats, tuned)")
    p.add_argument("--paper", action="store_true", help="with --dry-run: cost of the paper-scale grid")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--tracking-uri", default=None)
    from bench.commands.evaluate import add_extra_arguments
    add_extra_arguments(p)
    p.add_argument("--no-extra-eval", action="store_true",
                   help="skip forgetting and node-free false positives of the finished cells (`bench evaluate`)")
    p.set_defaults(func=main)


def resolve_rows(selection, augment=None) -> list:
    """Row labels of a sweep: method names, ``all`` (every registered method) and ``METHOD+LABEL`` rows (the
    method with an augmentation, ``dgst+synth``), as a comma list or a list; unknown names fail with the valid
    ones. ``augment`` (every listed method trained with it) is refused for a method that does not train."""
    from bench.augment import get_augmentation, row_label, split_row_label
    from bench.methods import METHODS, resolve_methods
    entries = [e.strip() for e in (selection.split(",") if isinstance(selection, str) else selection)]
    rows = []
    for entry in filter(None, entries):
        if entry == "all":
            rows += resolve_methods("all")
            continue
        method, own = split_row_label(entry)
        METHODS.get(method)
        rows.append(row_label(method, own))
    if augment:
        get_augmentation(augment)
        for r in rows:
            method, own = split_row_label(r)
            if own is None and not METHODS.get(method).trains:
                raise ValueError(f"--augment {augment}: {method} does not train, so the augmentation cannot apply "
                                 f"to it; list the rows to augment instead, e.g. --methods dgst+synth,full+synth")
    return list(dict.fromkeys(rows))


def _check_repeats(datasets, repeats) -> None:
    """Refuse more repeats than a dataset's protocol has, before any cell starts."""
    from bench.protocols import Protocol
    if repeats is None:
        return
    for d in datasets:
        p = Protocol.load(d)
        if repeats > p.n_repeats:
            raise ValueError(f"--repeats {repeats}, but protocol {d}/{p.version} ({p.path}) has "
                             f"{p.n_repeats}; ask for at most {p.n_repeats}, or leave --repeats out for all")


def main(args) -> int:
    from bench.datasets import DATASETS
    from bench.sweep import grid, sweep

    cfg = _checked_file(args.file) if args.file else {}
    pick = lambda name, default: getattr(args, name) if getattr(args, name) is not None else cfg.get(name, default)
    methods = resolve_rows(pick("methods", "dgst,full"), pick("augment", None))
    datasets = _csv(pick("datasets", "phantom")) if isinstance(pick("datasets", ""), str) else cfg["datasets"]
    shots = pick("shots", [1, 3, 5])
    for d in datasets:
        DATASETS.get(d)
    extra = {k: cfg[k] for k in ("seed", "eval_every") if k in cfg}  # sweep-file only
    if pick("augment", None):
        extra["augment"] = pick("augment", None)
    repeats = pick("repeats", None)
    _check_repeats(datasets, repeats)
    specs = grid(methods, datasets, shots, None if repeats is None else range(repeats),
                 iterations=pick("iterations", None), foundation=pick("foundation", None), device=args.device, **extra)
    trials = pick("tune_trials", 0)
    from bench.commands.evaluate import check_retention
    check_retention(args)
    if args.dry_run:
        return dry_run(paper_grid(), PAPER_TRIALS) if args.paper else dry_run(specs, trials)
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


PAPER_TRIALS = 20  # bench tune's default study size


def dry_run(specs, trials: int) -> int:
    """Each cell's cost (``bench.cost``: measured step times only), what is done, and the totals."""
    from bench.cost import cell_costs, describe
    from bench.sweep import cell_key, device_type, is_done
    from bench.tuning import DEFAULT_REPEATS
    device = device_type(specs)
    costs = cell_costs(specs, trials, DEFAULT_REPEATS, device)
    for s, c in zip(specs, costs):
        cost = f"~{c.seconds:.0f} s" if c.seconds is not None else "unknown"
        print(f"{cell_key(s):<40} {'done' if is_done(s, trials) else 'todo':<5} {cost}")
    for line in describe(costs, specs, trials, device):
        print(line)
    return 0


def paper_grid():
    """Every registered method x the real datasets x 1/3/5 shots x 5 repeats at the datasets' budgets."""
    from bench.methods import METHODS
    from bench.sweep import grid
    return grid(METHODS.names(), ["segrap2023", "lnq2023"], [1, 3, 5], range(5), device="cuda")
