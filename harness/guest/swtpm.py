"""One swtpm process (TPM 2.0, socket interface) per QEMU process, and its state
directory: started before its QEMU, ended by QEMU's exit (``--terminate``), reaped by the
:class:`~harness.machine.Incarnation` that owns both.  What a guest's vTPM must keep across
hops is checked in :mod:`harness.tpm`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from harness.errors import HostError, MachineError
from harness.guest.qemu_process import die_with_parent, unix_listening


class Swtpm:
    """One swtpm process (TPM 2.0, socket interface) and its state directory."""

    def __init__(self, state_dir: Path, ctrl_sock: Path, log: Path) -> None:
        self.state_dir, self.ctrl_sock, self.log = state_dir, ctrl_sock, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Swtpm:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cmd = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir},mode=0600",
               "--ctrl", f"type=unixio,path={self.ctrl_sock},mode=0600",
               "--log", f"file={self.log},level=1", "--terminate"]  # fmt: skip
        try:
            if shutil.which("swtpm") is None:
                raise FileNotFoundError("swtpm")
            argv, env = die_with_parent(cmd, dict(os.environ))
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        except FileNotFoundError as exc:
            raise HostError("swtpm is not installed (Debian package swtpm; `make setup` installs it)") from exc
        deadline = time.monotonic() + timeout
        while not unix_listening(self.ctrl_sock):
            if self.proc.poll() is not None:
                raise MachineError(f"swtpm exited with {self.proc.returncode} before listening on "
                                   f"{self.ctrl_sock}: {self._log_tail()}")  # fmt: skip
            if time.monotonic() > deadline:
                self.stop()
                raise MachineError(f"swtpm did not listen on {self.ctrl_sock} within {timeout:.0f}s")
            time.sleep(0.02)
        return self

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-800:]
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Reap it (it normally ends by itself once QEMU is gone)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.ctrl_sock.unlink(missing_ok=True)
