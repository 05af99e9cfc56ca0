"""Nested virtualization: L1 specs, and reaching, checking and moving an L2 inside an L1.

An **L1** is a guest of the ``nested-l1`` image that runs hardware-assisted KVM inside.
:func:`l1_plan` decides how this host gives L1 virtualization extensions:

- a host whose KVM is usable and whose ``kvm_intel``/``kvm_amd`` has ``nested=1``:
  ``accel=kvm`` and ``-cpu host,+vmx`` (or ``+svm``).  KVM saves the L1 vCPU's nested
  state (``KVM_GET_NESTED_STATE``) into the migration stream's ``cpu/nested_state``
  subsection while L2 runs;
- everywhere else (this machine's PVM KVM, or ``accel='tcg'``): TCG with ``-cpu max``,
  which emulates SVM, so L1 loads ``kvm_amd nested=1``.  TCG has no KVM nested state: the
  SVM state of a vCPU caught in guest mode travels in TCG's own subsections
  (``cpu/svn_npt`` [sic], ``cpu/svm_guest``), or not at all when L1 was in host mode.

An **L2** (:class:`L2`) is started by L1's agent (``agent l2 start``: QEMU 7.2 inside L1,
split pflash OVMF with its varstore at ``/run/l2/vars.fd``, user networking forwarding
127.0.0.1:2222 inside L1 to L2's sshd).  The harness reaches L2's sshd through a
``direct-tcpip`` channel of L1's SSH session (same pinned host key and client key: the
images share them) and L2's QMP socket through a tiny helper it builds and copies into L1
(:func:`ensure_l1_helper`: L1's busybox has no client for unix sockets).

:func:`migrate_l2` is migration one level down: L1's QEMU live-migrates L2 to a second
QEMU inside L1.  :func:`run_cycles` moves L1 (live, save-restore, cpr-reboot,
cpr-transfer, or a cross-version live migration) and after every cycle checks L1 and L2:
same boot, heartbeat advanced, memory checksum intact, an EFI variable read back in the
guest and in the varstore file its firmware writes, and L2's observed pause.

Whether nested state was in the stream is read from the stream itself: the JSON
description QEMU appends to every precopy stream (:func:`stream_sections`), from the
cycle's state file when there is one, else from a device-state probe saved just before
the cycle (:func:`probe_sections`).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from harness import state
from harness.catalog import DEFAULT_QEMU
from harness.errors import (
    GuestTimeout,
    HarnessError,
    HostError,
    MachineError,
    StateError,
    UnsupportedError,
)
from harness.host import KvmInfo, probe_kvm
from harness.spec import VmSpec
from harness.terms import Mode, Status

if TYPE_CHECKING:
    from harness.builds import QemuBuild
    from harness.machine import Machine
    from harness.migration import MigrationResult
    from harness.ssh import CommandResult, SshClient
    from harness.varstore import VarstoreModel

log = logging.getLogger(__name__)

L1_IMAGE = "nested-l1"
L1_MEMORY_MB = 2048  # L1's kernel and agent, L2's 512 MiB, and room for a second L2 (migrate_l2)
L2_RUN = "/run/l2"
L2_PORT = 2222
L2_DATA = "/data"
L2_VARS_TEMPLATE = f"{L2_DATA}/ovmf/OVMF_VARS_4M.fd"
L2_MODULE_DIR = f"{L2_DATA}/qemu/lib/qemu"
HELPER_PATH = "/run/harness/unixcat"
L2_CYCLE_VAR = "HarnessL2Cycle"
L1_CYCLE_VAR = "HarnessL1Cycle"

# vmstate subsections that carry an L1 vCPU's nested (L2) state
KVM_NESTED_SECTIONS = ("cpu/nested_state", "cpu/kvm_nested_state")
TCG_GUEST_MODE_SECTIONS = ("cpu/svn_npt", "cpu/svm_guest")


# --- L1 specs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class L1Plan:
    """How this host runs an L1 with virtualization extensions, and what to expect of it."""

    spec: VmSpec
    accel: str  # "kvm" | "tcg"
    vendor: str | None  # "intel" | "amd" on a KVM host, "amd" (emulated SVM) on TCG
    nested_state_expected: bool  # KVM L0: cpu/nested_state in the stream while L2 runs
    l2_irqchip: str  # "user" on a TCG L0 (see guests/README.md), "kernel" on KVM
    reason: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_json()
        return data


def l1_plan(
    kvm: KvmInfo | None = None,
    *,
    accel: str = "auto",
    qemu: str = DEFAULT_QEMU,
    machine: str = "q35",
    memory_mb: int = L1_MEMORY_MB,
    name: str = "l1",
    **fields: Any,
) -> L1Plan:
    """The L1 spec for this host (``kvm`` defaults to :func:`harness.host.probe_kvm`).

    ``accel='auto'`` uses KVM when it is usable and raises :class:`UnsupportedError` when
    its nested parameter is off (on a real host KVM must be used: load the module with
    ``nested=1``); without usable KVM it uses TCG.  ``fields`` are more spec fields
    (memory backend for CPR, firmware, ...)."""
    if accel not in ("auto", "kvm", "tcg"):
        raise HostError(f"L1 accel must be auto, kvm or tcg, not {accel!r}")
    kvm = kvm if kvm is not None else probe_kvm()
    base = {"image": L1_IMAGE, "qemu": qemu, "machine": machine, "memory_mb": memory_mb,
            "name": name, "nested": True, **fields}  # fmt: skip
    use_kvm = accel == "kvm" or (accel == "auto" and kvm.usable)
    if use_kvm:
        if not kvm.usable:
            raise UnsupportedError("usable KVM", "this host", kvm.reason)
        if not kvm.nested or kvm.vendor is None:
            raise UnsupportedError(
                "nested virtualization", f"this host's kvm_{kvm.vendor}",
                f"{kvm.reason}; reload it with nested=1 (modprobe kvm_{kvm.vendor} nested=1)",
            )  # fmt: skip
        flag = "vmx" if kvm.vendor == "intel" else "svm"
        spec = VmSpec(**{**base, "accel": "kvm", "cpu": f"host,+{flag}"})
        return L1Plan(spec, "kvm", kvm.vendor, True, "kernel",
                      f"KVM L0 ({flag.upper()}, nested=1): L1 runs -cpu host,+{flag}; "
                      "KVM nested state travels in cpu/nested_state")  # fmt: skip
    why = "asked for TCG" if accel == "tcg" else f"KVM unusable ({kvm.reason})"
    spec = VmSpec(**{**base, "accel": "tcg", "cpu": "max"})
    return L1Plan(spec, "tcg", "amd", False, "user",
                  f"TCG L0 ({why}): -cpu max emulates SVM, L1 loads kvm_amd nested=1; "
                  "no KVM nested state exists on a TCG L0")  # fmt: skip


def pair_fields(qemu_builds: Sequence[QemuBuild]) -> dict[str, Any]:
    """Spec fields one L1 needs to go through every operation the builds share: shared
    memfd RAM (cpr-transfer's, and what lets a stream probe skip RAM), plus
    ``aux_ram_share`` when every build offers cpr-transfer.  One set of fields for all
    modes means one saved pair serves them all."""
    if all(b.capabilities.has_mode("cpr-transfer") for b in qemu_builds):
        return {"memory_backend": "memfd", "aux_ram_share": True}
    if all(b.capabilities.has_capability("x-ignore-shared") for b in qemu_builds):
        return {"memory_backend": "memfd"}
    return {}


def l1_spec(kvm: KvmInfo | None = None, **kw: Any) -> VmSpec:
    """Just the spec of :func:`l1_plan`."""
    return l1_plan(kvm, **kw).spec


# --- the in-L1 helper: a unix socket client --------------------------------------------

# stdin/stdout <-> a unix stream socket (our own few lines of C; L1's busybox nc has no
# unix sockets and dropbear forwards TCP only).  Exits when the socket closes; on stdin
# EOF it half-closes the socket and drains the rest.
_HELPER_C = r"""
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int put(int fd, const char *b, ssize_t n) {
    while (n > 0) {
        ssize_t w = write(fd, b, (size_t)n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        b += w; n -= w;
    }
    return 0;
}

int main(int argc, char **argv) {
    struct sockaddr_un a;
    char buf[65536];
    int s, in_open = 1;
    if (argc != 2 || strlen(argv[1]) >= sizeof(a.sun_path)) {
        fprintf(stderr, "usage: unixcat SOCKET\n");
        return 2;
    }
    memset(&a, 0, sizeof(a));
    a.sun_family = AF_UNIX;
    strcpy(a.sun_path, argv[1]);
    s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
        fprintf(stderr, "unixcat: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    for (;;) {
        struct pollfd p[2] = {{s, POLLIN, 0}, {0, POLLIN, 0}};
        if (poll(p, in_open ? 2 : 1, -1) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        if (p[0].revents) {
            ssize_t n = read(s, buf, sizeof(buf));
            if (n <= 0) return 0;
            if (put(1, buf, n) < 0) return 1;
        }
        if (in_open && p[1].revents) {
            ssize_t n = read(0, buf, sizeof(buf));
            if (n <= 0) { in_open = 0; shutdown(s, SHUT_WR); continue; }
            if (put(s, buf, n) < 0) return 1;
        }
    }
}
"""


def helper_binary() -> Path:
    """The static helper binary, built once per source text into the harness cache."""
    from harness.paths import cache_root, ensure_dir

    digest = hashlib.sha256(_HELPER_C.encode()).hexdigest()[:16]
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
        src.write_text(_HELPER_C)
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
        from harness.ssh import SshClient

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

    def clock_sample(self, tries: int = 3) -> state.ClockSample:
        best: state.ClockSample | None = None
        for _ in range(tries):
            t0 = time.monotonic()
            out = self.ssh.run("cat /proc/uptime", timeout=60, check=True).stdout
            t1 = time.monotonic()
            try:
                guest = float(out.split()[0])
            except (IndexError, ValueError) as exc:
                raise StateError(f"{self.name}: /proc/uptime unreadable: {out[:100]!r}") from exc
            sample = state.ClockSample(host=(t0 + t1) / 2, guest=guest, rtt=t1 - t0)
            if best is None or sample.rtt < best.rtt:
                best = sample
        assert best is not None
        return best

    def snapshot(self, memory: bool = True) -> state.GuestState:
        """L2's state now (the same record as :func:`harness.state.snapshot` of L1)."""
        status = self.agent("status")
        mem: dict[str, Any] = self.agent("mem-checksum") if memory else {}
        clock = self.clock_sample()
        try:
            return state.GuestState(
                boot_id=str(status["boot_id"]), uptime=float(status["uptime"]),
                heartbeat=int(status["heartbeat"]["count"]), mem_checksum=mem.get("checksum"),
                mem_expected=mem.get("expected"), clock=clock,
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.name}: agent status malformed: {status!r}") from exc

    def write_efivar(self, name: str, data: bytes, guid: str = state.HARNESS_GUID, attrs: int = 7) -> None:
        self.agent("efivar", "set", f"{name}-{guid}", data.hex(), str(attrs))

    def read_efivar(self, name: str, guid: str = state.HARNESS_GUID) -> bytes | None:
        res = self.ssh.run(f"agent efivar get {shlex.quote(name + '-' + guid)}", timeout=60)
        if res.rc != 0:
            return None
        return bytes.fromhex(str(res.json()["data"]))

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


# --- what the stream carried ---------------------------------------------------------------

QEMU_VM_VMDESCRIPTION = 0x06
_TAIL = 16 << 20


def stream_sections(data: bytes) -> dict[str, list[str]]:
    """The vmstate sections of a saved precopy stream: ``{section: [subsection, ...]}``.

    Read from the JSON description QEMU appends after the end-of-stream marker (one
    ``0x06`` byte, a big-endian length, the JSON) to ``data`` (the tail of the stream is
    enough).  Raises :class:`StateError` when there is none (postcopy, or a machine with
    ``suppress-vmdesc``)."""
    end = len(data)
    i = data.rfind(b"{")
    while i >= 5:
        if data[i - 5] == QEMU_VM_VMDESCRIPTION and int.from_bytes(data[i - 4:i], "big") == end - i:
            try:
                desc = json.loads(data[i:end])
            except ValueError as exc:
                raise StateError(f"stream description at offset {i} is not JSON: {exc}") from exc
            if not isinstance(desc, dict) or "devices" not in desc:
                raise StateError(f"stream description at offset {i} has no devices: {str(desc)[:200]}")
            out: dict[str, list[str]] = {}
            for dev in desc["devices"]:
                name = str(dev.get("name"))
                subs = out.setdefault(name, [])
                subs += [s for s in _subsections(dev) if s not in subs]
            return out
        i = data.rfind(b"{", 0, i)
    raise StateError("no vmstate description at the end of the stream (postcopy or suppress-vmdesc?)")


def _subsections(node: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for sub in node.get("subsections", []) or []:
        names.append(str(sub.get("vmsd_name")))
        names += _subsections(sub)
    return names


def file_sections(path: Path) -> dict[str, list[str]]:
    """:func:`stream_sections` of a state file (only its tail is read)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - _TAIL))
        return stream_sections(f.read())


@dataclass(frozen=True)
class NestedEvidence:
    """What a migration stream said about L1's vCPUs and L2."""

    source: str  # "state file" | "probe" | "none"
    kvm_nested_state: bool  # cpu/nested_state: KVM_GET_NESTED_STATE data (KVM L0)
    guest_mode: bool  # TCG's SVM guest-mode subsections: a vCPU was in L2 at the save
    cpu_subsections: tuple[str, ...]
    l0_accel: str
    l2_running: bool | None  # L2's QEMU reported status running (query-status in L1)
    verdict: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_subsections"] = list(self.cpu_subsections)
        return data


def nested_evidence(sections: dict[str, list[str]] | None, *, source: str, l0_accel: str,
                    l2_running: bool | None) -> NestedEvidence:
    """Classify what a stream carried (``sections`` None: nothing could be read)."""
    subs = sorted({s for name, lst in (sections or {}).items() if name == "cpu" for s in lst})
    kvm = any(s in KVM_NESTED_SECTIONS for s in subs)
    guest = any(s in TCG_GUEST_MODE_SECTIONS for s in subs)
    if sections is None:
        verdict = "nested state: unknown (no stream description was read)"
    elif kvm:
        verdict = "nested state: present (cpu/nested_state, KVM L0): L2 survived with nested state"
    elif l0_accel == "tcg":
        if guest:
            verdict = ("nested state: absent (TCG L0); a vCPU was in L2 guest mode at the save "
                       "(TCG SVM subsections cpu/svn_npt or cpu/svm_guest carried it)")  # fmt: skip
        elif l2_running:
            verdict = ("nested state: absent (TCG L0); L2 running but the vCPU was in L1 at the "
                       "save: L2 survived without nested state")  # fmt: skip
        else:
            verdict = "nested state: absent (TCG L0); L2 was not running: L2 idle"
    elif l2_running:
        verdict = "nested state: absent although L2 ran on a KVM L0: L2 survived without nested state"
    else:
        verdict = "nested state: absent; L2 was not running: L2 idle"
    return NestedEvidence(source, kvm, guest, tuple(subs), l0_accel, l2_running, verdict)


def probe_sections(vm: Machine, path: Path | None = None) -> dict[str, list[str]]:
    """The vmstate sections of ``vm``'s stream now: a save that resumes the guest at once.

    With shared guest RAM (file or memfd backend) the save skips RAM (``x-ignore-shared``,
    switched off again afterwards), so the guest pauses for a fraction of a second."""
    from harness import migration

    path = path or vm.workdir / f"probe-{time.monotonic_ns()}.state"
    shared = vm.spec.memory_backend != "plain" and vm.build.capabilities.has_capability("x-ignore-shared")
    caps = ["x-ignore-shared"] if shared else []
    try:
        migration.save(vm, path, capabilities=caps, resume=True, check=True)
        return file_sections(path)
    finally:
        if shared:
            migration.reset(vm.current.process, ["x-ignore-shared"], mode_param=False)
        with contextlib.suppress(OSError):
            path.unlink()


def l2_running(l2: L2) -> bool | None:
    """L2's QEMU's own run state (QMP in L1); None when it cannot be asked."""
    try:
        with l2.qmp(timeout=30) as q:
            return bool(q.execute("query-status").get("running"))
    except HarnessError as exc:
        log.info("%s: query-status failed: %s", l2.name, exc)
        return None


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


# --- moving L1, checking both levels --------------------------------------------------------


@dataclass
class NestedCycle:
    """L2's side of one L1 cycle."""

    pause_s: float | None = None
    pause_uncertainty_s: float | None = None
    heartbeat: tuple[int, int] | None = None
    boot_id: str | None = None
    efivar: str | None = None
    problems: list[str] = field(default_factory=list)
    evidence: NestedEvidence | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "pause_s": self.pause_s,
            "pause_uncertainty_s": self.pause_uncertainty_s,
            "heartbeat": list(self.heartbeat) if self.heartbeat else None,
            "boot_id": self.boot_id,
            "efivar": self.efivar,
            "problems": self.problems,
        }


def _l1_efivar_problems(l1: Machine, value: bytes) -> list[str]:
    from harness import varstore

    problems = []
    got = state.read_efivar(l1, L1_CYCLE_VAR)
    p = state.efivar_problem(L1_CYCLE_VAR, state.HARNESS_GUID, value, got, "L1")
    if p:
        problems.append(p)
    deadline = time.monotonic() + 10
    while True:
        try:
            var = varstore.read_varstore(l1.varstore_path).variables.get((L1_CYCLE_VAR, state.HARNESS_GUID))
        except HarnessError as exc:
            return [*problems, f"L1's host-side varstore unreadable: {exc}"]
        p = state.efivar_problem(L1_CYCLE_VAR, state.HARNESS_GUID, value,
                                 var.data if var else None, f"L1's varstore {l1.varstore_path}")  # fmt: skip
        if p is None:
            return problems
        if time.monotonic() > deadline:
            return [*problems, p]
        time.sleep(0.3)


GUEST_MODE_LOAD_ERROR = "vCPU set in guest-mode inconsistent with migrated kernel nested state"
GUEST_MODE_EXPLANATION = (
    "known QEMU limitation: the source vCPU was in L2 guest mode (HF_GUEST_MASK) when the "
    "stream was cut, and a TCG L0 has no KVM nested state to send; the destination's "
    "cpu_post_load (built with KVM support) refuses guest mode without cpu/nested_state. "
    "Timing-dependent; the source was resumed, nothing was lost"
)


def guest_mode_limitation(res: MigrationResult) -> bool:
    """The cycle failed only because a TCG L1 vCPU was caught in L2 guest mode."""
    return res.status != "completed" and GUEST_MODE_LOAD_ERROR in res.error


QUIESCE_EXPLANATION = (
    "L2's vCPUs were paused (QMP stop to L2's QEMU in L1) for the cut after {n} refusal(s) "
    "in L2 guest mode, so L1's vCPU could not be in guest mode when the stream was cut; "
    "L2 was continued afterwards"
)


@dataclass
class Attempts:
    """How :func:`run_cycles` retries a cycle refused for the guest-mode limitation.

    ``retries`` refusals are retried with L2 running, over all cycles.  Once a cycle has
    been refused ``quiesce_after`` times, or the retries are used up, its next attempt
    pauses L2's vCPUs for the cut (:func:`set_l2_running`): with no L2 vCPU inside ``KVM_RUN``,
    L1's vCPU cannot be in guest mode, so that attempt is not refused for it.  Without
    ``quiesce_after`` (None) a cycle is only ever tried with L2 running; with 0 every
    attempt pauses L2."""

    retries: int
    quiesce_after: int | None = 2
    refused: int = 0  # known refusals of the current cycle

    def quiesce(self) -> bool:
        """Whether the next attempt pauses L2 for the cut."""
        if self.quiesce_after is None:
            return False
        if self.quiesce_after == 0:
            return True
        return self.refused > 0 and (self.refused >= self.quiesce_after or self.retries <= 0)

    def after(self, ok: bool, known: bool, quiesced: bool) -> str:
        """``next`` (the cycle is done), ``retry`` (the same cycle again) or ``stop``."""
        if ok:
            self.refused = 0
            return "next"
        if not known or quiesced:
            return "stop"
        if self.retries <= 0 and self.quiesce_after is None:
            return "stop"
        self.retries = max(0, self.retries - 1)
        self.refused += 1
        return "retry"


def set_l2_running(l2: L2, running: bool) -> None:
    """Continue (``running``) or stop L2's vCPUs through its QMP in L1."""
    cmd = "cont" if running else "stop"
    with l2.qmp(timeout=60) as q:
        q.execute(cmd)
        status = q.execute("query-status")
    if bool(status.get("running")) != running:
        raise MachineError(f"{l2.name}: QMP {cmd} left L2 {status!r}")


def _continue_l2(l1: Machine, l2: L2) -> str | None:
    """Continue a quiesced L2; what went wrong, or None."""
    if not l1.running:
        return "L1 is not running"
    try:
        set_l2_running(l2, True)
    except HarnessError as exc:
        return str(exc)
    return None


def _check_pair(l1: Machine, l2: L2, op: str, befores: tuple[state.GuestState, state.GuestState],
                values: tuple[bytes, bytes], cyc: NestedCycle, res: MigrationResult,
                max_pause: float | None) -> None:
    """L1's and L2's survival after a cycle (or after a refused one): into ``res``/``cyc``."""
    l1_before, l2_before = befores
    v1, v2 = values
    try:
        l1_after = state.snapshot(l1)
        res.pause_s = round(state.guest_pause(l1_before, l1_after), 4)
        res.pause_uncertainty_s = round(state.pause_uncertainty(l1_before, l1_after), 4)
        res.problems += [f"L1: {p}" for p in state.survival_problems(l1_before, l1_after)]
        if l1.spec.firmware_mode == "split" and op != "nested-live":
            res.problems += [f"L1: {p}" for p in _l1_efivar_problems(l1, v1)]
    except HarnessError as exc:
        res.problems.append(f"L1 check failed: {exc}")
    try:
        l2_after = l2.snapshot()
        cyc.pause_s = round(state.guest_pause(l2_before, l2_after), 4)
        cyc.pause_uncertainty_s = round(state.pause_uncertainty(l2_before, l2_after), 4)
        cyc.heartbeat = (l2_before.heartbeat, l2_after.heartbeat)
        cyc.boot_id = l2_after.boot_id
        cyc.problems += state.survival_problems(l2_before, l2_after, max_pause)
        got = l2.read_efivar(L2_CYCLE_VAR)
        p = state.efivar_problem(L2_CYCLE_VAR, state.HARNESS_GUID, v2, got, "L2")
        if p:
            cyc.problems.append(p)
        cyc.efivar = got.decode(errors="replace") if got is not None else None
        p = l2_varstore_problem(l2, L2_CYCLE_VAR, v2)
        if p:
            cyc.problems.append(p)
    except HarnessError as exc:
        cyc.problems.append(f"check failed: {exc}")
    res.problems += [f"L2: {p}" for p in cyc.problems]


def _escaped_failure(l1: Machine, op: str, dest: QemuBuild | None, exc: AssertionError) -> MigrationResult:
    """A failed result for an operation that raised instead of returning one.

    Workaround: qemu.qmp asserts (``runstate == RUNNING``) when a cpr-transfer destination
    dies while its deferred QMP connects, and ``QemuProcess.connect_qmp`` lets that escape
    ``migration.cpr_transfer``.  The dead destination's output is kept in the result and
    the destination is reaped; the source stays the guest's process."""
    from harness.migration import MigrationResult

    res = MigrationResult(op=op, mode=Mode(op) if op.startswith("cpr") else Mode.NORMAL, status=Status.PENDING,
                          source=l1.build.label, destination=(dest or l1.build).label,
                          machine=l1.spec.machine)  # fmt: skip
    text = f"{op} raised {type(exc).__name__}: {exc}"
    for inc in list(getattr(l1, "_others", [])):
        out = inc.process.output()
        l1.release(inc, hard=True)
        if out.strip():
            text += "\ndestination output:\n" + out.strip()[-4000:]
    return res.fail(text)


def run_cycles(
    l1: Machine,
    l2: L2,
    op: str,
    cycles: int,
    *,
    builds: Sequence[QemuBuild] = (),
    probe: bool = True,
    max_pause: float | None = None,
    timeout: float | None = None,
    known_retries: int | None = None,
    quiesce_after: int | None = 2,
    on_cycle: Callable[[MigrationResult], None] | None = None,
) -> list[MigrationResult]:
    """``cycles`` consecutive ``op`` cycles of L1 (destinations alternate over ``builds``),
    checking L1 and L2 after each; stops at the first failed cycle.

    Each result's ``problems`` holds L1's and L2's survival problems (L2's prefixed
    ``L2:``), its ``extra`` holds ``l2`` (L2's pause, heartbeat, EFI variable) and
    ``nested_state`` (:class:`NestedEvidence`).  ``op`` may also be ``nested-live``:
    L2 migrated inside L1 (:func:`migrate_l2`) while L1 stays put.

    A cycle refused only because the vCPU was caught in L2 guest mode
    (:func:`guest_mode_limitation`) is recorded as its own result (``extra``:
    ``known_limitation``, ``expected_failure``), the source is resumed and both levels are
    checked on it; if nothing was lost the cycle is tried again (:class:`Attempts`): with L2
    running up to ``known_retries`` times in all (default: as many as there are cycles; it
    hit 3 of 18 cpr-transfer attempts here, and four cpr-reboot attempts in a row on a
    loaded CI machine), and after ``quiesce_after`` refusals of one cycle with L2's vCPUs
    paused for the cut (``extra["l2_quiesced"]``; L2's pause then includes it).  With a TCG
    L1, cpr-reboot and save-restore keep the old QEMU until the new one runs
    (``keep_source_until_loaded``) so that such a refusal can be resumed too."""
    from harness import migration

    plan_accel = l1.accel
    results: list[MigrationResult] = []
    attempts = Attempts(max(3, cycles) if known_retries is None else known_retries,
                        None if op == "nested-live" else quiesce_after)  # fmt: skip
    i = 1
    while i <= cycles:
        dest = builds[(i - 1) % len(builds)] if builds else None
        stamp = time.time_ns()
        values = (f"l1-cycle-{i}-{stamp}".encode(), f"l2-cycle-{i}-{stamp}".encode())
        l2.write_efivar(L2_CYCLE_VAR, values[1])
        if l1.spec.firmware_mode == "split" and op != "nested-live":
            state.write_efivar(l1, L1_CYCLE_VAR, values[0])
        running = l2_running(l2)
        sections: dict[str, list[str]] | None = None
        source = "none"
        if probe and op in ("live", "cpr-transfer"):
            try:
                sections, source = probe_sections(l1), "probe"
            except HarnessError as exc:
                log.warning("stream probe failed: %s", exc)
        befores = (state.snapshot(l1), l2.snapshot())
        quiesced = attempts.quiesce()
        if quiesced:
            set_l2_running(l2, False)
            running = False
        try:
            if op == "nested-live":
                res = migrate_l2(l2, timeout=timeout or 600.0)
            else:
                kw: dict[str, Any] = {"to": dest, "check": False}
                if timeout is not None:
                    kw["timeout"] = timeout
                if op in ("cpr-reboot", "save-restore") and plan_accel == "tcg":
                    # a stop in L2 guest mode makes the state file unloadable (see
                    # guest_mode_limitation): keep the old QEMU until the new one runs
                    kw["keep_source_until_loaded"] = True
                try:
                    res = migration.operation(op)(l1, **kw)
                except AssertionError as exc:
                    res = _escaped_failure(l1, op, dest, exc)
        except Exception:  # not on Ctrl-C: the pair is torn down anyway
            if quiesced:
                _continue_l2(l1, l2)
            raise
        res.cycle = i
        if quiesced:
            res.extra["l2_quiesced"] = QUIESCE_EXPLANATION.format(n=attempts.refused)
            problem = _continue_l2(l1, l2)
            if problem:
                res.problems.append(f"L2: could not be continued after the cut: {problem}")
        cyc = NestedCycle()
        known = guest_mode_limitation(res)
        if res.ok:
            if res.state_file and Path(res.state_file).is_file():
                try:
                    sections, source = file_sections(Path(res.state_file)), "state file"
                except (StateError, OSError) as exc:
                    log.warning("state file %s: %s", res.state_file, exc)
            _check_pair(l1, l2, op, befores, values, cyc, res, max_pause)
        elif known:
            res.extra["source_resumed"] = l1.running and migration.recover_source(l1.current, res)
            _check_pair(l1, l2, op, befores, values, cyc, res, max_pause)
            known = bool(res.extra["source_resumed"]) and not res.problems
            if known:
                res.extra["known_limitation"] = GUEST_MODE_EXPLANATION
                res.extra["expected_failure"] = True
        if op == "nested-live":
            cyc.evidence = NestedEvidence("n/a", False, False, (), plan_accel, running,
                                          "nested state: not applicable (L1's QEMU moved L2; "
                                          "L2 runs no guest of its own)")  # fmt: skip
        else:
            cyc.evidence = nested_evidence(sections, source=source, l0_accel=plan_accel, l2_running=running)
        res.extra["l2"] = cyc.to_json()
        res.extra["nested_state"] = cyc.evidence.to_json()
        results.append(res)
        if on_cycle is not None:
            on_cycle(res)
        step = attempts.after(res.ok, known, quiesced)
        if step == "next":
            i += 1
        elif step == "stop":
            break
    return results


# --- an L1 with its L2, owned; fast start from a saved pair ------------------------------------

PAIR_FORMAT = 2  # 2: L2's vCPUs paused for the save, continued after the restore


@dataclass
class NestedTimings:
    """How long the pair took to come up (a restored pair also carries the cold timings
    measured when its snapshot was made)."""

    l1_boot_s: float | None = None
    l2_start_s: float | None = None
    l2_ready_s: float | None = None
    restored_s: float | None = None
    snapshot: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pair_snapshot_key(l1: Machine, l2_opts: dict[str, Any]) -> str:
    """The key of a saved L1-with-running-L2: the L1 snapshot key plus L2's options."""
    from harness import snapshots

    text = json.dumps({"format": PAIR_FORMAT, "l1": snapshots.snapshot_key(l1), "l2": l2_opts},
                      sort_keys=True)  # fmt: skip
    return "nested-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def _cold_pair(l1: Machine, plan: L1Plan, l2_opts: dict[str, Any]) -> tuple[L2, NestedTimings]:
    t0 = time.monotonic()
    l1.start()
    timings = NestedTimings(l1_boot_s=l1.ready.seconds if l1.ready else time.monotonic() - t0)
    l2 = L2(l1)
    started = l2.start(**l2_opts)
    timings.l2_start_s, timings.l2_ready_s = round(started.wall_s, 2), started.ready_s
    return l2, timings


def ensure_pair_snapshot(template: Machine, plan: L1Plan, l2_opts: dict[str, Any]) -> Any:
    """The saved pair for ``template``'s inputs (a :class:`harness.snapshots.Snapshot`
    whose meta also holds L2's start record and the cold timings), made if missing: the
    unstarted ``template`` boots, starts L2, is saved with L2's vCPUs paused (continued by
    :func:`restore_pair`), and is stopped."""
    from filelock import FileLock

    from harness import migration, snapshots

    key = pair_snapshot_key(template, l2_opts)
    root = snapshots.snapshots_dir() / key
    snap = snapshots.valid(root)
    if snap is not None:
        return snap
    with FileLock(str(snapshots.snapshots_dir() / f".{key}.lock"), timeout=7200):
        snap = snapshots.valid(root)
        if snap is not None:
            return snap
        tmp = snapshots.snapshots_dir() / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            l2, timings = _cold_pair(template, plan, l2_opts)
            assert l2.started is not None and template.ready is not None
            # L2's vCPUs paused for the cut: with none inside KVM_RUN, L1's vCPU cannot be
            # in L2 guest mode, which a TCG L0's stream cannot carry (a snapshot cut there
            # never restores: GUEST_MODE_LOAD_ERROR, seen on a fresh cache)
            set_l2_running(l2, False)
            l2.close()
            template.ssh.close()  # no half-open sessions in the saved guest
            res = migration.save(template, tmp / snapshots.STATE, check=True)
            shutil.copyfile(template.varstore_path, tmp / snapshots.VARS)
            meta = {
                "key": key, "created": time.time(), "save_s": res.wall_s,
                "boot_s": timings.l1_boot_s, "boot_id": template.ready.boot_id,
                "ready_info": template.ready.info, "machine": migration.machine_type(template),
                "qemu": template.build.label, "state_size": (tmp / snapshots.STATE).stat().st_size,
                "has_vars": True, "vars_size": (tmp / snapshots.VARS).stat().st_size,
                "l2": asdict(l2.started), "l2_opts": l2_opts, "timings": timings.to_json(),
                "l2_paused": True,
            }  # fmt: skip
            (tmp / snapshots.META).write_text(json.dumps(meta, indent=1))
            template.stop(timeout=10)
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            template.stop(timeout=10)
            shutil.rmtree(tmp, ignore_errors=True)
    snap = snapshots.valid(root)
    if snap is None:
        raise MachineError(f"pair snapshot {root} was written but does not validate")
    return snap


def restore_pair(l1: Machine, snap: Any, *, timeout: float = 300.0) -> tuple[L2, NestedTimings]:
    """Start the unstarted ``l1`` from a saved pair and check that its L2 still answers
    (same L2 boot, heartbeat ticking)."""
    from harness import snapshots

    t0 = time.monotonic()
    snapshots.restore_machine(l1, snap, timeout=timeout)
    l2 = L2(l1)
    meta = snap.meta
    l2.started = L2Start(**meta["l2"])
    try:
        if meta.get("l2_paused"):
            set_l2_running(l2, True)  # paused for the save (see ensure_pair_snapshot)
        l2.ssh.connect(timeout=timeout)
        first = l2.agent("heartbeat")
        status = l2.agent("status")
        if status.get("boot_id") != l2.started.boot_id:
            raise StateError(f"restored L2 has boot id {status.get('boot_id')}, the saved L2 had "
                             f"{l2.started.boot_id}")  # fmt: skip
        deadline = time.monotonic() + 60
        while int(l2.agent("heartbeat")["count"]) <= int(first["count"]):
            if time.monotonic() > deadline:
                raise StateError(f"restored L2's heartbeat stands still at {first['count']}")
            time.sleep(0.3)
    except BaseException:
        l2.close()
        raise
    cold = meta.get("timings") or {}
    timings = NestedTimings(cold.get("l1_boot_s"), cold.get("l2_start_s"), cold.get("l2_ready_s"),
                            round(time.monotonic() - t0, 2), snap.key)  # fmt: skip
    return l2, timings


@contextlib.contextmanager
def nested_pair(factory: Any, plan: L1Plan, *, fast: bool = True, l2_mem_mb: int = 512,
                l2_timeout: float = 3000.0) -> Iterator[tuple[Machine, L2, NestedTimings]]:
    """An L1 from ``plan`` made by ``factory`` (a :class:`~harness.factory.MachineFactory`,
    which owns and reaps L1) with its L2 running; L2 is stopped on exit.

    ``fast`` restores the pair from a saved L1 whose L2 was running (made once, cold, per
    set of inputs; a UEFI L2 under a TCG L0 takes many minutes to boot) instead of booting
    both."""
    l2_opts = {"accel": "kvm", "irqchip": plan.l2_irqchip, "boot": "uefi", "mem_mb": l2_mem_mb,
               "timeout": l2_timeout}  # fmt: skip
    fields = plan.spec.to_json()
    l1 = factory(start=False, **fields)
    if fast:
        snap = ensure_pair_snapshot(factory(start=False, **{**fields, "name": "l1tmpl"}), plan, l2_opts)
        l2, timings = restore_pair(l1, snap)
    else:
        l2, timings = _cold_pair(l1, plan, l2_opts)
    try:
        yield l1, l2, timings
    finally:
        l2.stop()
