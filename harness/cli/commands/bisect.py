"""``harness bisect``: the first build on which a scenario fails, over an ordered list."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from harness.cli import command, emit_json, register_parser, write_json_file


@register_parser
def _parser(sub: Any) -> None:
    p = sub.add_parser(
        "bisect", help="find the first build (of an ordered list) on which a scenario fails",
        description="Bisect SCENARIO over --builds (in order, oldest first). Builds are "
                    "catalogue versions, registered labels (src:..., deb:...) or paths; "
                    "--qemu-deb/--qemu-dir/--ovmf-deb register more first.",
    )  # fmt: skip
    p.add_argument("--scenario", required=True, help="scenario name (see harness repro --help)")
    p.add_argument("--good", required=True, metavar="LABEL", help="a build the scenario passes on")
    p.add_argument("--bad", required=True, metavar="LABEL", help="a build the scenario fails on")
    p.add_argument("--builds", nargs="+", required=True, metavar="LABEL",
                   help="the ordered builds to search (must include --good and --bad)")
    p.add_argument("--peer", action="append", default=[], metavar="LABEL",
                   help="other --qemu builds the scenario gets after the tested one "
                        "(e.g. a migration destination)")
    p.add_argument("--ovmf", action="append", default=[], metavar="VERSION", help="OVMF build")
    p.add_argument("--cycles", type=int, default=1, help="scenario cycles per run (default 1)")
    p.add_argument("--no-verify-ends", action="store_true",
                   help="trust --good and --bad instead of running them first")
    p.add_argument("--qemu-deb", action="append", default=[], type=Path, metavar="FILE")
    p.add_argument("--qemu-dir", action="append", default=[], type=Path, metavar="DIR")
    p.add_argument("--ovmf-deb", action="append", default=[], type=Path, metavar="FILE")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/bisect"))
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON on stdout (progress goes to stderr)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="write the result as JSON to FILE")


@command("bisect")
def _bisect(args: argparse.Namespace) -> int:
    from harness.errors import ConfigError
    from harness.inventory import registry
    from harness.nightly import bisect

    if args.cycles < 1:
        raise ConfigError(f"--cycles {args.cycles}: expected a positive number")
    if args.qemu_deb or args.qemu_dir or args.ovmf_deb:
        reg = registry.register_from_options(args)
        print(f"registered: {', '.join(reg.qemu + reg.firmware)} ({reg.path})", file=sys.stderr)
    run = bisect.scenario_runner(args.scenario, peers=args.peer, ovmf=args.ovmf,
                                 cycles=args.cycles, artifacts=args.artifacts)  # fmt: skip

    def show(label: str) -> Any:
        got = run(label)
        outcome, detail = got if isinstance(got, tuple) else (got, "")
        print(f"{outcome.value:<5} {label}  {detail[:160]}", flush=True,
              file=sys.stderr if args.json else sys.stdout)
        return got

    result = bisect.bisect(args.builds, args.good, args.bad, show, scenario=args.scenario,
                           verify_ends=not args.no_verify_ends)  # fmt: skip
    if args.out:
        write_json_file(args.out, result.to_json())
    if args.json:
        emit_json(result.to_json())
    print(result.summary(), file=sys.stderr if args.json else sys.stdout)
    return 0 if result.conclusive else 1
