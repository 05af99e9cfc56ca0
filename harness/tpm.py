"""A vTPM per QEMU process: one ``swtpm`` owned like a QEMU, and what must survive a hop.

Each QEMU process of a guest with ``VmSpec(tpm=True)`` gets its own :class:`Swtpm` (state
directory in the guest's work directory, control socket in its private socket directory),
started before QEMU and reaped with it on every path (its parent-death signal is set like
QEMU's; ``--terminate`` also ends it when QEMU drops the connection).  A migration's
destination gets a fresh swtpm and state directory: QEMU carries the TPM's state in the
stream.  A restart of the guest in a new QEMU (power off, start) keeps the state directory.

Observed from the guest (:func:`observe`): the sha256 PCR bank (sysfs), a digest of the
firmware's measured-boot event log (securityfs), and the value of an NV index the harness
defines and writes through raw TPM2 commands on ``/dev/tpmrm0`` (the agent's ``tpm``
subcommand; the image has no tpm2-tools).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HostError, MachineError

if TYPE_CHECKING:
    from harness.machine import Machine

PCRS = tuple(range(24))
NV_INDEX = 0x01500016


class Swtpm:
    """One swtpm process (TPM 2.0, socket interface) and its state directory."""

    def __init__(self, state_dir: Path, ctrl_sock: Path, log: Path) -> None:
        self.state_dir, self.ctrl_sock, self.log = state_dir, ctrl_sock, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Swtpm:
        from harness.migration import unix_listening
        from harness.qemu_process import die_with_parent

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


# --- the guest's view ---------------------------------------------------------------------


@dataclass
class TpmView:
    pcrs: dict[int, str] = field(default_factory=dict)  # sha256 bank
    event_log: str = ""  # sha256 of binary_bios_measurements, or why it is absent
    nv: str = ""  # hex of the NV index's data, or the error

    def to_json(self) -> dict[str, Any]:
        return {"pcrs": {str(k): v for k, v in self.pcrs.items()}, "event_log": self.event_log, "nv": self.nv}


def observe(vm: Machine) -> TpmView:
    data = vm.agent("tpm", "show", timeout=60)
    pcrs = {int(k): str(v) for k, v in dict(data.get("pcrs") or {}).items()}
    return TpmView(pcrs, str(data.get("event_log", "")), str(data.get("nv", "")))


def nv_write(vm: Machine, value: bytes) -> None:
    """Define the harness's NV index (8 bytes, owner/auth read-write; defining it again is
    fine) and write ``value`` (8 bytes) to it from inside the guest."""
    if len(value) != 8:
        raise ValueError("the harness's NV index holds exactly 8 bytes")
    vm.agent("tpm", "nvwrite", value.hex(), timeout=60)


def problems(before: TpmView, after: TpmView, where: str = "after the hop", *, same_boot: bool = True) -> list[str]:
    """What differs.  Across a hop (``same_boot``) the event log must be byte-identical;
    across a new boot only the PCRs and the NV index are compared: the log's
    EV_EFI_BOOT_SERVICES_APPLICATION events carry the image's load address, which differs
    from boot to boot while the measured digests (hence the PCRs) do not."""
    out = []
    if not before.pcrs:
        out.append(f"{where}: the guest saw no TPM PCRs before the hop")
    changed = [i for i in sorted(set(before.pcrs) | set(after.pcrs)) if before.pcrs.get(i) != after.pcrs.get(i)]
    if changed:
        i = changed[0]
        out.append(f"{where}: sha256 PCR(s) {', '.join(map(str, changed))} changed (PCR {i}: "
                   f"{before.pcrs.get(i)} -> {after.pcrs.get(i)})")  # fmt: skip
    if same_boot and before.event_log != after.event_log:
        out.append(f"{where}: the measured-boot event log changed ({before.event_log} -> {after.event_log})")
    if before.nv != after.nv:
        out.append(f"{where}: the TPM NV index {NV_INDEX:#x} reads {after.nv or '(nothing)'}, "
                   f"it held {before.nv or '(nothing)'}")  # fmt: skip
    return out
