"""``bench report``: statistics report (tables, tests, figures) from collected results."""
from __future__ import annotations

from bench.commands import add_budget_selection, budget_selection


def register(sub) -> None:
    p = sub.add_parser("report", help="write the statistics report (paired tests, CIs, ranks, figures)",
                       description="Collect result.json files (or a results snapshot CSV), run the paired "
                                   "statistics per dataset and shots, and write report.md with tables and "
                                   "figures. Optionally log it to MLflow as a 'report' run.")
    p.add_argument("--dataset", default=None, help="only this dataset (default: every dataset found)")
    p.add_argument("--reference", default="dgst", help="method the others are tested against (default dgst)")
    p.add_argument("--results", nargs="+", default=None, metavar="DIR_OR_CSV",
                   help="result directories, result.json files or snapshot CSVs (default: $BENCH_HOME/runs)")
    p.add_argument("--out", default=None, help="output directory (default: $BENCH_HOME/reports/<timestamp>)")
    p.add_argument("--tracking-uri", default=None, help="also log the report to this MLflow tracking URI")
    add_budget_selection(p)
    p.set_defaults(func=main)


def main(args) -> int:
    import time

    from bench.home import bench_home
    from bench.report import write_report
    from bench.results import load_results

    sources = args.results or [bench_home() / "runs"]
    df = load_results(sources, **budget_selection(args))
    if df.empty:
        raise ValueError(f"no test-set results found in {', '.join(map(str, sources))}; run `bench run` first")
    out = args.out or bench_home() / "reports" / time.strftime("%Y%m%d-%H%M%S")
    path = write_report(df, out, dataset=args.dataset, reference=args.reference, tracking=args.tracking_uri)
    print(f"report: {path}")
    if args.tracking_uri:
        print(f"logged to MLflow at {args.tracking_uri} (run tag kind=report)")
    return 0
