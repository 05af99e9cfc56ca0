"""``harness snapshots``: the fast-start snapshot cache (list, prune, clear)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from harness.cli import command, emit_json, register_parser

DEFAULT_PRUNE_DAYS = 14.0


@register_parser
def _parser(sub: Any) -> None:
    p = sub.add_parser(
        "snapshots",
        help="list, prune or clear the saved guests fast start restores from",
        description="Fast start restores guests from snapshots under <cache>/snapshots, one per "
        "(image, QEMU build, firmware, spec); a changed input makes a new one, so the cache "
        "only grows unless pruned.",
    )
    ssub = p.add_subparsers(dest="snapshots_command", required=True, metavar="ACTION")
    ls = ssub.add_parser("list", help="every snapshot, least recently used first")
    ls.add_argument("--json", action="store_true", help="print JSON")
    pr = ssub.add_parser("prune", help="remove snapshots not restored for DAYS days, invalid ones, "
                         "those of an older snapshot format, and what crashed runs left")  # fmt: skip
    pr.add_argument("--older-than", type=float, default=DEFAULT_PRUNE_DAYS, metavar="DAYS",
                    help=f"days since a snapshot's last restore (default {DEFAULT_PRUNE_DAYS:g})")
    pr.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    ssub.add_parser("clear", help="remove every snapshot (the next fast starts make them again)")


def _size(n: int) -> str:
    return f"{n / (1 << 20):.0f} MB"


@command("snapshots")
def _snapshots(args: argparse.Namespace) -> int:
    from harness import snapshots
    from harness.errors import ConfigError

    action = args.snapshots_command
    if action == "list":
        entries = snapshots.entries()
        if args.json:
            emit_json([{"key": e.key, "path": str(e.path), "valid": e.valid, "bytes": e.bytes_used,
                        "last_used": e.last_used, "qemu": e.qemu, "machine": e.machine}
                       for e in entries])  # fmt: skip
            return 0
        now = time.time()
        for e in entries:
            age = (now - e.last_used) / 86400
            print(f"{e.key}  {_size(e.bytes_used):>8}  used {age:5.1f} d ago  QEMU {e.qemu} {e.machine}"
                  f"{'' if e.valid else '  (invalid)'}")  # fmt: skip
        total = sum(e.bytes_used for e in entries)
        print(f"{len(entries)} snapshots, {_size(total)} in {snapshots.snapshots_dir()}")
        return 0
    if action == "prune":
        if args.older_than < 0:
            raise ConfigError(f"--older-than must be a number of days >= 0, got {args.older_than:g}")
        removed = snapshots.prune(args.older_than * 86400, dry_run=args.dry_run)
        for p in removed:
            print(("would remove " if args.dry_run else "removed ") + str(p))
        print(f"{len(removed)} {'would be ' if args.dry_run else ''}removed")
        return 0
    print(f"removed {snapshots.clear()} snapshots")
    return 0
