"""``harness doctor``: what the harness will use on this host, and why."""

from __future__ import annotations

import argparse
from typing import Any

from harness.cli import command, emit_json, register_parser


@register_parser
def _parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="report accelerator, KVM, QEMU and firmware builds, tools "
                       "and what is missing (fetches nothing; exit 2 when a guest cannot boot)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])


@command("doctor")
def _doctor(args: argparse.Namespace) -> int:
    from harness.cli.doctor import report

    data = report(args.accel)
    if args.json:
        emit_json(data)
    else:
        print(render(data))
    return 0 if data["can_boot"] else 2


def render(data: dict[str, Any]) -> str:
    lines = [
        f"accelerator: {data['accel']['chosen']} ({data['accel']['reason']})",
        "kvm: present={present} usable={usable} nested={nested} ({reason})".format(**data["kvm"]),
        "qemu builds:",
    ]
    for q in data["qemu"]:
        if "error" in q:
            lines.append(f"  {q['label']} ({q['arch']}): ERROR {q['error']}")
            continue
        if "not_provisioned" in q:
            lines.append(f"  {q['label']} ({q['arch']}): not provisioned")
            continue
        if not q.get("probed", True):
            lines.append(f"  {q['label']} ({q['arch']}): {q['path']} (not probed: no qemu.machine)")
            continue
        modes = ",".join(q["migration_modes"])
        lines.append(
            f"  {q['version']:<8} {q['path']}  [{q['source']}] modes={modes} "
            f"file_uri={q['file_uri']} machine_types={len(q['machine_types'])}"
        )
    lines.append("firmware builds:")
    for f in data["firmware"]:
        if "error" in f:
            lines.append(f"  {f['version']} ({f['arch']}): ERROR {f['error']}")
            continue
        if "not_provisioned" in f:
            lines.append(f"  {f['version']} ({f['arch']}): not provisioned")
            continue
        lines.append(
            f"  {f['version']:<8} code={f['code']} vars={f['vars_template']} "
            f"flash={f['flash_size'] // (1024 * 1024)}M"
        )
    for line in data["missing"]:
        lines.append(f"missing: {line}")
    lines.append("can boot: " + ("yes" if data["can_boot"] else "NO"))
    return "\n".join(lines)
