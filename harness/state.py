"""What must survive: a snapshot of guest state and the assertion that it survived.

A :class:`GuestState` records, through the guest agent over SSH, the boot id, uptime,
heartbeat counter, the checksum of the agent's seeded memory region, and hashes of chosen
files.  :func:`assert_survived` compares two snapshots and fails with a message that says
what changed and by how much.

Guest-visible pause: the guest's clock (``/proc/uptime``) stands still while the VM is
stopped (QEMU's virtual clock is stopped with it), so the time the guest lost is the host
time elapsed minus the guest time elapsed between two samples.  Each sample takes the
host time at the midpoint of the fastest of three round trips, so the error is at most
half of that round trip (recorded in ``rtt``).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from harness.errors import StateError

if TYPE_CHECKING:
    from harness.machine import Machine


@dataclass(frozen=True)
class ClockSample:
    """The guest's uptime against the host's monotonic clock."""

    host: float
    guest: float
    rtt: float


@dataclass(frozen=True)
class GuestState:
    """A snapshot of what must survive."""

    boot_id: str
    uptime: float
    heartbeat: int
    mem_checksum: str | None
    mem_expected: str | None
    clock: ClockSample
    files: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def clock_sample(vm: Machine, tries: int = 3) -> ClockSample:
    """The guest's uptime paired with the host time at the midpoint of the fastest try."""
    best: ClockSample | None = None
    for _ in range(tries):
        t0 = time.monotonic()
        out = vm.ssh.run("cat /proc/uptime", timeout=30, check=True).stdout
        t1 = time.monotonic()
        try:
            guest = float(out.split()[0])
        except (IndexError, ValueError) as exc:
            raise StateError(f"guest /proc/uptime unreadable: {out[:100]!r}") from exc
        sample = ClockSample(host=(t0 + t1) / 2, guest=guest, rtt=t1 - t0)
        if best is None or sample.rtt < best.rtt:
            best = sample
    assert best is not None
    return best


def snapshot(vm: Machine, files: Iterable[str] = (), memory: bool = True) -> GuestState:
    """Record the guest's state now."""
    status = vm.agent("status")
    mem: Mapping[str, Any] = vm.agent("mem-checksum") if memory else {}
    hashes: dict[str, str] = {}
    for path in files:
        out = vm.ssh.run(f"sha256sum {shlex.quote(path)}", timeout=60, check=True).stdout
        hashes[path] = out.split()[0] if out.split() else ""
    clock = clock_sample(vm)
    try:
        return GuestState(
            boot_id=str(status["boot_id"]),
            uptime=float(status["uptime"]),
            heartbeat=int(status["heartbeat"]["count"]),
            mem_checksum=mem.get("checksum"),
            mem_expected=mem.get("expected"),
            clock=clock,
            files=hashes,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"guest agent status malformed: {status!r}") from exc


def guest_pause(before: GuestState | ClockSample, after: GuestState | ClockSample) -> float:
    """Seconds the guest's clock stood still between two samples (never negative)."""
    a = before.clock if isinstance(before, GuestState) else before
    b = after.clock if isinstance(after, GuestState) else after
    return max(0.0, (b.host - a.host) - (b.guest - a.guest))


def pause_uncertainty(before: GuestState | ClockSample, after: GuestState | ClockSample) -> float:
    a = before.clock if isinstance(before, GuestState) else before
    b = after.clock if isinstance(after, GuestState) else after
    return (a.rtt + b.rtt) / 2


def survival_problems(before: GuestState, after: GuestState, max_pause: float | None = None) -> list[str]:
    """Everything that did not survive, in words (empty when all did)."""
    problems: list[str] = []
    if after.boot_id != before.boot_id:
        problems.append(f"guest rebooted: boot id {before.boot_id} -> {after.boot_id}")
    else:
        if after.uptime < before.uptime:
            problems.append(f"guest uptime went backwards: {before.uptime:.2f} s -> {after.uptime:.2f} s")
        if after.heartbeat <= before.heartbeat:
            problems.append(
                f"heartbeat did not advance: {before.heartbeat} -> {after.heartbeat} "
                f"(guest time passed: {after.uptime - before.uptime:.2f} s)"
            )
    if before.mem_checksum is not None or after.mem_checksum is not None:
        if after.mem_checksum != before.mem_checksum:
            problems.append(f"memory region checksum changed: {before.mem_checksum} -> {after.mem_checksum}")
        if after.mem_expected is not None and after.mem_checksum != after.mem_expected:
            problems.append(
                f"memory region differs from what was written: {after.mem_checksum} != {after.mem_expected}"
            )
    for path, digest in before.files.items():
        now = after.files.get(path)
        if now != digest:
            problems.append(f"file {path} changed: sha256 {digest[:16]} -> {str(now)[:16]}")
    if max_pause is not None:
        pause = guest_pause(before, after)
        if pause > max_pause:
            problems.append(
                f"guest paused {pause:.3f} s, more than the allowed {max_pause:.3f} s "
                f"(+/- {pause_uncertainty(before, after):.3f} s)"
            )
    return problems


def assert_survived(before: GuestState, after: GuestState, max_pause: float | None = None) -> None:
    """Fail with every difference when the guest's state did not survive."""
    problems = survival_problems(before, after, max_pause)
    if problems:
        raise StateError("guest state did not survive:\n  - " + "\n  - ".join(problems))


EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
HARNESS_GUID = "4a1c2d3e-5b6f-4708-9a1b-2c3d4e5f6071"


def write_efivar(vm: Machine, name: str, data: bytes, guid: str = HARNESS_GUID, attrs: int = 7) -> None:
    """Write an EFI variable from inside the guest (non-volatile by default)."""
    vm.agent("efivar", "set", f"{name}-{guid}", data.hex(), str(attrs))


def read_efivar(vm: Machine, name: str, guid: str = HARNESS_GUID) -> bytes | None:
    """An EFI variable as the guest sees it (None when absent)."""
    res = vm.ssh.run(f"agent efivar get {shlex.quote(name + '-' + guid)}", timeout=60)
    if res.rc != 0:
        return None
    return bytes.fromhex(str(res.json()["data"]))


def assert_efivar(vm: Machine, name: str, expected: bytes, guid: str = HARNESS_GUID) -> None:
    got = read_efivar(vm, name, guid)
    if got != expected:
        raise StateError(
            f"EFI variable {name}-{guid}: expected {expected.hex()} in the guest, "
            f"found {'nothing' if got is None else got.hex()}"
        )
