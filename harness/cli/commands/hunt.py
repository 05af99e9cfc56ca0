"""``harness hunt SCENARIO --budget SECONDS``: run a scenario again and again until a hop
fails, keep everything of the first failure, and print the command that repeats it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from harness.cli import command, register_parser


@register_parser
def _parser(sub: Any) -> None:
    from harness import scenarios

    known = scenarios.names()
    p = sub.add_parser(
        "hunt", help="hunt a rare failure: run a scenario until a hop fails (within a budget)",
        description="Runs SCENARIO repeatedly (each run as `harness repro` would) until a record "
                    "fails, keeps the first failure's artifacts under --out/failure and writes "
                    "--out/hunt.json.  Exit status 1 when something was found, 0 when not.",
    )  # fmt: skip
    p.add_argument("scenario", choices=sorted(known), metavar="SCENARIO")
    p.add_argument("--budget", type=float, required=True, metavar="SECONDS",
                   help="stop starting new runs after this long")
    p.add_argument("--max-runs", type=int, default=None, metavar="N", help="at most N runs")
    p.add_argument("--qemu", action="append", default=[], metavar="VERSION")
    p.add_argument("--ovmf", action="append", default=[], metavar="VERSION")
    p.add_argument("--cycles", type=int, default=1, help="cycles (rounds) per run")
    p.add_argument("--mode", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings")
    p.add_argument("--signature", action="append", default=[], metavar="NAME",
                   help="only a record with this signature ends the hunt (expected ones too)")
    p.add_argument("--out", type=Path, default=Path("artifacts/hunt"), metavar="DIR")


@command("hunt")
def _hunt(args: argparse.Namespace) -> int:
    from harness import scenarios, signatures
    from harness.cli.commands.repro import scenario_extra
    from harness.nightly import hunt

    for name in args.signature:
        signatures.by_name(name)  # an unknown name is a ConfigError naming the known ones
    opts = scenarios.ScenarioOptions(qemu=args.qemu, ovmf=args.ovmf, cycles=args.cycles,
                                     mode=args.mode, extra=scenario_extra(args.settings))  # fmt: skip

    def progress(n: int, report: scenarios.ScenarioReport) -> None:
        bad = sum(1 for r in report.records if not r.get("ok"))
        print(f"run {n}: {len(report.records)} hops, {bad} not ok, {report.duration_s:.0f} s", flush=True)

    result = hunt.hunt(args.scenario, opts, args.budget, args.out, signatures=args.signature,
                       max_runs=args.max_runs, on_run=progress)  # fmt: skip
    print(result.summary())
    if result.found is not None:
        print(f"artifacts: {result.artifacts or '(none saved)'}")
        print(f"repeat: {result.repeat}")
    print(f"hunt record: {args.out / 'hunt.json'}", file=sys.stderr)
    return 1 if result.found is not None else 0
