"""Fast start: boot a guest once, save it, and restore every later guest from the save.

A :class:`Snapshot` is a booted guest of one (image, QEMU build, firmware, spec) saved to a
state file plus the varstore it had, under ``<cache>/snapshots/<key>/``.  The key hashes
every input that shapes the guest (the spec's fields except its name, the QEMU binary,
the firmware code and template, the image's inputs), so a changed input makes a new
snapshot.  Creating one is guarded by a file lock: xdist workers wait for the first.

A restored guest is a new QEMU process with its own copy of the varstore and its own
work directory; the state file is only read.  What it shares with the snapshot, and what
the harness changes after the restore (see docs/performance.md, "Fast start"):

- the kernel's boot id is the snapshot's (it is set at boot);  the harness gives each
  restored guest a fresh ``instance_id`` (``Machine.ready.info``);
- the heartbeat counter and ``/proc/uptime`` continue from the snapshot's values;
- the wall clock would be stale: it is set to the host's time;
- the RNG would replay the snapshot's pool: it is reseeded with 64 fresh host bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from harness.errors import MachineError
from harness.machine import Machine, Ready
from harness.paths import cache_root, ensure_dir
from harness.spec import VmSpec

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
STATE = "state.bin"
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


def snapshots_dir() -> Path:
    return ensure_dir(cache_root() / "snapshots")


def valid(root: Path) -> Snapshot | None:
    try:
        meta = json.loads((root / META).read_text())
        if (root / STATE).stat().st_size != meta["state_size"]:
            return None
        if meta.get("has_vars") and (root / VARS).stat().st_size != meta["vars_size"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Snapshot(root.name, root, meta)


def ensure_snapshot(template_machine: Machine, boot_timeout: float | None = None) -> Snapshot:
    """The snapshot for this machine's inputs, creating it (cold boot + save) if needed.

    ``template_machine`` must not be started; it is booted in its own work directory
    and stopped again when a snapshot has to be made."""
    from harness import migration

    key = snapshot_key(template_machine)
    root = snapshots_dir() / key
    snap = valid(root)
    if snap is not None:
        return snap
    with FileLock(str(snapshots_dir() / f".{key}.lock"), timeout=1800):
        snap = valid(root)
        if snap is not None:
            return snap
        t0 = time.monotonic()
        tmp = snapshots_dir() / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            vm = template_machine
            if boot_timeout is not None:
                vm.start(timeout=boot_timeout)
            else:
                vm.start()
            ready = vm.ready
            # drop our SSH session so the saved guest holds no half-open connection
            vm.ssh.close()
            res = migration.save(vm, tmp / STATE, check=True)
            has_vars = vm.varstore_template is not None and vm.spec.firmware_mode == "split"
            if has_vars:
                # QEMU flushes pflash writes to the file as they happen; the saved stream
                # carries the same contents, so this copy is the snapshot's varstore
                shutil.copyfile(vm.varstore_path, tmp / VARS)
            meta = {
                "key": key,
                "created": time.time(),
                "boot_s": ready.seconds if ready else None,
                "save_s": res.wall_s,
                "boot_id": ready.boot_id if ready else None,
                "ready_info": ready.info if ready else {},
                "machine": migration.machine_type(vm),
                "qemu": vm.build.label,
                "state_size": (tmp / STATE).stat().st_size,
                "has_vars": has_vars,
                "vars_size": (tmp / VARS).stat().st_size if has_vars else 0,
            }
            (tmp / META).write_text(json.dumps(meta, indent=1))
            vm.stop(timeout=5)
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
            log.info("snapshot %s made in %.1f s", key, time.monotonic() - t0)
        finally:
            template_machine.stop(timeout=5)
            shutil.rmtree(tmp, ignore_errors=True)
    snap = valid(root)
    if snap is None:
        raise MachineError(f"snapshot {root} was written but does not validate")
    return snap


def restore_machine(machine: Machine, snap: Snapshot, timeout: float = 120.0) -> Machine:
    """Start ``machine`` (not yet started) from ``snap``: a fresh QEMU loads the state."""
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
    inc = machine.spawn(varstore=varstore, machine=str(snap.meta["machine"]), incoming=["defer"])
    try:
        migration.incoming(inc.process, migration.incoming_uri(machine.build, snap.state))
        why = migration.wait_loaded(inc.process, timeout)
        if why:
            raise MachineError(f"restoring snapshot {snap.root} failed: {why}\n{inc.process.output()[-2000:]}")
        machine.adopt(inc)
        instance = secrets.token_hex(8)
        machine.ready = Ready(
            boot_id=str(snap.meta.get("boot_id")),
            seconds=time.monotonic() - t0,
            info={**snap.meta.get("ready_info", {}), "restored_from": snap.key, "instance_id": instance},
        )
        nonce = request_refresh(machine)  # the guest works on it while SSH connects
        machine.ssh.connect(timeout=60)
        await_refresh(machine, nonce)
    except BaseException:
        machine.stop(hard=True)
        raise
    machine.ready.seconds = time.monotonic() - t0
    return machine


REFRESHED_RE = r"HARNESS-REFRESH(ED|-FAILED) {nonce}"


def request_refresh(machine: Machine) -> str:
    """Type the identity refresh on a restored guest's console (agent protocol 2: the
    guest's init reads it, see guests/README.md): the host's clock, 32 fresh random bytes
    for its RNG, and a nonce its answer repeats.  Returns the nonce.  Every guest restored
    from one snapshot starts with the same RNG pool and the clock of the moment it was
    saved; over SSH after the connection this cost 45-80 ms, on the console it overlaps
    the handshake."""
    nonce = secrets.token_hex(8)
    machine.console.mark()
    machine.console.write(f"harness-refresh {int(time.time())} {secrets.token_hex(32)} {nonce}\n")
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


def clear(spec: VmSpec | None = None) -> int:
    """Delete every snapshot (the cache rebuilds them); returns how many were removed."""
    n = 0
    for p in snapshots_dir().iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n
