"""``bench perf``: step time, peak memory and parameter counts of every method, side by side."""
from __future__ import annotations

import argparse

from bench.options import at_least, positive_int, seed


def register(sub) -> None:
    p = sub.add_parser(
        "perf", help="time / memory / parameters of every method on one network, interleaved in one run",
        description="Train every registered method for a few steps on random data with nnU-Net's loss and SGD "
                    "(AMP on CUDA), timed round-robin in one process so load drift hits all methods alike. "
                    "Reports median step time and spread, peak memory, trainable and actually changed "
                    "parameters, ratios to full fine-tuning, DGST's selection against the released one on the "
                    "same gradients, and the harness step against stock nnU-Net's train_step. Writes "
                    "<out>/perf_<device>.md and .csv and logs an MLflow run tagged kind=perf.")
    p.add_argument("--network", choices=["tiny", "default", "stunet", "both"], default="both",
                   help="tiny: the phantom foundation's architecture (8-64 features); default: nnU-Net's default "
                        "3d_fullres for H&N CT (32-320 features); stunet: STU-Net-S (16-256 features, patch "
                        "128^3 on CUDA, 64^3 on CPU); both (default): tiny and default")
    p.add_argument("--patch", type=positive_int, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="patch size for the chosen network(s) (default: tiny 32 64 64; default network "
                        "56 192 160 on CUDA, 16 64 64 on CPU)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="batch size (default: 2; 1 for the default network on CPU)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed rounds (default: 8 on CPU, 20 on CUDA)")
    p.add_argument("--memory-reps", type=positive_int, default=None,
                   help="memory windows per method (set-up + warm-up), median reported (default: 3 CPU, 1 CUDA)")
    p.add_argument("--warmup", type=at_least(2), default=None,
                   help="warm-up steps per method, >= 2; peak memory is taken over them (default: 2 CPU, 3 CUDA)")
    p.add_argument("--selection-reps", type=positive_int, default=None,
                   help="repetitions of the selection timing (default: 3 CPU, 10 CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--methods", default="all", help="'all' (default) or a comma list; full is always included")
    p.add_argument("--out", default="leaderboards", help="folder for perf_<device>.md/.csv (default: leaderboards)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in $BENCH_HOME)")
    p.add_argument("--seed", type=seed, default=0)
    # For the test-suite: a 3-stage 4-16 feature network, patch 8x16x16, batch 1; files get a -tiny-test suffix.
    p.add_argument("--tiny-test", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=main)


def main(args) -> int:
    from bench.methods import METHODS, resolve_methods
    from bench.perf import (REFERENCE, default_settings, log_report, network_spec, render_text, resolve_device,
                            run_perf, write_report)

    device = resolve_device(args.device)
    methods = resolve_methods(args.methods, first=REFERENCE)
    untrained = [m for m in methods if not METHODS.get(m).trains]
    if untrained:  # a training step is what perf measures; these have none
        print(f"not measured (no training step): {', '.join(untrained)}")
        methods = [m for m in methods if m not in untrained]
    keys = ["test"] if args.tiny_test else (["tiny", "default"] if args.network == "both" else [args.network])
    specs = [network_spec(k, device, args.patch, args.batch) for k in keys]
    d = default_settings(device)
    steps = args.steps if args.steps is not None else d["steps"]
    warmup = args.warmup if args.warmup is not None else d["warmup"]
    reps = args.selection_reps if args.selection_reps is not None else d["selection_reps"]
    memory_reps = args.memory_reps if args.memory_reps is not None else d["memory_reps"]
    for s in specs:
        print(f"{s.key} network: patch {'x'.join(map(str, s.patch))}, batch {s.batch}")
    print(f"methods ({len(methods)}): {', '.join(methods)}; {steps} timed rounds, {warmup} warm-up steps")
    report = run_perf(specs, device, methods, steps, warmup, reps, seed=args.seed, memory_reps=memory_reps)
    files = write_report(report, args.out, suffix="-tiny-test" if args.tiny_test else "")
    run_id = log_report(report, files, args.tracking_uri)
    print()
    print(render_text(report))
    print(f"\nwritten: {files[0]}, {files[1]}; MLflow run {run_id} (kind=perf)")
    return 0
