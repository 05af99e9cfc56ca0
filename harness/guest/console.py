"""The guest's serial console: a full log, expect-style waits, and writing to it.

QEMU writes every byte of the serial port to a log file (``logfile=`` of the chardev) and
offers a unix socket for input.  Waits read the log file, so nothing depends on a reader
thread keeping up, and the log doubles as the artifact.  Guest output is untrusted: it is
decoded with replacement, stripped of terminal escape sequences for matching, and lines
longer than :data:`MAX_LINE` are cut.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness.errors import BootRefused, ConsoleSilent, GuestTimeout, MachineError

MAX_LINE = 64 * 1024
# CSI sequences, OSC strings (window titles), other two-byte escapes, control characters
_ANSI = re.compile(
    r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b\n]{0,512}(?:\x07|\x1b\\)?|\x1b[@-~]"
    r"|[\x00-\x08\x0b-\x1f\x7f]"
)


def clean(text: str) -> str:
    """Remove terminal escape sequences and control characters (keeps newlines)."""
    return _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


class Console:
    """The serial console of one QEMU process."""

    def __init__(self, log: Path, sock: Path | None = None, alive: Callable[[], bool] | None = None) -> None:
        self.log_path = log
        self.sock_path = sock
        self._alive = alive
        self._offset = 0
        self._sock: socket.socket | None = None
        self._drain: threading.Thread | None = None

    def read_log(self) -> str:
        """The whole console log so far (cleaned of escape sequences)."""
        try:
            return clean(self.log_path.read_bytes().decode("utf-8", "replace"))
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """The current end of the log; later waits can start from here."""
        try:
            self._offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._offset = 0
        return self._offset

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        *,
        since: int | None = None,
        what: str | None = None,
        silence: float | None = None,
        refuse: re.Pattern[str] | None = None,
        poll: float = 0.05,
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) appears in the log after ``since`` (default: the
        last :meth:`mark`).  Raises :class:`GuestTimeout` with the last lines seen, or
        :class:`MachineError` when QEMU exits first.  With ``silence``, a console that has
        printed nothing at all after ``since`` for that many seconds gives up early with
        :class:`ConsoleSilent` (firmware that hangs before its console comes up).  A line
        matching ``refuse`` ends the wait at once with :class:`BootRefused`.  ``poll``: how
        often the log is read (a boot waits seconds; a restore's answer milliseconds)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        start = self._offset if since is None else since
        t0 = time.monotonic()
        deadline = t0 + timeout
        quiet_until = t0 + silence if silence is not None and silence < timeout else None
        text = ""
        while True:
            text = self._read_from(start)
            m = rx.search(text)
            if m:
                return m
            if refuse is not None and (bad := refuse.search(text)):
                raise BootRefused(what or rx.pattern, bad.group(0), self.log_path)
            if quiet_until is not None:
                if text:
                    quiet_until = None
                elif time.monotonic() >= quiet_until and (self._alive is None or self._alive()):
                    raise ConsoleSilent(what or rx.pattern, silence or 0.0, self.log_path)
            if self._alive is not None and not self._alive():
                text = self._read_from(start)
                m = rx.search(text)
                if m:
                    return m
                raise MachineError(
                    f"QEMU exited while waiting for {what or rx.pattern!r} on the console "
                    f"({self.log_path}); last output: {text[-800:]!r}"
                )
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"{what or rx.pattern!r} on the console ({self.log_path})",
                                   timeout, text[-800:])
            time.sleep(poll)

    def _read_from(self, start: int) -> str:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(start)
                data = fh.read(16 * 1024 * 1024)
        except FileNotFoundError:
            return ""
        text = clean(data.decode("utf-8", "replace"))
        if any(len(line) > MAX_LINE for line in text.split("\n")):
            text = "\n".join(line[:MAX_LINE] for line in text.split("\n"))
        return text

    def write(self, text: str) -> None:
        """Type ``text`` on the serial console."""
        if self.sock_path is None:
            raise MachineError("this console has no input socket")
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(str(self.sock_path))
            except OSError as exc:
                s.close()
                raise MachineError(f"cannot connect to console {self.sock_path}: {exc}") from exc
            self._sock = s
            # QEMU also sends output to a connected client: drain it (the log has it all)
            self._drain = threading.Thread(target=self._drain_loop, args=(s,), daemon=True)
            self._drain.start()
        self._sock.sendall(text.encode())

    @staticmethod
    def _drain_loop(s: socket.socket) -> None:
        try:
            s.settimeout(None)
            while s.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        if self._drain is not None:
            self._drain.join(timeout=2)
            self._drain = None
