"""Fast start: boot a guest once, save it, and restore every later guest from the save.

A :class:`Snapshot` is a booted guest of one (image, QEMU build, firmware, spec) saved to a
state file plus the varstore it had, under ``<cache>/snapshots/<key>/``.  A guest with
plain RAM keeps its RAM in a RAM image beside the state, as QEMU's VM templating does: the
template guest runs on a shared file-backed RAM (under the machine's default RAM id, so
it still migrates to and from default RAM), is saved with ``x-ignore-shared`` (the state
then holds the devices, 4 MB instead of 150), and every restore maps the image
copy-on-write instead of loading 150 MB (``restore_machine``).  The key hashes
every input that shapes the guest (the spec's fields except its name, the QEMU binary,
the firmware code and template, the image's inputs), so a changed input makes a new
snapshot.  Creating one is guarded by a file lock: xdist workers wait for the first.

A restored guest is a new QEMU process with its own copy of the varstore and its own
work directory; the state file and the RAM image are only read.  What it shares with the
snapshot, and what the harness changes after the restore (see docs/performance.md, "Fast
start"):

- the kernel's boot id is the snapshot's (it is set at boot);  the harness gives each
  restored guest a fresh ``instance_id`` (``Machine.ready.info``);
- the heartbeat counter and ``/proc/uptime`` continue from the snapshot's values;
- the wall clock would be stale: it is set to the host's time;
- the RNG would replay the snapshot's pool: 24 fresh host bytes are written to
  ``/dev/urandom``, stirred into the input pool (the kernel's generator takes them at its
  next reseed; dropbear mixes the clock and /proc counters into every connection's keys).

A snapshot is saved once the guest is quiet (:func:`await_quiet`), and a restore makes one
round of QEMU's self-announce instead of five (:func:`restore_params`): what a restored
guest runs before its first SSH login, in a QEMU whose translation cache is empty, is most
of a restore's time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from harness.errors import MachineError
from harness.inventory.catalog import Version
from harness.machine import DEFAULT_BOOT_TIMEOUT, Machine, Ready
from harness.paths import cache_root, ensure_dir
from harness.spec import DEFAULT_RAM_ID, RamImage

log = logging.getLogger(__name__)

#: 2: a plain-RAM guest's RAM is a RAM image beside a state of its devices
#: 3: saved once the guest has closed the harness's SSH connection (no stray session)
#: 4: saved once the guest is quiet (await_quiet; meta "quiet", "quiet_s")
SNAPSHOT_FORMAT = 4
STATE = "state.bin"
RAM = "ram.img"
IGNORE_SHARED = "x-ignore-shared"
MAPPED_RAM = "mapped-ram"
VARS = "vars.fd"
META = "meta.json"


def _file_id(path: Path | None) -> str:
    if path is None:
        return "-"
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def snapshot_key(machine: Machine) -> str:
    """A hash of everything that shapes the saved guest."""
    spec = dataclasses.asdict(machine.spec)
    spec.pop("name", None)
    spec["extra_args"] = list(machine.spec.extra_args)
    spec["guest_config"] = dict(machine.spec.guest_config)
    inputs = {
        "format": SNAPSHOT_FORMAT,
        "spec": spec,
        "accel": machine.accel,
        "qemu": _file_id(machine.build.binary),
        "code": _file_id(machine.firmware_code),
        "template": _file_id(machine.varstore_template),
        "image": machine.image.inputs_hash,
    }
    stream = stream_caps(machine)
    if stream:  # a stream written another way is another snapshot
        inputs["stream"] = stream
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Snapshot:
    """A saved booted guest."""

    key: str
    root: Path
    meta: dict[str, Any]

    @property
    def state(self) -> Path:
        return self.root / STATE

    @property
    def varstore(self) -> Path | None:
        p = self.root / VARS
        return p if p.exists() else None

    @property
    def ram(self) -> Path | None:
        """The RAM image, when the guest's RAM is not in the state."""
        return self.root / RAM if self.meta.get("ram_image") else None


def snapshots_dir() -> Path:
    return ensure_dir(cache_root() / "snapshots")


def valid(root: Path) -> Snapshot | None:
    try:
        meta = json.loads((root / META).read_text())
        if (root / STATE).stat().st_size != meta["state_size"]:
            return None
        if meta.get("has_vars") and (root / VARS).stat().st_size != meta["vars_size"]:
            return None
        image = meta.get("ram_image")
        if image:
            st = (root / RAM).stat()
            if (st.st_size, st.st_mtime_ns) != (image["size"], image["mtime_ns"]):
                log.warning("snapshot %s: its RAM image changed since it was made; making it again", root)
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Snapshot(root.name, root, meta)


def ram_image_ok(machine: Machine) -> bool:
    """Whether ``machine``'s snapshot keeps its RAM in a RAM image: plain RAM on an
    architecture whose default RAM id is known, and a build with ``x-ignore-shared``."""
    return (machine.spec.memory_backend == "plain" and machine.spec.arch in DEFAULT_RAM_ID
            and machine.build.capabilities.has_capability(IGNORE_SHARED))  # fmt: skip


def stream_caps(machine: Machine) -> list[str]:
    """The capabilities a snapshot of ``machine`` is saved and loaded with, besides a RAM
    image's ``x-ignore-shared``: ``mapped-ram`` (QEMU 9.0+, file migration) when the RAM
    is in the state - a shared (memfd, file) RAM, which no RAM image can stand in for.
    Each page then has its place in a sparse file and a restore reads only the pages
    that are not zero; a plain stream's zero pages are each checked on the destination,
    and a read of a shared page allocates it: a restored 1 GiB memfd guest held all 1 GiB
    and loaded in 1.4-1.6 s, with mapped-ram 155 MB and 0.2 s (QEMU 10.0.2, 2026-12-02).
    The hops under test keep the stream they are asked for."""
    caps = machine.build.capabilities
    if ram_image_ok(machine) or not caps.file_uri or not caps.has_capability(MAPPED_RAM):
        return []
    return [MAPPED_RAM]


def ensure_snapshot(template_machine: Machine, boot_timeout: float | None = None) -> Snapshot:
    """The snapshot for this machine's inputs, creating it (cold boot + save) if needed.

    ``template_machine`` must not be started; it is booted in its own work directory
    and stopped again when a snapshot has to be made."""

    def boot(image: RamImage | None) -> dict[str, Any]:
        template_machine.start(timeout=boot_timeout or DEFAULT_BOOT_TIMEOUT, ram_image=image)
        return {}

    return create(snapshot_key(template_machine), template_machine, boot)


def create(key: str, template: Machine, boot: Callable[[RamImage | None], dict[str, Any]], *,
           lock_timeout: float = 1800.0) -> Snapshot:
    """The snapshot ``key``, made if missing (under a lock: xdist workers wait for the first).

    ``boot(image)`` starts the unstarted ``template`` with its RAM in ``image`` (None: its
    usual RAM) and returns what it adds to the snapshot's meta; the guest is then saved -
    with ``x-ignore-shared`` when its RAM is an image, so that the state holds only the
    devices and the image is the RAM - and stopped."""
    from harness import migration

    root = snapshots_dir() / key
    snap = valid(root)
    if snap is not None:
        return snap
    with FileLock(str(snapshots_dir() / f".{key}.lock"), timeout=lock_timeout):
        snap = valid(root)
        if snap is not None:
            return snap
        t0 = time.monotonic()
        tmp = snapshots_dir() / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            image = RamImage(tmp / RAM, shared=True) if ram_image_ok(template) else None
            extra = boot(image)
            ready = template.ready
            template.ssh.close()  # the saved guest holds no half-open connection
            await_connections_closed(template)
            t_quiet = time.monotonic()
            quiet = await_quiet(template)
            quiet_s = time.monotonic() - t_quiet
            caps = [IGNORE_SHARED] if image is not None else stream_caps(template)
            res = migration.save(template, tmp / STATE, capabilities=caps, check=True)
            has_vars = template.varstore_template is not None and template.spec.firmware_mode == "split"
            if has_vars:
                # QEMU flushes pflash writes to the file as they happen; the saved stream
                # carries the same contents, so this copy is the snapshot's varstore
                shutil.copyfile(template.varstore_path, tmp / VARS)
            meta = {
                "key": key,
                "format": SNAPSHOT_FORMAT,
                "created": time.time(),
                "boot_s": ready.seconds if ready else None,
                "save_s": res.wall_s,
                "quiet": quiet,  # await_quiet: the guest ran no new code when it was saved
                "quiet_s": round(quiet_s, 3),
                "boot_id": ready.boot_id if ready else None,
                "ready_info": ready.info if ready else {},
                "machine": migration.machine_type(template),
                "qemu": template.build.label,
                "stream_caps": caps,  # what the load sets too
                "state_size": (tmp / STATE).stat().st_size,
                "has_vars": has_vars,
                "vars_size": (tmp / VARS).stat().st_size if has_vars else 0,
                **extra,
            }
            template.stop(timeout=10)  # QEMU no longer maps the RAM image
            if image is not None:
                meta["ram_image"] = _seal(image.path)
            (tmp / META).write_text(json.dumps(meta, indent=1))
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
            log.info("snapshot %s made in %.1f s", key, time.monotonic() - t0)
        finally:
            template.stop(timeout=10)
            shutil.rmtree(tmp, ignore_errors=True)
    snap = valid(root)
    if snap is None:
        raise MachineError(f"snapshot {root} was written but does not validate")
    return snap


#: a TCP connection SLIRP still has open with the guest (`info usernet`): any state but the
#: forward's listener, and the closed ones (TIME_WAIT: both ends have closed)
_OPEN_TCP = re.compile(r"TCP\[(?!HOST_FORWARD\]|TIME_WAIT\]|CLOSED\])[A-Z_0-9]+\]")


def await_connections_closed(machine: Machine, timeout: float = 10.0) -> None:
    """Wait until the guest has closed its end of every forwarded connection, as SLIRP's
    socket table shows it: the dropbear process of the harness's last SSH session has then
    exited, instead of waiting in the saved guest - and in every guest restored from it -
    for a peer that is gone.  A guest that has not closed in ``timeout`` is saved anyway
    (logged): a stray process there costs nothing but tidiness."""
    deadline = time.monotonic() + timeout
    while True:
        table = str(machine.qmp("human-monitor-command", **{"command-line": "info usernet"}))
        if not _OPEN_TCP.search(table):
            return
        if time.monotonic() > deadline:
            log.warning("%s: connections still open before the save: %s", machine.spec.name,
                        " | ".join(line.strip() for line in table.splitlines() if _OPEN_TCP.search(line)))  # fmt: skip
            return
        time.sleep(0.01)


_TB_COUNT = re.compile(r"TB count\s+(\d+)")


def await_quiet(machine: Machine, *, still_s: float = 0.2, timeout: float = 5.0) -> bool:
    """Wait until the guest runs no code it has not run before: under TCG, until QEMU's
    count of translated blocks (``info jit``) stays the same for ``still_s``.  Whatever
    a guest is still doing when it is saved - its last SSH session's process exiting, a
    worker the session woke - every guest restored from it does again first, in a QEMU
    whose translation cache is empty: a freshly restored guest translates every path it
    takes (30 000 blocks before its first SSH login, 15 000 of them for the work it
    resumed), and that, not the load, is most of a restore's time.  The heartbeat's
    10 Hz loop runs code already translated.  Returns whether the guest went quiet
    (False after ``timeout``, logged; True at once where there is no translator, KVM)."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        text = str(machine.qmp("human-monitor-command", **{"command-line": "info jit"}))
        m = _TB_COUNT.search(text)
        if m is None:
            return True  # not TCG: nothing is translated
        now, count = time.monotonic(), int(m.group(1))
        if count != last:
            last, since = count, now
        elif now - since >= still_s:
            return True
        if now > deadline:
            log.warning("%s: the guest still ran new code %.0f s after its last session closed "
                        "(%d translated blocks); saved anyway", machine.spec.name, timeout, count)  # fmt: skip
            return False
        time.sleep(0.02)


def _seal(path: Path) -> dict[str, Any]:
    """Make a finished RAM image durable and read-only; what :func:`valid` checks of it
    (an image changed since - written, truncated, a hole punched - is a different one)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o400)
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "allocated": st.st_blocks * 512}


def restore_machine(machine: Machine, snap: Snapshot, timeout: float = 120.0) -> Machine:
    """Start ``machine`` (not yet started) from ``snap``: a fresh QEMU loads the state.

    A snapshot with a RAM image is mapped copy-on-write as the guest's RAM (nothing of
    the RAM is loaded; pages are read from the page cache as the guest touches them)."""
    from harness import migration

    t0 = time.monotonic()
    varstore = None
    if snap.varstore is not None:
        varstore = machine.workdir / "vars.fd"
        if varstore.exists():
            raise MachineError(f"{varstore} exists; a restore never overwrites a varstore")
        shutil.copyfile(snap.varstore, varstore)
        os.chmod(varstore, 0o600)
    machine._last_varstore = varstore
    with contextlib.suppress(OSError):  # last used: what `harness snapshots prune` goes by
        os.utime(snap.root / META)
    image = None
    if snap.ram is not None:
        # read-only as RAM where QEMU can (8.2): not even a discard can reach the file
        readonly = not machine.build.version < Version((8, 2))
        image = RamImage(snap.ram, shared=False, readonly=readonly)
    inc = machine.spawn(varstore=varstore, machine=str(snap.meta["machine"]), incoming=["defer"],
                        ram_image=image)  # fmt: skip
    caps = [IGNORE_SHARED] if image is not None else list(snap.meta.get("stream_caps", []))
    try:
        # the stream's RAM list carries addresses; one self-announce round (restore_params), and
        # QEMU's own values back once the guest runs, for the hops that follow
        params = restore_params(machine)
        current = inc.process.qmp("query-migrate-parameters") if params else {}
        before = {k: current[k] for k in params if k in current}
        migration.configure(inc.process, caps, params)
        migration.incoming(inc.process, migration.incoming_uri(machine.build, snap.state))
        why = migration.wait_loaded(inc.process, timeout)
        if why:
            raise MachineError(f"restoring snapshot {snap.root} failed: {why}\n{inc.process.output()[-2000:]}")
        machine.adopt(inc)
        nonce = request_refresh(machine)  # the guest works on it while SSH connects
        instance = secrets.token_hex(8)
        machine.ready = Ready(
            boot_id=str(snap.meta.get("boot_id")),
            seconds=time.monotonic() - t0,
            info={**snap.meta.get("ready_info", {}), "restored_from": snap.key, "instance_id": instance},
        )
        machine.ssh.connect(timeout=60)
        # later migrations start plain; while the guest still works on its refresh
        migration.reset(inc.process, caps, mode_param=False)
        if before:
            inc.process.qmp("migrate-set-parameters", **before)
        await_refresh(machine, nonce)
    except BaseException:
        machine.stop(hard=True)
        raise
    machine.ready.seconds = time.monotonic() - t0
    return machine


def restore_params(machine: Machine) -> dict[str, Any]:
    """Migration parameters for loading a snapshot: ``announce-rounds`` 1.  After an
    incoming migration QEMU announces the guest's MAC address (a RARP from QEMU, and a
    virtio-net guest asked to send its own gratuitous ARP) so that switches learn where the
    guest moved, five rounds by default over the first second - each one an interrupt the
    freshly restored guest serves while its first login runs.  A restored guest did not
    move, and on the harness's user-mode network (SLIRP) one round is plenty (its ARP tells
    SLIRP the guest's address).  Not 0: QEMU then frees virtio-net's announce timer and
    crashes on the guest's next reset (the announce-timer-freed finding).  A spec whose
    extra arguments bring another network keeps QEMU's default."""
    extra = machine.spec.extra_args
    if "-netdev" in extra or "-nic" in extra:
        return {}
    if "announce-rounds" not in machine.build.capabilities.migration_parameters:
        return {}
    return {"announce-rounds": 1}


REFRESHED_RE = r"HARNESS-REFRESH(ED|-FAILED) {nonce}\b"


def request_refresh(machine: Machine) -> str:
    """Type the identity refresh on a restored guest's console (agent protocol 2: the
    guest's init reads it, see guests/README.md): the host's clock, 24 fresh random bytes
    (base64) for its RNG, and a nonce its answer repeats.  Returns the nonce.  Every guest
    restored from one snapshot starts with the same RNG pool and the clock of the moment it
    was saved; over SSH after the connection this cost 45-80 ms, on the console it overlaps
    the handshake.  The line is short: the guest's shell reads it a byte per system call."""
    nonce = secrets.token_hex(4)
    machine.console.mark()
    machine.console.write(f"harness-refresh {int(time.time())} {secrets.token_urlsafe(24)} {nonce}\n")
    return nonce


def await_refresh(machine: Machine, nonce: str, timeout: float = 30.0) -> None:
    """The guest's answer to :func:`request_refresh` on the console."""
    m = machine.console.wait_for(REFRESHED_RE.format(nonce=nonce), timeout, poll=0.003,
                                 what="the restored guest's answer to the identity refresh")  # fmt: skip
    if m.group(1) != "ED":
        raise MachineError(f"the restored guest could not set its clock or reseed its RNG ({m.group(0)})")


def start_fast(machine: Machine, *, make_template: Callable[[], Machine]) -> Machine:
    """Start ``machine`` from its snapshot, making the snapshot first with ``make_template()``
    (a fresh, unstarted Machine of the same spec in its own work directory)."""
    key = snapshot_key(machine)
    snap = valid(snapshots_dir() / key)
    if snap is None:
        snap = ensure_snapshot(make_template())
    return restore_machine(machine, snap)


def clear() -> int:
    """Delete every snapshot (the cache rebuilds them); returns how many were removed."""
    n = 0
    for p in snapshots_dir().iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


@dataclass(frozen=True)
class Entry:
    """One directory of the snapshot cache, as ``harness snapshots list`` shows it."""

    key: str
    path: Path
    valid: bool
    bytes_used: int  # allocated on disk (a RAM image is sparse)
    last_used: float  # a restore touches the meta; a snapshot never restored: its making
    qemu: str = "?"
    machine: str = "?"
    format: int = 0  # SNAPSHOT_FORMAT when made (recorded from format 3 on; 0: older)


def _bytes_used(root: Path) -> int:
    total = 0
    for f in root.iterdir():
        with contextlib.suppress(OSError):
            total += f.stat().st_blocks * 512
    return total


def entries() -> list[Entry]:
    """Every snapshot directory of the cache, the least recently used first."""
    out = []
    for p in snapshots_dir().iterdir():
        if not p.is_dir() or p.name.startswith("."):
            continue
        snap = valid(p)
        try:
            last = (p / META).stat().st_mtime
        except OSError:
            last = p.stat().st_mtime
        meta = snap.meta if snap else {}
        out.append(Entry(p.name, p, snap is not None, _bytes_used(p), last,
                         str(meta.get("qemu", "?")), str(meta.get("machine", "?")),
                         int(meta.get("format", 0))))  # fmt: skip
    return sorted(out, key=lambda e: e.last_used)


_PARTIAL_RE = re.compile(r"^\.(?P<key>.+)\.partial-(?P<pid>\d+)$")


def prune(older_than_s: float, *, dry_run: bool = False) -> list[Path]:
    """Remove what the cache no longer needs: snapshots not restored for ``older_than_s``
    seconds (their inputs changed - another QEMU build, image or spec - or nobody uses
    them), snapshots of an older format (no key of this harness reaches them again),
    directories that do not validate, a crashed run's half-made snapshots (their
    maker's pid is gone), and lock files of snapshots that are no longer there.  The
    snapshot cache otherwise only grows: every changed input makes a new one.  Returns
    the paths removed (or that would be, with ``dry_run``)."""
    now = time.time()
    doomed: list[Path] = []
    for e in entries():
        if not e.valid or e.format < SNAPSHOT_FORMAT or now - e.last_used > older_than_s:
            doomed.append(e.path)
    for p in snapshots_dir().iterdir():
        m = _PARTIAL_RE.match(p.name)
        if m and not Path(f"/proc/{m.group('pid')}").exists():
            doomed.append(p)
        elif p.name.startswith(".") and p.name.endswith(".lock"):
            key = p.name[1:-len(".lock")]
            with contextlib.suppress(OSError):
                if not (snapshots_dir() / key).exists() and now - p.stat().st_mtime > 86400:
                    doomed.append(p)  # a maker holds its lock for minutes, never a day
    if not dry_run:
        for p in doomed:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
    return doomed
