"""Nested virtualization: l2. (See :mod:`harness.nested`.)"""

from __future__ import annotations

import base64
import contextlib
import gzip
import logging
import shlex
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import state
from harness.errors import (
    HarnessError,
    MachineError,
    StateError,
)
from harness.terms import Mode, Status

if TYPE_CHECKING:
    from harness.guest.ssh import CommandResult, SshClient
    from harness.machine import Machine
    from harness.migration import MigrationResult
    from harness.varstore import VarstoreModel
from harness.nested.common import L2_HEARTBEAT_S, L2_MODULE_DIR, L2_PORT, L2_RUN, L2_VARS_TEMPLATE
from harness.nested.l1 import L1Qmp

log = logging.getLogger(__name__)


# --- L2 ------------------------------------------------------------------------------------


@dataclass
class L2Start:
    """What starting L2 took."""

    boot_id: str
    ready_s: float  # L1's agent: L2 QEMU start to L2's HARNESS-READY (L1's clock)
    wall_s: float  # host: the agent call, including L2's SSH coming up
    pid: int
    accel: str
    irqchip: str
    boot: str


class L2:
    """An L2 guest inside an L1 :class:`~harness.machine.Machine`.

    L2's SSH goes through L1's current SSH session and is rebuilt whenever L1's QEMU
    changes (a migration reconnects L1's SSH).  ``port``, ``qmp_socket``, ``varstore``
    and ``pidfile`` follow L2 when :func:`migrate_l2` moves it."""

    def __init__(self, l1: Machine, *, name: str = "l2") -> None:
        self.l1 = l1
        self.name = name
        self.port = L2_PORT
        self.qmp_socket = f"{L2_RUN}/qmp.sock"
        self.varstore = f"{L2_RUN}/vars.fd"
        self.pidfile = f"{L2_RUN}/qemu.pid"
        self.generation = 0
        self.started: L2Start | None = None
        self._ssh: SshClient | None = None
        self._via: SshClient | None = None

    # -- lifetime ---------------------------------------------------------------------------

    def start(self, *, accel: str = "kvm", irqchip: str = "user", boot: str = "uefi",
              mem_mb: int = 512, timeout: float = 600.0) -> L2Start:
        """Start L2 through L1's agent and wait until its sshd answers."""
        t0 = time.monotonic()
        args = ["l2", "start", "--accel", accel, "--boot", boot, "--mem", str(mem_mb),
                "--timeout", str(int(timeout))]  # fmt: skip
        if accel == "kvm":
            args += ["--irqchip", irqchip]
        answer = self.l1.agent(*args, timeout=timeout + 60)
        if not isinstance(answer, dict) or not answer.get("ok"):
            raise MachineError(f"{self.name}: agent l2 start answered {answer!r}")
        self.ssh.connect(timeout=max(60.0, timeout - (time.monotonic() - t0)))
        self.started = L2Start(str(answer["boot_id"]), float(answer["ready_s"]),
                               time.monotonic() - t0, int(answer["pid"]), accel, irqchip, boot)  # fmt: skip
        return self.started

    def status(self) -> dict[str, Any]:
        """L1's agent's view: running, pid, ready, boot_id, accel, boot."""
        answer = self.l1.agent("l2", "status")
        if not isinstance(answer, dict):
            raise MachineError(f"{self.name}: agent l2 status answered {answer!r}")
        return answer

    def stop(self) -> None:
        """Stop L2 (its QEMU in L1); never raises for an L1 that is gone."""
        self.close()
        with contextlib.suppress(HarnessError):
            if self.l1.running:
                self.l1.agent("l2", "stop", timeout=60)

    def close(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
        self._ssh = None
        self._via = None

    # -- access -----------------------------------------------------------------------------

    @property
    def ssh(self) -> SshClient:
        """SSH to L2 through L1's SSH session (host key pinned)."""
        from harness.guest.ssh import SshClient

        via = self.l1.ssh
        if self._ssh is None or self._via is not via or self._ssh.port != self.port:
            self.close()
            img = self.l1.image
            self._ssh = SshClient("127.0.0.1", self.port, img.host_key, img.client_key,
                                  via=via, name=f"{self.l1.spec.name}/{self.name}")  # fmt: skip
            self._via = via
        return self._ssh

    def run(self, command: str, timeout: float = 120.0, check: bool = True) -> CommandResult:
        return self.ssh.run(command, timeout=timeout, check=check)

    def agent(self, *args: str, timeout: float = 120.0) -> Any:
        """Ask L2's agent; its JSON answer."""
        cmd = "agent " + " ".join(shlex.quote(a) for a in args)
        return self.ssh.run(cmd, timeout=timeout, check=True).json()

    def qmp(self, timeout: float = 60.0) -> L1Qmp:
        """A QMP session with L2's QEMU (use as a context manager)."""
        return L1Qmp(self.l1, self.qmp_socket, timeout=timeout)

    # -- state --------------------------------------------------------------------------------

    def snapshot(self, memory: bool = True, efivars: Sequence[str] = ()) -> state.GuestState:
        """L2's state now (the same record as :func:`harness.state.snapshot` of L1), with
        the EFI variables ``efivars`` (``NAME-GUID``) read in the same SSH command."""
        got = state.status_and_clock(self.ssh, memory, efivars, timeout=120.0, who=f"{self.name}:")
        return state.guest_state(got, who=self.name, heartbeat_s=L2_HEARTBEAT_S)

    def write_efivar(self, name: str, data: bytes, guid: str = state.HARNESS_GUID, attrs: int = 7) -> None:
        self.agent("efivar", "set", state.efivar_id(name, guid), data.hex(), str(attrs))

    def varstore_bytes(self) -> bytes:
        """L2's varstore file as L2's QEMU wrote it inside L1."""
        res = self.l1.ssh.run(f"gzip -c {shlex.quote(self.varstore)} | base64", timeout=120, check=True)
        try:
            return gzip.decompress(base64.b64decode(res.stdout))
        except (ValueError, OSError) as exc:
            raise StateError(f"{self.name}: varstore {self.varstore} in L1 unreadable: {exc}") from exc

    def varstore_model(self) -> VarstoreModel:
        from harness import varstore

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "l2-vars.fd"
            path.write_bytes(self.varstore_bytes())
            return varstore.read_varstore(path)


def l2_varstore_problem(l2: L2, name: str, value: bytes, guid: str = state.HARNESS_GUID,
                        timeout: float = 10.0) -> str | None:
    """``name`` must hold ``value`` in L2's varstore file inside L1 (QEMU writes it as the
    firmware does; retried briefly)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            var = l2.varstore_model().variables.get((name, guid))
        except HarnessError as exc:
            return f"L2 varstore {l2.varstore} in L1 unreadable: {exc}"
        got = var.data if var is not None else None
        problem = state.efivar_problem(name, guid, value, got, f"L2's varstore {l2.varstore} in L1")
        if problem is None or time.monotonic() > deadline:
            return problem
        time.sleep(0.5)


# --- nested migration inside L1 ---------------------------------------------------------------


def dest_l2_argv(argv: Sequence[str], gen: int) -> list[str]:
    """L2's QEMU command line (as read from ``/proc/PID/cmdline`` in L1) turned into the
    destination's for generation ``gen``: its own QMP socket, pidfile, serial log,
    varstore copy and forwarded port, and ``-incoming`` on a unix socket.  Pure."""
    out = list(argv)
    need = {"-qmp": False, "-pidfile": False, "-serial": False, "-netdev": False, "pflash": False}

    def value_after(opt: str) -> int:
        idx = [i for i, a in enumerate(out[:-1]) if a == opt]
        if len(idx) != 1:
            raise MachineError(f"L2 command line has {len(idx)} {opt} options, expected one: {shlex.join(argv)}")
        return idx[0] + 1

    i = value_after("-qmp")
    out[i], need["-qmp"] = f"unix:{L2_RUN}/qmp-{gen}.sock,server=on,wait=off", True
    i = value_after("-pidfile")
    out[i], need["-pidfile"] = f"{L2_RUN}/qemu-{gen}.pid", True
    i = value_after("-serial")
    out[i], need["-serial"] = f"file:{L2_RUN}/serial-{gen}.log", True
    i = value_after("-netdev")
    parts = out[i].split(",")
    for k, p in enumerate(parts):
        if p.startswith("hostfwd=") and p.endswith("-:22"):
            parts[k] = f"hostfwd=tcp:127.0.0.1:{L2_PORT + gen}-:22"
            need["-netdev"] = True
    out[i] = ",".join(parts)
    for k, a in enumerate(out):
        if k and out[k - 1] == "-drive" and "if=pflash" in a and "unit=1" in a:
            opts = [f"file={L2_RUN}/vars-{gen}.fd" if o.startswith("file=") else o for o in a.split(",")]
            out[k], need["pflash"] = ",".join(opts), True
    if any(a == "-incoming" for a in out):
        raise MachineError("L2 command line already has -incoming")
    missing = [k for k, v in need.items() if not v]
    if missing:
        raise MachineError(f"L2 command line lacks {', '.join(missing)} (hostfwd to :22, pflash unit=1): "
                           f"{shlex.join(argv)}")  # fmt: skip
    return [*out, "-incoming", f"unix:{L2_RUN}/mig-{gen}.sock"]


def _l2_argv(l2: L2) -> list[str]:
    pid = l2.l1.ssh.run(f"cat {shlex.quote(l2.pidfile)}", timeout=30, check=True).stdout.strip()
    if not pid.isdigit():
        raise MachineError(f"{l2.name}: pidfile {l2.pidfile} holds {pid!r}")
    raw = l2.l1.ssh.run(f"tr '\\0' '\\n' < /proc/{pid}/cmdline", timeout=30, check=True).stdout
    return raw.rstrip("\n").split("\n")


def migrate_l2(l2: L2, *, timeout: float = 600.0) -> MigrationResult:
    """Live-migrate L2 inside L1: L1's QEMU (7.2) moves L2 to a new QEMU in L1.

    The destination runs from L2's own command line with its own sockets, pidfile, serial
    log, varstore copy and forwarded port; on success the source quits, L1's agent is
    pointed at the destination (``/run/l2/qemu.pid``) and ``l2`` follows it.  A failed
    migration leaves the source running and kills the destination."""
    from harness import migration
    from harness.migration import MigrationResult

    gen = l2.generation + 1
    l1 = l2.l1
    res = MigrationResult(op="nested-live", mode=Mode.NORMAL, status=Status.PENDING, source="7.2 (in L1)",
                          destination="7.2 (in L1)", machine="q35")  # fmt: skip
    t0 = time.monotonic()
    argv = dest_l2_argv(_l2_argv(l2), gen)
    dest_qmp = f"{L2_RUN}/qmp-{gen}.sock"
    dest_pidfile = f"{L2_RUN}/qemu-{gen}.pid"
    launch = (f"cp {L2_VARS_TEMPLATE} {L2_RUN}/vars-{gen}.fd && cd / && "
              f"QEMU_MODULE_DIR={L2_MODULE_DIR} {shlex.join(argv)} "
              f">{L2_RUN}/qemu-{gen}.log 2>&1 </dev/null")  # fmt: skip
    start = l1.ssh.run(launch, timeout=120)
    if start.rc != 0:
        log_tail = l1.ssh.run(f"tail -n 20 {L2_RUN}/qemu-{gen}.log", timeout=30).stdout
        return res.fail(f"destination L2 QEMU failed to start (exit {start.rc}): {log_tail.strip()}")
    dest_ok = False
    try:
        with l2.qmp(timeout=60) as src, L1Qmp(l1, dest_qmp, timeout=60) as dst:
            # the driver's phases, over QMP sessions through L1 (polled no faster than every
            # 0.2 s: each poll is a round trip into a TCG guest)
            migration.start(src, uri=f"unix:{L2_RUN}/mig-{gen}.sock")
            info = migration.watch(src, timeout, min_interval=0.2)
            migration.fill_stats(res, info)
            if info.get("status") != "completed":
                res.fail(str(info.get("error-desc") or f"nested migration {info.get('status')}"))
                migration.recover(src, res, mode_param=False)
                return res
            why = migration.wait_running(dst, timeout, min_interval=0.2)
            if why:
                res.fail(f"destination L2 QEMU: {why}")
                migration.recover(src, res, mode_param=False)
                return res
            dest_ok = True
            with contextlib.suppress(HarnessError):
                src.execute("quit")
    except HarnessError as exc:
        return res.fail(f"nested migration: {exc}")
    finally:
        if not dest_ok:
            l1.ssh.run(f"[ -f {dest_pidfile} ] && kill -9 $(cat {dest_pidfile}); rm -f {dest_pidfile}",
                       timeout=30)  # fmt: skip
    # point L1's agent (and this handle) at the destination once the source is gone
    old_pid = l1.ssh.run(f"cat {shlex.quote(l2.pidfile)} 2>/dev/null", timeout=30).stdout.strip()
    if old_pid.isdigit():
        gone = time.monotonic() + 15
        while l1.ssh.run(f"[ -d /proc/{old_pid} ]", timeout=30).rc == 0:
            if time.monotonic() > gone:
                l1.ssh.run(f"kill -9 {old_pid}", timeout=30)
                break
            time.sleep(0.2)
    l1.ssh.run(f"cat {dest_pidfile} > {L2_RUN}/qemu.pid", timeout=30, check=True)
    l2.close()
    l2.generation = gen
    l2.port = L2_PORT + gen
    l2.qmp_socket = dest_qmp
    l2.varstore = f"{L2_RUN}/vars-{gen}.fd"
    l2.pidfile = f"{L2_RUN}/qemu.pid"
    res.wall_s = time.monotonic() - t0
    res.status = Status.COMPLETED
    return res


def l2_running(l2: L2) -> bool | None:
    """L2's QEMU's own run state (QMP in L1); None when it cannot be asked."""
    try:
        with l2.qmp(timeout=30) as q:
            return bool(q.execute("query-status").get("running"))
    except HarnessError as exc:
        log.info("%s: query-status failed: %s", l2.name, exc)
        return None


def set_l2_running(l2: L2, running: bool) -> None:
    """Continue (``running``) or stop L2's vCPUs through its QMP in L1."""
    cmd = "cont" if running else "stop"
    with l2.qmp(timeout=60) as q:
        q.execute(cmd)
        status = q.execute("query-status")
    if bool(status.get("running")) != running:
        raise MachineError(f"{l2.name}: QMP {cmd} left L2 {status!r}")
