"""``harness varstore show FILE`` and ``harness varstore diff A B``."""

from __future__ import annotations

import argparse
from typing import Any

from harness.cli import command, emit_json, register_parser


@command("varstore")
def _varstore(args: argparse.Namespace) -> int:
    from harness import varstore

    if args.action == "show":
        model = varstore.read_varstore(args.file)
        if args.json:
            emit_json(model.to_json())
        else:
            print(model)
        return 0
    result = varstore.diff(varstore.read_varstore(args.a), varstore.read_varstore(args.b))
    if args.json:
        emit_json(result.to_json())
    else:
        print(result)
    # Like diff(1): 1 when the varstores differ.
    return 1 if result else 0


@register_parser
def _add_varstore(sub: Any) -> None:
    p = sub.add_parser("varstore", help="read and compare OVMF varstore files")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="Boot entries, BootOrder and other variables")
    show.add_argument("file", help="a raw edk2 varstore (OVMF_VARS*.fd or a guest's copy)")
    show.add_argument("--json", action="store_true", help="print JSON")
    d = actions.add_parser("diff", help="variables added, removed, changed from A to B")
    d.add_argument("a", help="the before varstore")
    d.add_argument("b", help="the after varstore")
    d.add_argument("--json", action="store_true", help="print JSON")
