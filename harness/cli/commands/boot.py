"""``harness boot``: boot a guest and run a command in it, like a user trying a build."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

from harness.cli import command, emit_json, register_parser
from harness.errors import ConfigError
from harness.inventory.catalog import DEFAULT_FIRMWARE, DEFAULT_QEMU


@register_parser
def _parser(sub: Any) -> None:
    p = sub.add_parser("boot", help="boot a guest and run a command in it over SSH")
    p.add_argument("--qemu", default=DEFAULT_QEMU, metavar="VERSION", help=f"QEMU build (default {DEFAULT_QEMU})")
    p.add_argument("--ovmf", default=DEFAULT_FIRMWARE, metavar="VERSION",
                   help="OVMF build, or 'none' for SeaBIOS with a direct kernel boot")
    p.add_argument("--image", default="minimal", help="guest image (default minimal)")
    p.add_argument("--arch", default="x86_64", help="guest architecture")
    p.add_argument("--machine", default=None, help="machine type (e.g. pc-q35-7.2)")
    p.add_argument("--memory", type=int, default=None, metavar="MIB")
    p.add_argument("--boot", choices=["uefi", "direct"], default=None)
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    p.add_argument("--secure-boot", action="store_true",
                   help="the firmware's Secure Boot build (SMM on x86), snakeoil keys, the image signed")
    p.add_argument("--unsigned", action="store_true", help="with --secure-boot: boot the image unsigned (refused)")
    p.add_argument("--tpm", action="store_true", help="attach a vTPM (swtpm)")
    p.add_argument("--json", action="store_true", help="print {ready_s, boot_id, accel, qemu, ovmf, output}")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND to run in the guest")


@command("boot")
def _boot(args: argparse.Namespace) -> int:
    from harness.factory import MachineFactory
    from harness.spec import VmSpec

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    fields: dict[str, Any] = {"qemu": args.qemu, "image": args.image, "arch": args.arch,
                              "accel": args.accel}  # fmt: skip
    if args.ovmf.lower() == "none":
        fields.update(firmware=None, boot="direct")
    else:
        fields["firmware"] = args.ovmf
    if args.boot:
        fields["boot"] = args.boot
    if args.machine:
        fields["machine"] = args.machine
    if args.memory:
        fields["memory_mb"] = args.memory
    if args.secure_boot:
        fields.update(secure_boot=True, sb_signed=not args.unsigned)
    elif args.unsigned:
        raise ConfigError("--unsigned: only with --secure-boot")
    if args.tpm:
        fields["tpm"] = True
    t0 = time.monotonic()
    with MachineFactory(VmSpec(**fields)) as factory:
        vm = factory()
        ready = time.monotonic() - t0
        res = vm.ssh.run(shlex.join(cmd), timeout=600) if cmd else None
        out = {
            "ready_s": round(ready, 3),
            "boot_id": vm.ready.boot_id if vm.ready else None,
            "accel": vm.accel,
            "qemu": vm.build.capabilities.version,
            "ovmf": None if args.ovmf.lower() == "none" else args.ovmf,
            "image": args.image,
            "arch": args.arch,
            "output": res.stdout if res else "",
            "stderr": res.stderr if res else "",
            "rc": res.rc if res else 0,
        }
    if args.json:
        emit_json(out)
    else:
        sys.stdout.write(str(out["output"]))
        sys.stderr.write(str(out["stderr"]))
        print(f"booted QEMU {out['qemu']} ({out['accel']}) to SSH in {ready:.1f} s", file=sys.stderr)
    return int(out["rc"])
