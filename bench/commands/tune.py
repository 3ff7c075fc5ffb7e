"""``bench tune``: Optuna search of a method's hyper-parameters on the tuning-validation split."""
from __future__ import annotations

from bench.options import comma_list, nonneg_int, positive_int


def register(sub) -> None:
    from bench.commands.run import add_run_arguments
    from bench.tuning import DEFAULT_REPEATS, DEFAULT_TRIALS
    p = sub.add_parser(
        "tune", help="tune a method's hyper-parameters with Optuna (tuning-validation cases only)",
        description="Search the learning rate and METHOD's own hyper-parameters with Optuna. Each trial "
                    "fine-tunes on the support cases of several protocol repeats and is scored by mean Dice "
                    "on those repeats' tuning-validation cases (never the test cases, never its own "
                    "support); unpromising trials are pruned "
                    "on the intermediate tuning pseudo-Dice. The study is stored (default: an Optuna journal "
                    "file in $BENCH_HOME/optuna/, shareable by several processes), so an interrupted tune "
                    "resumes where it stopped. The best parameters go to "
                    "$BENCH_HOME/tuned/<dataset>/<method>/shots<k>.json for `bench run --params tuned`.",
        epilog="example: bench tune --method lora --shots 3 --trials 20   then   "
               "bench run --method lora --shots 3 --params tuned")
    add_run_arguments(p)
    p.add_argument("--trials", type=positive_int, default=DEFAULT_TRIALS,
                   help=f"trial budget of the study, the same for every method (default {DEFAULT_TRIALS}); "
                        "completed and pruned trials count, failed ones do not")
    p.add_argument("--repeats", type=comma_list(nonneg_int), default=None, metavar="R[,R...]",
                   help=f"protocol repeats whose tuning sets the objective averages, e.g. 0,1 (default: the "
                        f"first {DEFAULT_REPEATS}; --repeat is not used by tune); each trial fine-tunes once "
                        f"per repeat")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: an RDB URL (postgresql://user@host/db) to share a study between "
                        "machines, or a journal file path (default: $BENCH_HOME/optuna/journal.log)")
    p.add_argument("--study-name", default=None,
                   help="default: <method>-<dataset>-<shots>shot-<protocol version>")
    p.add_argument("--tune-iterations", action="store_true",
                   help="also search the iterations per trial among 0.5x, 1x, 2x --iterations")
    p.set_defaults(func=main)


def main(args) -> int:
    from bench.quiet import show_third_party
    from bench.tuning import StudyBudget, tune
    if args.verbose:
        show_third_party()
    budget = StudyBudget(trials=args.trials, repeats=args.repeats, iterations=args.iterations,
                         tune_iterations=args.tune_iterations, eval_every=args.eval_every, optimizer=args.optimizer,
                         weight_decay=args.weight_decay, seed=args.seed, foundation=args.foundation)
    tune(args.method, dataset=args.dataset, shots=args.shots, budget=budget, storage=args.storage,
         study_name=args.study_name, device=args.device, protocol_version=args.protocol,
         tracking_uri=args.tracking_uri, verbose=args.verbose)
    return 0
