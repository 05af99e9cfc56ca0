"""Nested virtualization: l1. (See :mod:`harness.nested`.)"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from harness.errors import (
    GuestTimeout,
    HostError,
    MachineError,
)

if TYPE_CHECKING:
    from harness.machine import Machine
from harness.nested.common import HELPER_PATH

log = logging.getLogger(__name__)


# --- the in-L1 helper: a unix socket client --------------------------------------------

# stdin/stdout <-> a unix stream socket: our own few lines of C (unixcat.c, beside this file).
HELPER_SOURCE = Path(__file__).with_name("unixcat.c")


def helper_binary() -> Path:
    """The static helper binary, built once per source text into the harness cache."""
    from harness.paths import cache_root, ensure_dir

    source = HELPER_SOURCE.read_text()
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    out_dir = ensure_dir(cache_root() / "tools")
    out = out_dir / f"unixcat-{digest}"
    if out.is_file():
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise HostError("building the in-L1 QMP helper needs a C compiler (cc/gcc, Debian package gcc) "
                        "and static libc (libc6-dev)")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = Path(tmp) / "unixcat.c"
        src.write_text(source)
        exe = Path(tmp) / "unixcat"
        cmd = [cc, "-static", "-Os", "-s", "-o", str(exe), str(src)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostError(f"building the in-L1 QMP helper: {' '.join(cmd)}: {exc}") from exc
        if proc.returncode != 0:
            raise HostError(f"building the in-L1 QMP helper failed: {' '.join(cmd)} exited "
                            f"{proc.returncode}: {proc.stderr.strip()[-1000:]}")  # fmt: skip
        os.replace(exe, out)
    return out


def ensure_l1_helper(l1: Machine) -> str:
    """Copy the helper into L1 (once per L1 boot) and return its path there."""
    binary = helper_binary()
    data = binary.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    have = l1.ssh.run(f"sha256sum {HELPER_PATH} 2>/dev/null", timeout=60).stdout.split()
    if have and have[0] == digest:
        return HELPER_PATH
    tmp = f"{HELPER_PATH}.partial"
    cmd = (f"mkdir -p {os.path.dirname(HELPER_PATH)} && base64 -d > {tmp} && chmod 700 {tmp} "
           f"&& mv {tmp} {HELPER_PATH} && sha256sum {HELPER_PATH}")  # fmt: skip
    res = l1.ssh.run(cmd, timeout=300, check=True, input=base64.encodebytes(data).decode())
    if res.stdout.split()[:1] != [digest]:
        raise MachineError(f"{l1.spec.name}: helper copied to {HELPER_PATH} has sha256 "
                           f"{res.stdout.split()[:1]}, expected {digest}")  # fmt: skip
    return HELPER_PATH


class L1Qmp:
    """A QMP session with a QEMU inside L1, over its unix socket (through the helper and
    one SSH session channel).  A context manager: the channel is closed on exit."""

    def __init__(self, l1: Machine, socket_path: str, *, timeout: float = 60.0) -> None:
        self.l1 = l1
        self.socket_path = socket_path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._chan: paramiko.Channel | None = None
        self._buf = b""
        self._id = 0

    def open(self) -> L1Qmp:
        helper = ensure_l1_helper(self.l1)
        chan = self.l1.ssh.transport.open_session(timeout=10)
        chan.settimeout(self.timeout)
        chan.exec_command(f"{helper} {shlex.quote(self.socket_path)}")
        self._chan = chan
        try:
            self.greeting = self._read_message(lambda m: "QMP" in m, "the QMP greeting")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return self

    def _read_message(self, want: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        assert self._chan is not None
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError as exc:
                    raise MachineError(f"QMP {self.socket_path} in L1: not JSON: {line[:200]!r}") from exc
                if want(msg):
                    return dict(msg)
                if "event" in msg:
                    self.events.append(msg)
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{what} from QMP {self.socket_path} in L1", self.timeout,
                                   self._buf.decode(errors="replace"))  # fmt: skip
            try:
                chunk = self._chan.recv(65536)
            except TimeoutError as exc:
                raise GuestTimeout(f"{what} from QMP {self.socket_path} in L1", self.timeout) from exc
            if not chunk:
                err = b""
                while self._chan.recv_stderr_ready():
                    err += self._chan.recv_stderr(65536)
                raise MachineError(f"QMP {self.socket_path} in L1 closed while waiting for {what}"
                                   + (f": {err.decode(errors='replace').strip()}" if err else ""))  # fmt: skip
            self._buf += chunk

    # -- the migration driver's endpoint (harness.migration.Endpoint) -------------------------

    @property
    def name(self) -> str:
        return f"QEMU in L1 at {self.socket_path}"

    @property
    def running(self) -> bool:
        """Whether the session is open (the QEMU's exit closes it)."""
        return self._chan is not None and not self._chan.closed

    @property
    def exitcode(self) -> int | None:
        return None  # a process in L1: its exit status is L1's business

    def qmp(self, cmd: str, **args: Any) -> Any:
        return self.execute(cmd, **args)

    def execute(self, cmd: str, **args: Any) -> Any:
        """Run one QMP command; its ``return`` value, or :class:`MachineError` naming the error."""
        if self._chan is None:
            self.open()
        assert self._chan is not None
        self._id += 1
        ident = f"h{self._id}"
        msg: dict[str, Any] = {"execute": cmd, "id": ident}
        if args:
            msg["arguments"] = args
        self._chan.sendall((json.dumps(msg) + "\n").encode())
        reply = self._read_message(lambda m: m.get("id") == ident, f"the reply to {cmd}")
        if "error" in reply:
            err = reply["error"]
            raise MachineError(f"QMP {cmd} in L1 ({self.socket_path}) failed: "
                               f"{err.get('class')}: {err.get('desc')}")  # fmt: skip
        return reply.get("return")

    def close(self) -> None:
        if self._chan is not None:
            with contextlib.suppress(Exception):
                self._chan.close()
            self._chan = None

    def __enter__(self) -> L1Qmp:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
