"""One module per ``bench`` sub-command; each defines ``register(subparsers)``.

Options shared by several commands live here; numeric ones are checked by ``bench.options``."""
from bench.options import positive_int


def add_budget_selection(p) -> None:
    """``--iterations`` / ``--params``: pick one budget from collected results (unequal ones are refused)."""
    p.add_argument("--iterations", type=positive_int, default=None,
                   help="only results trained for this many iterations (methods are compared at equal budgets; "
                        "results of different budgets are refused)")
    p.add_argument("--params", choices=["default", "tuned"], default=None,
                   help="only results with default or only with tuned hyper-parameters (tuned and untuned "
                        "methods are not compared)")
    p.add_argument("--foundation", default=None, metavar="NAME|SHA256-PREFIX",
                   help="only results fine-tuned from this foundation (results of different checkpoints "
                        "are not compared)")
    p.add_argument("--protocol", default=None, metavar="VERSION",
                   help="only results of this protocol version (different versions are not compared)")


def budget_selection(args) -> dict:
    """The keyword arguments of ``bench.results.load_results`` / ``select_budget`` for these options."""
    return {"iterations": args.iterations, "params": args.params, "foundation": args.foundation,
            "protocol_version": args.protocol}
