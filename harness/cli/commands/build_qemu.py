"""``harness build-qemu SRC``: build QEMU x86_64-softmmu from source and register it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from harness.cli import command, emit_json, register_parser


@register_parser
def _parser(sub: Any) -> None:
    p = sub.add_parser(
        "build-qemu", help="build QEMU (x86_64-softmmu) from a source tree or tarball",
        description="Build QEMU from a source tree or tarball, optionally patched, cached by a "
                    "hash of source + patches + configure arguments; the result is registered "
                    "as a build labelled src:VERSION+HASH8 (usable as --qemu LABEL).",
    )  # fmt: skip
    p.add_argument("src", type=Path, nargs="?", default=None,
                   help="QEMU source tree or tarball (e.g. qemu_10.0.2+ds.orig.tar.xz)")
    p.add_argument("--patch", type=Path, action="append", default=[], metavar="FILE",
                   help="patch to apply with patch -p1 (repeatable, applied in order)")
    p.add_argument("--configure-args", default="", metavar="ARGS",
                   help="extra configure arguments, space separated (quote them: "
                        "--configure-args='--enable-debug')")
    p.add_argument("--jobs", type=int, default=None, help="make -j (default: CPU count)")
    p.add_argument("--no-install-deps", action="store_true",
                   help="do not apt-get install missing build dependencies; fail instead")
    p.add_argument("--deps-only", action="store_true",
                   help="only install the build dependencies (make build-deps)")
    p.add_argument("--list", action="store_true", help="list cached source builds")
    p.add_argument("--json", action="store_true", help="print the build record as JSON")


@command("build-qemu")
def _build_qemu(args: argparse.Namespace) -> int:
    from harness.errors import ConfigError
    from harness.inventory import sources

    if args.deps_only:
        installed = sources.install_build_deps()
        print("installed: " + (" ".join(installed) or "nothing (all present)"))
        print("tools venv: " + str(sources.tools_python()))
        return 0
    if args.list:
        records = [b.to_json() for b in sources.cached_builds()]
        if args.json:
            emit_json(records)
        for rec in records if not args.json else []:
            print(f"{rec['label']:<24} {rec['build_s']:>7.0f} s  {rec['binary']}")
        return 0
    if args.src is None:
        raise ConfigError("build-qemu: give a source tree or tarball (or --list / --deps-only)")
    print(f"building QEMU from {args.src} (cached by source + patches + args) ...",
          file=sys.stderr, flush=True)  # fmt: skip
    build = sources.build_qemu(
        args.src, args.patch, args.configure_args.split(),
        install_deps=not args.no_install_deps, jobs=args.jobs,
    )
    if args.json:
        emit_json(build.to_json())
    else:
        print(f"{build.label}: {build.binary}")
        print(f"  configure {build.configure_s:.0f} s, make {build.build_s:.0f} s;"
              f" use it as --qemu {build.label}")  # fmt: skip
    return 0
