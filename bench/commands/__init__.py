"""One module per ``bench`` sub-command; each defines ``register(subparsers)``.

Options shared by several commands live here."""


def add_budget_selection(p) -> None:
    """``--iterations`` / ``--params``: pick one budget from collected results (unequal ones are refused)."""
    p.add_argument("--iterations", type=int, default=None,
                   help="only results trained for this many iterations (methods are compared at equal budgets; "
                        "results of different budgets are refused)")
    p.add_argument("--params", choices=["default", "tuned"], default=None,
                   help="only results with default or only with tuned hyper-parameters (tuned and untuned "
                        "methods are not compared)")
