"""``harness throttle``: run a command on a share of the machine's CPUs (a cgroup quota),
to measure the suite, the nightly or the benchmarks as a slower machine would."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from harness.cli import command, register_parser, write_json_file


@register_parser
def _parser(sub: Any) -> None:
    p = sub.add_parser(
        "throttle",
        help="run a command with its CPU time capped at a share of the machine's CPUs",
        description="Run COMMAND (and everything it starts) in a cgroup whose CPU quota is "
        "SHARE of the machine's CPUs, then print what it used.  `make test-halved`, "
        "`make bench-halved` and `make nightly-halved` use it with 0.5.",
    )
    p.add_argument("--cpu-share", type=float, default=0.5, metavar="SHARE",
                   help="fraction of the machine's CPU time the command may use (default 0.5)")
    p.add_argument("--out", metavar="FILE", help="write the summary as JSON to FILE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the command to run")


@command("throttle")
def _throttle(args: argparse.Namespace) -> int:
    from harness.errors import ConfigError
    from harness.guest import cpu_share

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ConfigError("harness throttle: no command given (harness throttle --cpu-share 0.5 -- COMMAND ...)")
    try:
        rc, usage, wall = cpu_share.run(cmd, args.cpu_share)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    cpus = os.cpu_count() or 1
    summary = {
        "command": cmd, "cpu_share": args.cpu_share, "cpus": cpus, "exit_code": rc,
        "wall_s": round(wall, 1), "cpu_s": round(usage.cpu_s, 1),
        "throttled_periods": usage.throttled_periods, "throttled_s": round(usage.throttled_s, 1),
    }  # fmt: skip
    print(f"harness throttle: {shlex.join(cmd)}: exit {rc}, {wall:.0f} s wall, {usage.cpu_s:.0f} s CPU "
          f"on a share of {args.cpu_share:g} of {cpus} CPUs (held back {usage.throttled_s:.1f} s in "
          f"{usage.throttled_periods} periods)", file=sys.stderr)  # fmt: skip
    if args.out:
        write_json_file(Path(args.out), summary)
    return rc if rc >= 0 else 128 - rc
