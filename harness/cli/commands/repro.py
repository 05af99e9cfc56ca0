"""``harness repro SCENARIO``: run one scenario (possibly many cycles) and report each."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from harness.cli import command, emit_json, register_parser, write_json_file


@register_parser
def _parser(sub: Any) -> None:
    from harness import scenarios

    known = scenarios.names()
    p = sub.add_parser(
        "repro", help="reproduce a scenario: back-to-back live updates, migrations, ...",
        description="Scenarios:\n" + "\n".join(f"  {k:<14} {v}" for k, v in known.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", choices=sorted(known), metavar="SCENARIO")
    p.add_argument("--qemu", action="append", default=[], metavar="VERSION",
                   help="QEMU build (repeat for source and destination builds)")
    p.add_argument("--ovmf", action="append", default=[], metavar="VERSION", help="OVMF build")
    p.add_argument("--cycles", type=int, default=1, help="consecutive updates (default 1)")
    p.add_argument("--until-fail", action="store_true",
                   help="keep cycling until a cycle fails (up to --cycles if given)")
    p.add_argument("--mode", default=None, help="scenario mode (nested: live|save-restore|cpr-reboot|cpr-transfer)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="scenario-specific setting (e.g. cpu=qemu64, parts=pairs,chains; fast=1: the guest "
                        "restored from a saved boot instead of booting cold)")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (progress goes to stderr)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="write the report as JSON to FILE")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts/repro"),
                   help="where logs are kept when a cycle fails")


def scenario_extra(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` options (a comma makes a list)."""
    from harness.scenarios import parse_settings as pairs
    from harness.scenarios import setting_value

    return {key: setting_value(value) for key, value in pairs(items)}


@command("repro")
def _repro(args: argparse.Namespace) -> int:
    from harness import scenarios
    from harness.errors import ConfigError

    if args.cycles < 1:
        raise ConfigError(f"--cycles {args.cycles}: expected a positive number")

    def show(rec: dict[str, Any]) -> None:
        tag = "ok  " if rec.get("ok") else ("XFAIL" if rec.get("expected_failure") else "FAIL")
        parts = [tag]
        if rec.get("cycle") is not None:
            parts.append(f"cycle {rec['cycle']:>3}")
        parts.append(f"{rec.get('op', '')} {rec.get('source', '')} -> {rec.get('destination', '')}")
        if rec.get("wall_s") is not None:
            parts.append(f"{rec['wall_s']:.2f} s")
        if rec.get("downtime_ms") is not None:
            parts.append(f"downtime {rec['downtime_ms']:.0f} ms")
        if rec.get("pause_s") is not None:
            parts.append(f"pause {rec['pause_s'] * 1000:.0f} ms")
        if rec.get("l2_pause_s") is not None:
            parts.append(f"L2 pause {rec['l2_pause_s'] * 1000:.0f} ms")
        if not rec.get("ok"):
            sig = rec.get("signature")
            err = (rec.get("error") or "; ".join(rec.get("problems") or []) or "").strip()
            parts.append(f"[{sig}]" if sig else "")
            parts.append(err.splitlines()[0][:200] if err else "")
        print("  ".join(p for p in parts if p), flush=True,
              file=sys.stderr if args.json else sys.stdout)

    extra = scenario_extra(args.settings)
    opts = scenarios.ScenarioOptions(
        qemu=args.qemu, ovmf=args.ovmf, cycles=args.cycles, until_fail=args.until_fail,
        mode=args.mode, artifacts=args.artifacts, on_record=show, extra=extra,
    )  # fmt: skip
    report = scenarios.get(args.scenario)(opts)
    data = report.to_json()
    if args.out:
        write_json_file(args.out, data)
    if args.json:
        emit_json(data)
    passed = sum(1 for r in report.records if r.get("ok"))
    expected = sum(1 for r in report.records if not r.get("ok") and r.get("expected_failure"))
    failed = len(report.records) - passed - expected
    print(f"{args.scenario}: {passed} passed, {failed} failed"
          + (f", {expected} expected failures (known limitation, retried)" if expected else "")
          + f" in {report.duration_s:.1f} s" + (f"; artifacts: {report.artifacts}" if report.artifacts else ""),
          file=sys.stderr)  # fmt: skip
    return 0 if report.ok else 1
