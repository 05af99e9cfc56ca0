"""The ``harness`` command: argument parsing only; the work is done by the library.

Conventions every command follows (also in ``harness --help``):

- ``--json`` prints JSON on stdout (and nothing else there); ``--out FILE`` writes a file.
- Exit status: 0 ok; 1 a check, scenario or test failed; 2 usage, configuration or
  environment error (one line on stderr, no traceback); 130 interrupted; 70 an internal
  error of the harness (a traceback: please report it).
- Listing and diagnostic commands (``doctor``, ``firmware list``, ``nightly --list``,
  ``images list``) fetch and build nothing: they say what is missing and which command
  provides it."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
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


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 70, 130

EPILOG = """\
conventions:
  --json          JSON on stdout (progress, if any, on stderr); --out FILE writes a file
  exit status     0 ok, 1 a check/scenario/test failed, 2 usage, configuration or
                  environment error (one line), 130 interrupted, 70 internal error (a bug)
  listings        doctor, firmware list, nightly --list and images list fetch nothing;
                  they name what is missing and the command that provides it
first steps:
  harness doctor                   what this host has and lacks
  harness install-qemu-machine     qemu.machine into this Python (not on PyPI)
  harness provision                the catalogue's QEMU and OVMF builds
"""


def version() -> str:
    """The installed package's version."""
    from importlib import metadata

    try:
        return metadata.version("qemu-survival-harness")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``--version``: the installed package's version, looked up only when asked for
    (importlib.metadata costs every command 40 ms)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()


def write_json_file(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file renamed into place)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
    from harness.inventory import catalog
    from harness.inventory.provision import Provisioner

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


# --- install-qemu-machine -------------------------------------------------------------


@command("install-qemu-machine")
def _install_qemu_machine(args: argparse.Namespace) -> int:
    import subprocess

    from harness.guest.qemu_process import qemu_machine_missing
    from harness.inventory import catalog
    from harness.inventory.provision import Provisioner

    if qemu_machine_missing() is None and not args.force:
        print(f"qemu.machine is already installed in {sys.executable}")
        return EXIT_OK
    import tempfile

    src = Provisioner(catalog.default()).ensure_python_source() / "python"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", str(src)]
    print(f"installing qemu.machine from {src} into {sys.executable}", flush=True)
    with tempfile.TemporaryDirectory(prefix="hv-pip-") as tmp:
        # QEMU's setup.py imports pkg_resources, which setuptools 75+ no longer has: the
        # isolated build environment gets an older setuptools (pip's constraint variables
        # reach the build-dependency install, the old name and the new one)
        constraint = Path(tmp) / "constraints.txt"
        constraint.write_text("setuptools<75\n")
        env = {**os.environ, "PIP_CONSTRAINT": str(constraint),
               "PIP_BUILD_CONSTRAINT": str(constraint)}  # fmt: skip
        proc = subprocess.run(cmd, check=False, env=env)
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    why = qemu_machine_missing()
    if why is not None:
        raise HarnessError(f"pip installed {src}, but {why}")
    return EXIT_OK


def _add_install_qemu_machine(sub: Any) -> None:
    p = sub.add_parser(
        "install-qemu-machine",
        help="install qemu.machine (not on PyPI) into this Python from Debian's QEMU source",
    )
    p.add_argument("--force", action="store_true", help="reinstall even when importable")


# --- parser --------------------------------------------------------------------------

_PARSER_BUILDERS: list[Callable[[Any], None]] = [_add_provision, _add_install_qemu_machine]


def register_parser(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    """Register a function that adds a subparser."""
    _PARSER_BUILDERS.append(fn)
    return fn


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Boot real QEMU guests; prove state, varstore and boot order survive.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _load_command_modules()
    for fn in _PARSER_BUILDERS:
        fn(sub)
    return parser


def _load_command_modules() -> None:
    # Each command family lives in its own module under harness.cli.commands; importing it
    # registers its parser and handler.
    import importlib
    import pkgutil

    import harness.cli.commands as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"harness.cli.commands.{info.name}")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """For the duration, SIGTERM and SIGHUP raise KeyboardInterrupt like Ctrl-C does, so
    every command's ``finally`` blocks run: children it owns are stopped and its private
    directories removed on the way out."""

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    import threading

    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's
        yield
        return
    previous = {sig: signal.signal(sig, terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
        with sigterm_interrupts():
            return handler(args)
    except HarnessError as exc:
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a file named on the command line, a full disk, a permission
        print(f"harness {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"harness {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"harness {args.command}: internal error (a bug in the harness; the traceback "
              "above says where)", file=sys.stderr)  # fmt: skip
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
