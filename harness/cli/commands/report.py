"""``harness report merge DIR...`` (join shards) and ``harness report html DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.cli import command, register_parser


@register_parser
def _parser(sub: Any) -> None:
    p = sub.add_parser("report", help="merge shards' results, re-render a report")
    rsub = p.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    m = rsub.add_parser("merge", help="join shards' result directories into one")
    m.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    m.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="merged results directory (default: results/<timestamp>)")
    h = rsub.add_parser("html", help="re-render DIR/report.html from DIR/results.json")
    h.add_argument("dir", type=Path, metavar="DIR")


@command("report")
def _report(args: argparse.Namespace) -> int:
    from harness.nightly import report
    from harness.nightly import runner as nightly

    if args.report_command == "merge":
        out = args.out or nightly.new_results_dir(Path("results"))
        results = report.merge(args.dirs, out)
    else:
        results = report.load_results(args.dir)
        report.write_all(args.dir, results)
        out = args.dir
    for line in report.summary_lines(results):
        print(line)
    print(f"  {out / report.REPORT_HTML}")
    return 1 if results["summary"].get("failed") or results["summary"].get("error") else 0
