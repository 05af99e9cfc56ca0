"""The ``harness`` command: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from harness.errors import HarnessError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Register a subcommand handler."""

    def wrap(fn: Handler) -> Handler:
        _COMMANDS[name] = fn
        return fn

    return wrap


def emit_json(data: Any) -> None:
    """Print ``data`` as JSON on stdout."""
    try:
        json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `harness ... --json | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit


# --- provision -----------------------------------------------------------------------


@command("provision")
def _provision(args: argparse.Namespace) -> int:
    from harness import catalog
    from harness.provision import Provisioner

    prov = Provisioner(catalog.default())
    if args.python_source:
        print(prov.ensure_python_source())
        return 0
    for key, prefix in prov.ensure_all().items():
        print(f"{key}: {prefix}")
    return 0


def _add_provision(sub: Any) -> None:
    p = sub.add_parser("provision", help="fetch and unpack the catalogue's QEMU and OVMF builds")
    p.add_argument(
        "--python-source",
        action="store_true",
        help="only fetch QEMU's python/ tree (for qemu.machine) and print its path",
    )


# --- parser --------------------------------------------------------------------------

_PARSER_BUILDERS: list[Callable[[Any], None]] = [_add_provision]


def register_parser(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """Register a function that adds a subparser."""
    _PARSER_BUILDERS.append(fn)
    return fn


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Boot real QEMU guests; prove state, varstore and boot order survive.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _load_command_modules()
    for fn in _PARSER_BUILDERS:
        fn(sub)
    return parser


def _load_command_modules() -> None:
    # Each command family lives in its own module under harness.commands; importing it
    # registers its parser and handler.
    import importlib
    import pkgutil

    import harness.commands as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"harness.commands.{info.name}")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """For the duration, SIGTERM raises KeyboardInterrupt like Ctrl-C does, so children a
    command owns (``nightly.owned_process``) are stopped on the way out."""

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("harness").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    handler = _COMMANDS[args.command]
    try:
        return handler(args)
    except HarnessError as exc:
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"harness {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
