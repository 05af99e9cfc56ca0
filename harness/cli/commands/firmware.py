"""``harness firmware list``: the firmware builds and the pairs their descriptors name."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from harness.cli import command, emit_json, register_parser


@command("firmware")
def _firmware(args: argparse.Namespace) -> int:
    from harness.inventory.firmware import all_firmware
    from harness.inventory.provision import no_provisioning

    with no_provisioning():  # a listing fetches nothing
        builds = all_firmware(args.arch)
    if not builds:
        print(f"harness firmware: error: no {args.arch} firmware build is provisioned; "
              "`harness provision` fetches the catalogue's", file=sys.stderr)  # fmt: skip
        return 2
    if args.json:
        emit_json([b.to_json() for b in builds])
        return 0
    for b in builds:
        print(f"{b.key}  {b.package} {b.debian_version}  {b.prefix}")
        for d in b.candidates():
            what = "synthesized" if d.synthesized else d.name
            sb = " secure-boot" if d.secure_boot else ""
            print(
                f"  {what:38} {d.mode:9} {d.flash_size // (1024 * 1024)} MiB{sb}: "
                f"{d.code.name} + {d.nvram_template.name if d.nvram_template else '-'}"
            )
    return 0


@register_parser
def _add_firmware(sub: Any) -> None:
    p = sub.add_parser("firmware", help="firmware builds and their descriptors")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="every firmware build and its (code, vars) pairs")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.add_argument("--arch", default="x86_64",
                    help="guest architecture: x86_64 (OVMF, default) or aarch64 (AAVMF)")
