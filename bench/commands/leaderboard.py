"""``bench leaderboard``: regenerate ``leaderboards/`` from tracked results, never by hand."""
from __future__ import annotations

import sys

from bench.commands import add_budget_selection, budget_selection


def register(sub) -> None:
    p = sub.add_parser("leaderboard", help="regenerate the leaderboards (markdown, csv, png, html page)",
                       description="Collect result.json files into the results snapshot CSV, then render "
                                   "one leaderboard per dataset and foundation from that snapshot (<dataset>; "
                                   "another foundation's <dataset>@<foundation>). With --from-snapshot, "
                                   "render from the committed snapshot only: regenerating what is committed "
                                   "gives no diff. The HTML page embeds the figures of a `bench report` "
                                   "directory <dataset>-report/ under --reports when there is one.")
    p.add_argument("--results", nargs="+", default=None, metavar="DIR_OR_CSV",
                   help="result directories, result.json files or CSVs (default: $BENCH_HOME/runs)")
    p.add_argument("--snapshot", default="leaderboards/results.csv", help="results snapshot CSV")
    p.add_argument("--out", default="leaderboards", help="output directory (default: leaderboards)")
    p.add_argument("--reports", default=None, metavar="DIR",
                   help="where <name>-report/ directories of `bench report` are (default: --out; <name>: the "
                        "leaderboard's, e.g. phantom or phantom@phantom-stunet-v1); their "
                        "figures are embedded in the HTML page")
    p.add_argument("--from-snapshot", action="store_true",
                   help="render from --snapshot without collecting results")
    add_budget_selection(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from bench.home import bench_home
    from bench.leaderboard import write_leaderboards
    from bench.results import load_results, read_snapshot, select_budget, write_snapshot

    if not args.from_snapshot:
        sources = args.results or [bench_home() / "runs"]
        df = load_results(sources, **budget_selection(args))
        if df.empty:
            raise ValueError(f"no test-set results found in {', '.join(map(str, sources))}; "
                             "run `bench run` first, or use --from-snapshot")
        print(f"snapshot: {write_snapshot(df, args.snapshot)} ({len(df)} case rows)")
    df = select_budget(read_snapshot(args.snapshot), **budget_selection(args))

    def warn(msg):  # freshly collected results outdate the reports: say so, write the pages without them
        print(f"bench leaderboard: warning: {msg}", file=sys.stderr)

    for path in write_leaderboards(df, args.out, reports=args.reports,
                                   stale_report=None if args.from_snapshot else warn):
        print(f"wrote {path}")
    return 0
