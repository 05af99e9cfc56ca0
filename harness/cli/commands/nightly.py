"""``harness nightly``: the full scenario matrix through pytest with xdist, into
``results/<timestamp>/`` (junit.xml, results.json, report.html)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from harness.cli import command, register_parser, sigterm_interrupts


@register_parser
def _parser(sub: Any) -> None:
    from harness.nightly import runner as nightly

    kinds = sorted({k.scenario for k in nightly.DEFAULT_KINDS})
    p = sub.add_parser(
        "nightly", help="run the full scenario matrix and write results/<timestamp>/",
        description="Runs every scenario of the matrix over the provisioned QEMU and OVMF "
                    "builds with pytest-xdist and writes junit.xml, results.json and "
                    "report.html.  Scenarios: " + ", ".join(kinds),
    )  # fmt: skip
    p.add_argument("--qemu", action="append", default=[], metavar="VERSION",
                   help="QEMU builds (repeatable; a version, registered label or path; default: all)")
    p.add_argument("--ovmf", action="append", default=[], metavar="VERSION",
                   help="OVMF builds (repeatable; default: all)")
    p.add_argument("--scenario", action="append", default=[], metavar="NAME",
                   help="only these scenario families (repeatable or comma separated)")
    p.add_argument("--full", action="store_true",
                   help="every ordered cross-version pair (default: neighbours in version order "
                        "and every build with the newest)")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run shard K of N (deterministic) of what the rotation selected")
    p.add_argument("--rotation", type=int, default=None, metavar="N",
                   help=f"spread the matrix over N nights: each night its core (every family on the "
                        f"newest QEMU, default firmware) and 1/N of the rest (default {nightly.DEFAULT_ROTATION} "
                        "for the default matrix; 1 = everything, the default when narrowed by --scenario/--qemu/--ovmf/--full "
                        "or split by --shard)")
    p.add_argument("--night", default=None, metavar="YYYY-MM-DD",
                   help="the night the rotation is computed for (default today, UTC): replays a night's share")
    p.add_argument("--results", type=Path, default=None, metavar="DIR",
                   help="results directory (default: results/<timestamp>)")
    p.add_argument("--results-root", type=Path, default=Path("results"), metavar="DIR",
                   help="where results/<timestamp> directories go (default: results)")
    p.add_argument("--jobs", "-j", type=int, default=nightly.DEFAULT_JOBS,
                   help=f"pytest-xdist workers (default {nightly.DEFAULT_JOBS}; 0 = no xdist)")
    p.add_argument("--cycles", type=int, default=nightly.DEFAULT_CYCLES,
                   help=f"cycles of back-to-back scenarios (default {nightly.DEFAULT_CYCLES})")
    p.add_argument("--timeout", type=float, default=nightly.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="stop the run after this long (default 3 h)")
    p.add_argument("--qemu-deb", action="append", default=[], metavar="FILE.deb",
                   help="register QEMU packages as a build (distro validation)")
    p.add_argument("--ovmf-deb", action="append", default=[], metavar="FILE.deb",
                   help="register an OVMF package as a build (distro validation)")
    p.add_argument("--qemu-dir", action="append", default=[], metavar="DIR",
                   help="register a QEMU build directory or unpacked packages")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="a setting for every scenario row, as `harness repro --set` takes it (fast=1: "
                        "guests restored from a saved boot instead of booting cold; the boot rows "
                        "always boot cold)")
    p.add_argument("--pytest-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for pytest (repeatable)")
    p.add_argument("--list", action="store_true",
                   help="print the matrix (this shard's entries) and exit without running it")
    # a deliberate failure for the harness's own tests
    p.add_argument("--inject-failure", action="store_true", help=argparse.SUPPRESS)


@command("nightly")
def _nightly(args: argparse.Namespace) -> int:
    from harness.nightly import report
    from harness.nightly import runner as nightly
    from harness.scenarios import parse_settings

    reg = nightly.register_from_options(args)
    if reg is not None:
        print(f"registered: QEMU {', '.join(reg.qemu) or '-'}; OVMF {', '.join(reg.firmware) or '-'}"
              f" ({reg.path})", flush=True)  # fmt: skip
    scenarios = [s.strip() for v in args.scenario for s in v.split(",") if s.strip()]
    settings = parse_settings(args.settings)
    opts = nightly.NightlyOptions(
        results_root=args.results_root, results_dir=args.results, qemu=args.qemu,
        ovmf=args.ovmf, scenarios=scenarios, shard=args.shard, jobs=args.jobs,
        cycles=args.cycles, inject_failure=args.inject_failure, timeout_s=args.timeout,
        registrations={k: list(getattr(args, k)) for k in nightly.REGISTRATION_OPTIONS},
        argv=sys.argv[1:], pytest_args=args.pytest_arg, full=args.full,
        rotation=args.rotation, night=args.night, settings=settings,
    )  # fmt: skip

    def echo(line: str) -> None:
        print(line, flush=True)

    if args.list:
        from harness.inventory.provision import no_provisioning

        with no_provisioning():  # a listing fetches nothing: the provisioned builds only
            matrix = nightly.plan(opts)
        chosen = matrix.chosen()
        for e in chosen:
            print(f"{e.id:<55} {e.runner:<8} ~{e.cost_s:.0f} s  {' '.join(e.tests)}")
        for note in matrix.not_applicable:
            print(f"not run: {note}")
        print(f"{len(chosen)} of {len(matrix.entries)} entries, ~{sum(e.cost_s for e in chosen) / 60:.0f} "
              f"min of guest time" + (f" (shard {matrix.shard})" if matrix.shard else ""))  # fmt: skip
        if matrix.rotation:
            print(report.rotation_text(matrix.rotation))
        return 0

    with sigterm_interrupts():  # the owned pytest process group is stopped on the way out
        result = nightly.run(opts, echo)
    print()
    for line in report.summary_lines(result.results):
        print(line)
    for name in ("junit.xml", "results.json", "report.html"):
        print(f"  {result.results_dir / name}")
    if result.exit_status and not result.unexpected_failures:
        print(f"nightly: pytest exited with status {result.pytest_rc}"
              + (" (timed out)" if result.timed_out else ""), file=sys.stderr)  # fmt: skip
    return result.exit_status
