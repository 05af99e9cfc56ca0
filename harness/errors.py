"""The harness's one exception tree.

Every error the library raises derives from :class:`HarnessError`, so callers (the CLI,
the pytest plugin, avocado wrappers) can catch one type and print its message, which
always names the input, command, file or log that explains it::

    HarnessError
     +-- ConfigError            bad input: catalogue entry, spec, option, unknown version
     |    +-- UnknownVersionError   a version nobody provisioned; lists the available ones
     |    |    +-- AmbiguousVersionError  a prefix ("10.0") that matches several builds
     |    +-- CatalogError          a malformed catalogue or descriptor file
     |    +-- SpecError             a VM spec that cannot become a command line
     +-- ProvisionError         fetching or unpacking a Debian package failed
     +-- ImageBuildError        a guest image recipe failed
     +-- FirmwareError          a firmware build or descriptor is unusable
     |    +-- VarstoreError         a varstore file is missing, malformed or the wrong size
     +-- HostError              the host lacks a tool or capability
     +-- MachineError           a QEMU process misbehaved
     |    +-- LaunchError           QEMU did not start (exit code, command, log path)
     |    +-- GuestTimeout          a wait ran out (what was awaited, what was seen last)
     |    +-- GuestCommandError     a command in the guest failed when it had to succeed
     +-- UnsupportedError       a build lacks a capability (names the capability)
     +-- MigrationError         a migration or live update failed (carries the result)
     +-- StateError             a survival assertion failed (says what changed)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path


class HarnessError(Exception):
    """Base of every error raised by the harness."""


class ConfigError(HarnessError):
    """Bad input: a catalogue entry, spec, command-line option or version."""


class UnknownVersionError(ConfigError):
    """A version was asked for that is not in the catalogue or registered."""

    def __init__(self, kind: str, wanted: str, available: Iterable[str]) -> None:
        self.kind = kind
        self.wanted = wanted
        self.available = sorted(available)
        listed = ", ".join(self.available) or "none"
        super().__init__(f"unknown {kind} version {wanted!r}; available: {listed}")


class AmbiguousVersionError(UnknownVersionError):
    """A version prefix matches more than one build (``10.0``: 10.0.2 and 10.0.13)."""

    def __init__(self, kind: str, wanted: str, matching: Iterable[str],
                 available: Iterable[str]) -> None:  # fmt: skip
        self.matching = sorted(matching)
        super().__init__(kind, wanted, available)
        self.args = (
            f"{kind} version {wanted!r} is ambiguous: it matches {', '.join(self.matching)}; "
            "name one of them",
        )

    def __str__(self) -> str:
        return str(self.args[0])


class CatalogError(ConfigError):
    """A catalogue or firmware descriptor file is malformed."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class SpecError(ConfigError):
    """A VM spec cannot be turned into a QEMU command line."""


class ProvisionError(HarnessError):
    """Fetching or unpacking a build from Debian's archive failed."""


class ImageBuildError(HarnessError):
    """A guest image recipe failed."""


class FirmwareError(HarnessError):
    """A firmware build is missing or unusable."""


class VarstoreError(FirmwareError):
    """A varstore file is missing, malformed, or does not fit the firmware."""

    def __init__(self, path: Path | str, message: str) -> None:
        self.path = str(path)
        super().__init__(f"varstore {path}: {message}")


class HostError(HarnessError):
    """The host lacks a tool or capability the harness needs."""


class MachineError(HarnessError):
    """A QEMU process misbehaved."""


class LaunchError(MachineError):
    """QEMU failed to start."""

    def __init__(
        self,
        message: str,
        *,
        command: Sequence[str] = (),
        exitcode: int | None = None,
        output: str = "",
        log: Path | None = None,
    ) -> None:
        self.command = list(command)
        self.exitcode = exitcode
        self.output = output
        self.log = log
        parts = [message]
        if exitcode is not None:
            parts.append(f"exit code {exitcode}")
        if log is not None:
            parts.append(f"log: {log}")
        tail = output.strip().splitlines()[-15:]
        text = "; ".join(parts)
        if self.command:
            text += "\ncommand: " + " ".join(self.command)
        if tail:
            text += "\noutput (last lines):\n  " + "\n  ".join(tail)
        super().__init__(text)


class GuestTimeout(MachineError):
    """A wait ran out of time."""

    def __init__(self, what: str, timeout: float, last_seen: str = "") -> None:
        self.what = what
        self.timeout = timeout
        self.last_seen = last_seen
        msg = f"timed out after {timeout:.1f}s waiting for {what}"
        if last_seen:
            msg += f"; last seen: {last_seen[-500:]!r}"
        super().__init__(msg)


class BootRefused(MachineError):
    """The firmware said it will not boot the image (a Secure Boot refusal)."""

    def __init__(self, what: str, line: str, log: object) -> None:
        self.what, self.line, self.log = what, line, log
        super().__init__(f"the firmware refused to boot while waiting for {what} ({log}): {line.strip()}")


class ConsoleSilent(GuestTimeout):
    """Not one byte on the console: the guest's firmware never reached it."""

    def __init__(self, what: str, seconds: float, log: object) -> None:
        self.what, self.timeout, self.last_seen, self.log = what, seconds, "", log
        MachineError.__init__(
            self, f"no output at all on the serial console ({log}) in {seconds:.0f}s while waiting "
                  f"for {what}: the firmware hung before its console came up")  # fmt: skip


class GuestCommandError(MachineError):
    """A command run in the guest failed."""

    def __init__(self, command: str, rc: int, stdout: str, stderr: str) -> None:
        self.command = command
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"guest command {command!r} exited {rc}; stderr: {stderr.strip()[-500:]!r}"
        )


class UnsupportedError(HarnessError):
    """A build lacks a capability; the message names the capability."""

    def __init__(self, capability: str, where: str, detail: str = "") -> None:
        self.capability = capability
        self.where = where
        msg = f"{where} lacks {capability}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class MigrationError(HarnessError):
    """A migration or live update failed; ``result`` holds what was measured."""

    def __init__(self, message: str, result: object | None = None) -> None:
        self.result = result
        super().__init__(message)


class StateError(HarnessError, AssertionError):
    """A survival assertion failed; the message says what changed and by how much."""
