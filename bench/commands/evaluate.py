"""``bench evaluate``: add the auxiliary evaluations (forgetting, node-free false positives) to finished runs."""
from __future__ import annotations

from bench.commands import add_budget_selection, budget_selection
from bench.options import comma_list, positive_int


def check_retention(args) -> None:
    """Refuse a bad --retention before anything runs (not once per run, nor after training)."""
    if getattr(args, "retention", None) and not getattr(args, "no_extra_eval", False):
        from bench.evaluation.sets import dataset_retention_set
        dataset_retention_set(args.retention)


def add_extra_arguments(p) -> None:
    """``--retention`` / ``--foundation-dir``: shared by run, sweep and evaluate."""
    p.add_argument("--retention", default=None, metavar="DATASET[:CASE,CASE...]",
                   help="the foundation's source data for the forgetting axis: a prepared dataset and cases "
                        "(default: the phantom source set for a phantom foundation; without cases the first 10)")


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="add forgetting and node-free false positives to finished runs",
                       description="Score each run's exported model on the auxiliary sets (retention: the "
                                   "foundation's source domain, forgetting = the foundation's Dice there minus "
                                   "the run's; nodefree: scans with no node, false-positive components and ml) "
                                   "and store them in extra_eval.json next to result.json. Runs already holding "
                                   "the current version of a set are skipped: a second call does nothing.")
    p.add_argument("--extra", default="retention,nodefree", help="comma list of axes (default: both)")
    p.add_argument("--runs-under", default=None, metavar="DIR", help="default: $BENCH_HOME/runs")
    p.add_argument("--dataset", default=None, help="only runs on this dataset")
    p.add_argument("--methods", default=None, help="only these methods (comma list)")
    p.add_argument("--shots", type=comma_list(positive_int), default=None, metavar="K[,K...]")
    add_budget_selection(p)
    add_extra_arguments(p)
    p.add_argument("--foundation-dir", default=None, metavar="DIR",
                   help="the foundation's folder, where it is not at the path the runs recorded (found by its "
                        "checkpoint's sha256)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--force", action="store_true", help="recompute sets that are up to date")
    p.set_defaults(func=main)


def main(args) -> int:
    from bench.evaluation.extra import evaluate_runs, parse_axes, run_folders
    from bench.home import bench_home
    axes = parse_axes(args.extra)
    check_retention(args)
    root = args.runs_under or bench_home() / "runs"
    folders = run_folders(root, dataset=args.dataset,
                          methods=[m for m in (args.methods or "").split(",") if m] or None,
                          shots=args.shots, **budget_selection(args))
    print(f"evaluate: {len(folders)} run(s) under {root}; axes {', '.join(axes)}", flush=True)
    counts = evaluate_runs(folders, axes, retention=args.retention, foundation_dir=args.foundation_dir,
                           device=args.device, force=args.force, log=lambda m: print(m, flush=True))
    return 1 if counts["failed"] else 0
