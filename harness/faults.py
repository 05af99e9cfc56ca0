"""Fault injection: break things on purpose, and find what a broken run left behind.

The reliability tests (``tests/integration/test_faults.py``, ``test_orphans.py``) and the
soak (``harness soak``) use these helpers; each does one thing to a guest, a QEMU process,
a file or the host and says what it did:

- migrations stopped on purpose: :func:`live_with_fault` drives a live migration to the
  phase asked for (``setup``, ``active``, ``pre-switchover``) and then cancels it or kills
  the destination, :func:`cpr_transfer_kill_destination` kills a cpr-transfer
  destination after the source has sent its CPR state, and
  :func:`live_to_vanishing_destination` lets the source complete into a
  :func:`draining_listener` (a destination gone after the source called it done);
- processes: :func:`freeze`/:func:`thaw` (SIGSTOP/SIGCONT a QEMU), :func:`crash`
  (SIGKILL without reaping), :func:`find_qemu` (QEMU processes whose command line names a
  path: leaked ones after a run);
- files: :func:`truncate_copy`, :func:`bitflip_copy` (corrupted state files beside the
  original), :func:`sha256`;
- the host: :func:`small_tmpfs` mounts a tiny tmpfs (root only) for "no space left" and
  always unmounts it.

Nothing here hides a failure: every helper raises :class:`~harness.errors.HarnessError`
subclasses with the process, file or mount it was working on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import migration
from harness.errors import ConfigError, HarnessError, HostError, MachineError, UnsupportedError
from harness.machine import Incarnation, Machine
from harness.migration import MigrationResult
from harness.paths import file_sha256

log = logging.getLogger(__name__)

LIVE_PHASES = ("setup", "active", "pre-switchover")
FAULTS = ("cancel", "kill-destination")


# --- processes -----------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _pids() -> list[int]:
    """Every process id in /proc now."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def find_qemu(marker: str | Path) -> list[int]:
    """Live (non-zombie) QEMU processes whose command line contains ``marker`` (a work
    directory, say): what a run that used that directory left behind."""
    text = str(marker)
    found = []
    for pid in _pids():
        args = _cmdline(pid)
        # the emulator, or a loader running it (a build with its own C library)
        if not args or not any("qemu-system" in Path(a).name for a in args[:4]):
            continue
        if any(text in a for a in args) and not _is_zombie(pid):
            found.append(pid)
    return sorted(found)


def processes_with_env(name: str, value: str) -> list[int]:
    """Live (non-zombie) processes, other than this one, whose environment holds
    ``name=value``: every descendant of a process started with it inherits it, across new
    sessions and reparenting, unless it built its environment from scratch."""
    want = f"{name}={value}".encode()
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if want in env and not _is_zombie(pid):
            found.append(pid)
    return sorted(found)


def describe_pids(pids: list[int]) -> list[str]:
    """``pid: command line`` (shortened) of each process, for a leak report."""
    out = []
    for pid in pids:
        args = _cmdline(pid)
        out.append(f"{pid}: {' '.join(args)[:160] if args else '(gone)'}")
    return out


def ignores_signal(pid: int, sig: int) -> bool:
    """Whether process ``pid`` ignores ``sig`` (its ``SigIgn`` mask in /proc): a child
    started from a background job inherits SIGINT ignored, and then Ctrl-C tests nothing."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    raise HostError(f"/proc/{pid}/status has no SigIgn line")


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive (zombies count as gone); return the survivors."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return alive


def kill_pids(pids: list[int]) -> None:
    """SIGKILL exactly these processes (cleanup of leaks a test found; never by name)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def freeze(inc: Incarnation) -> int:
    """SIGSTOP a QEMU process (a hung guest: QMP and SSH stop answering); returns its pid."""
    pid = inc.process.pid
    os.kill(pid, signal.SIGSTOP)
    return pid


def thaw(pid: int) -> None:
    """SIGCONT a process stopped with :func:`freeze` (harmless if it is gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def frozen(inc: Incarnation) -> Iterator[int]:
    """The QEMU process stopped for the duration of the block, continued afterwards."""
    pid = freeze(inc)
    try:
        yield pid
    finally:
        thaw(pid)


def crash(inc: Incarnation) -> int:
    """SIGKILL a QEMU process behind the harness's back (a crash); the owner still reaps it.
    Waits until the process has died; returns its pid."""
    pid = inc.process.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while inc.process.running:
        if time.monotonic() > deadline:
            raise MachineError(f"{inc.process.name} (pid {pid}) still running 10 s after SIGKILL")
        time.sleep(0.05)
    return pid


# --- files ---------------------------------------------------------------------------


#: a file's sha256 (to prove a failed load left it untouched)
sha256 = file_sha256


def truncate_copy(src: Path, dest: Path, keep: int | float = 0.5) -> Path:
    """``dest`` = the first ``keep`` bytes (an int) or fraction (a float) of ``src``."""
    size = src.stat().st_size
    n = int(size * keep) if isinstance(keep, float) else int(keep)
    if not 0 <= n < size:
        raise HarnessError(f"truncate {src} ({size} bytes) to {n}: not shorter")
    with src.open("rb") as fin, dest.open("wb") as fout:
        remaining = n
        while remaining:
            chunk = fin.read(min(1 << 20, remaining))
            if not chunk:
                break
            fout.write(chunk)
            remaining -= len(chunk)
    os.chmod(dest, 0o600)
    return dest


def bitflip_copy(src: Path, dest: Path, offsets: tuple[int, ...] = (0,), bit: int = 0) -> Path:
    """``dest`` = ``src`` with bit ``bit`` flipped at each offset (negative: from the end)."""
    data = bytearray(src.read_bytes())
    for off in offsets:
        i = off if off >= 0 else len(data) + off
        if not 0 <= i < len(data):
            raise HarnessError(f"bit flip at {off} outside {src} ({len(data)} bytes)")
        data[i] ^= 1 << bit
    dest.write_bytes(bytes(data))
    os.chmod(dest, 0o600)
    return dest


# --- host: a small tmpfs -------------------------------------------------------------


def can_mount() -> str | None:
    """None when this process can mount a tmpfs, else why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if not Path("/bin/mount").exists() and not Path("/usr/bin/mount").exists():
        return "mount(8) is not installed"
    return None


@contextlib.contextmanager
def small_tmpfs(size: str = "8M", base: Path | None = None) -> Iterator[Path]:
    """A freshly mounted tmpfs of ``size`` (mode 0700), unmounted and removed on exit."""
    why = can_mount()
    if why:
        raise HostError(why)
    point = Path(tempfile.mkdtemp(prefix="hv-tmpfs-", dir=base))
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            raise HostError(f"mount tmpfs on {point} failed ({res.returncode}): {res.stderr.strip()}")
        try:
            yield point
        finally:
            um = subprocess.run(["umount", str(point)], capture_output=True, text=True,
                                timeout=30, check=False)  # fmt: skip
            if um.returncode != 0:  # busy: detach lazily so the test run never leaves it
                subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30,
                               check=False)  # fmt: skip
    finally:
        with contextlib.suppress(OSError):
            point.rmdir()


def is_mountpoint(path: Path) -> bool:
    """Whether ``path`` is listed in /proc/self/mounts."""
    text = Path("/proc/self/mounts").read_text()
    return any(line.split()[1] == str(path) for line in text.splitlines() if len(line.split()) > 1)


# --- migrations stopped on purpose -----------------------------------------------------

#: max-bandwidth (bytes/s) that keeps a live migration of a 1 GiB guest "active" for
#: many seconds, long enough to act on it
SLOW_BANDWIDTH = 1 << 20


@contextlib.contextmanager
def stalled_listener(path: Path) -> Iterator[Path]:
    """A unix socket whose accept queue is full: a client's ``connect()`` blocks until the
    listener closes, so a migration to it stays in ``setup``.  Proven full before use."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(str(path))
        os.chmod(path, 0o600)
        srv.listen(0)
        filler.setblocking(False)
        filler.connect(str(path))
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except BlockingIOError:
            pass  # the queue is full: what we want
        else:
            raise HostError(f"{path}: a second connect was accepted; cannot stall a client")
        yield path
    finally:
        for s in (probe, filler, srv):
            s.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def draining_listener(path: Path) -> Iterator[dict[str, int]]:
    """A unix socket that accepts one connection and reads everything sent to it, then
    is gone: to the source QEMU, a destination that took the whole stream and died before
    loading it.  Yields a dict whose ``bytes`` grows as data arrives."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    seen = {"bytes": 0}
    stop = threading.Event()

    def drain() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.2)
                while not stop.is_set():
                    try:
                        chunk = conn.recv(1 << 20)
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                    if not chunk:
                        return
                    seen["bytes"] += len(chunk)

    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(1)
    worker = threading.Thread(target=drain, name=f"drain {path.name}", daemon=True)
    worker.start()
    try:
        yield seen
    finally:
        stop.set()
        worker.join(5)
        srv.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def live_to_vanishing_destination(vm: Machine, *, timeout: float = 120.0) -> MigrationResult:
    """A live migration whose destination takes the whole stream and dies before loading
    it (:func:`draining_listener`).  Precopy without a return path calls that
    'completed': the source stops in 'postmigrate' with nobody running the guest, the
    window a destination that refuses a late section falls into.  The driver's recovery
    (:func:`harness.migration.recover`) then has to bring the guest back."""
    sock = vm.sock_dir / f"drain-{time.monotonic_ns() % 10**9}.sock"
    with draining_listener(sock) as seen:
        runstate: dict[str, Any] = {}

        def settled(info: dict[str, Any]) -> None:  # before the recovery
            runstate["after"] = vm.current.process.qmp("query-status").get("status")

        result = migration.live(vm, timeout=timeout, check=False,
                                hooks=migration.Hooks(target=f"unix:{sock}", on_settled=settled))
    result.op, result.destination = "live-vanishing-destination", "draining listener"
    result.extra.update(bytes_taken=seen["bytes"], runstate_after=runstate.get("after"))
    final = result.extra["final"]
    result.error = ""
    result.fail(f"the destination vanished after taking {seen['bytes']} bytes "
                f"(source migration status {final.get('status')})", status=str(final.get("status")))
    return result


def live_fault(
    vm: Machine,
    *,
    phase: str,
    fault: str,
    dest_args: tuple[str, ...] = (),
    capabilities: tuple[str, ...] = (),
    timeout: float = 120.0,
) -> MigrationResult:
    """Start a live migration of ``vm`` (:func:`harness.migration.live`, the driver users
    run) and, once it reaches ``phase`` (``setup``, ``active``, ``pre-switchover``),
    ``cancel`` it or ``kill-destination``.

    ``setup`` migrates to a :func:`stalled_listener` (the connection never completes);
    ``active`` throttles the stream to :data:`SLOW_BANDWIDTH`; ``pre-switchover`` turns on
    ``pause-before-switchover``.  The driver puts the source's settings back and reaps the
    destination.  The result records the status the fault met (``extra['reached']``), the
    source's final migration status (``status``, ``extra['final']``), whether the guest
    still runs there (``source_running``), and QEMU's error, classified."""
    if phase not in LIVE_PHASES:
        raise ConfigError(f"phase {phase!r}: expected one of {', '.join(LIVE_PHASES)}")
    if fault not in FAULTS:
        raise ConfigError(f"fault {fault!r}: expected one of {', '.join(FAULTS)}")
    if phase == "setup" and fault != "cancel":
        raise ConfigError("a migration in setup has no destination QEMU to kill (use cancel)")
    caps = list(capabilities) + (["pause-before-switchover"] if phase == "pre-switchover" else [])
    migration.check_caps(caps, vm.build)
    src = vm.current
    extra: dict[str, Any] = {"fault": fault, "phase": phase}
    dest: list[Incarnation] = []

    def inject(status: str, info: dict[str, Any]) -> bool:
        if status != phase:
            return False
        extra["reached"] = status
        if phase == "setup":
            time.sleep(1.0)  # it really stays there
            extra["still_setup_after_1s"] = migration.status(src.process) == "setup"
        if fault == "cancel":
            migration.cancel(src.process)
        else:
            os.kill(dest[0].process.pid, signal.SIGKILL)
        return True

    with contextlib.ExitStack() as stack:
        target = None
        if phase == "setup":
            sock = stack.enter_context(stalled_listener(vm.workdir / f"stall-{time.monotonic_ns()}.sock"))
            target = f"unix:{sock}"
        hooks = migration.Hooks(target=target, dest_args=dest_args, on_destination=dest.append,
                                on_status=inject, stuck_after=timeout)  # fmt: skip
        result = migration.live(vm, capabilities=caps, timeout=timeout, check=False, hooks=hooks,
                                bandwidth=SLOW_BANDWIDTH if phase == "active" else None)  # fmt: skip
    result.op = f"live-{fault}-at-{phase}"
    if phase == "setup":
        result.destination = "stalled listener"
    result.extra.update(extra)
    if "reached" not in extra:
        statuses = result.extra["final"].get("statuses", [])
        result.fail(f"the migration went through {', '.join(statuses)} without reaching {phase}")
    return result


def migrate_to_uri(vm: Machine, uri: str, *, timeout: float = 60.0) -> MigrationResult:
    """A live migration of ``vm`` to ``uri`` with no destination of ours (a bad destination):
    the result carries QEMU's error, classified, and whether the guest still runs."""
    result = migration.live(vm, timeout=timeout, check=False, hooks=migration.Hooks(target=uri))
    result.op = "live-bad-destination"
    return result


def cpr_transfer_kill_destination(vm: Machine, *, timeout: float = 120.0) -> MigrationResult:
    """cpr-transfer (:func:`harness.migration.cpr_transfer`) with the destination killed
    mid-transfer: the destination is frozen (SIGSTOP) once its CPR socket listens, the
    source is told to migrate (it connects the CPR channel, sends its CPR state including
    the guest-RAM memfds, and waits in ``setup`` for the destination to hang up that
    channel before it connects the main one), then the destination is SIGKILLed.

    QEMU 10.0.2 (migration.c, qmp_migrate): the hang-up of the CPR channel is the signal to
    connect the main channel; a dead destination hangs up too, so the source tries to
    connect, fails, and the migration ends ``failed`` with the guest still running on the
    source (it was never stopped: cpr-transfer stops the guest only at switchover)."""
    if not vm.build.capabilities.has_mode("cpr-transfer"):
        raise UnsupportedError("migration mode cpr-transfer", f"QEMU {vm.build.label}")
    src = vm.current
    extra: dict[str, Any] = {}
    frozen_pid: list[int] = []

    def freeze_it(dest: Incarnation) -> None:
        frozen_pid.append(freeze(dest))

    def kill_it(status: str, info: dict[str, Any]) -> bool:
        extra["reached"] = status
        time.sleep(1.0)
        extra["status_after_1s"] = migration.status(src.process)
        extra["running_while_waiting"] = migration.guest_running(src)
        os.kill(frozen_pid[0], signal.SIGKILL)
        thaw(frozen_pid[0])
        return True

    try:
        result = migration.cpr_transfer(vm, timeout=timeout, check=False, hooks=migration.Hooks(
            on_destination=freeze_it, on_status=kill_it, stuck_after=timeout))
    finally:
        for pid in frozen_pid:  # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    result.op = "cpr-transfer-kill-destination"
    result.extra.update(extra)
    return result
