"""Fault injection on real guests (TCG, QEMU 10.0.2): migrations cancelled at each phase,
destinations killed mid-migration and mid-cpr-transfer, a bad destination, a UUID mismatch
with validate-uuid, corrupted state files, no space left while saving, and crashed, paused
and frozen guests.  Each check records the guest's state before and asserts it survived.

Guests are shared across checks (one per spec, fast-started from a snapshot and replaced
when a check leaves it dead), so the checks stay independent without a boot each.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import faults, migration, snapshots, state
from harness.errors import GuestTimeout, HarnessError, MachineError
from harness.factory import private_base
from harness.machine import Machine
from harness.spec import VmSpec

pytestmark = pytest.mark.integration

UUID_A = "11111111-1111-1111-1111-111111111111"
UUID_B = "22222222-2222-2222-2222-222222222222"
LIVE_SPEC = VmSpec(name="flive", uuid=UUID_A)
CPR_SPEC = VmSpec(name="fcpr", **migration.spec_fields_for("cpr-transfer"))


class GuestPool:
    """One running guest per spec, shared by the checks of this module."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._vms: dict[str, Machine] = {}
        self._n = 0

    def get(self, spec: VmSpec) -> Machine:
        vm = self._vms.get(spec.name)
        if vm is not None and vm.running and _answers(vm):
            return vm
        if vm is not None:
            vm.stop(hard=True)
        self._n += 1
        n = self._n
        machine = Machine(spec, self.base / f"{n}-{spec.name}")
        vm = snapshots.start_fast(machine, make_template=lambda: Machine(spec, self.base / f"t{n}"))
        self._vms[spec.name] = vm
        return vm

    def close(self, keep: Path | None) -> None:
        for vm in self._vms.values():
            vm.stop(hard=True)
        if keep is not None:
            shutil.copytree(self.base, keep, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock", "guest-ram", "state*.bin"))
        shutil.rmtree(self.base, ignore_errors=True)


def _answers(vm: Machine) -> bool:
    try:
        return vm.ssh.run("true", timeout=20).rc == 0 and bool(vm.qmp("query-status").get("running"))
    except HarnessError:
        return False


@pytest.fixture(scope="module")
def pool(request: pytest.FixtureRequest) -> Iterator[GuestPool]:
    p = GuestPool(private_base("-faults"))
    failed_before = request.session.testsfailed
    yield p
    failed = request.session.testsfailed > failed_before
    p.close(keep=Path("artifacts") / "test_faults" if failed else None)


@pytest.fixture
def live_vm(pool: GuestPool) -> Machine:
    return pool.get(LIVE_SPEC)


@pytest.fixture
def cpr_vm(pool: GuestPool) -> Machine:
    return pool.get(CPR_SPEC)


# --- live migration: cancel at each phase, destination killed, bad destination ------------


@pytest.mark.parametrize("phase", faults.LIVE_PHASES)
def test_cancel_at_each_phase_keeps_the_source_running(live_vm: Machine, phase: str) -> None:
    before = state.snapshot(live_vm, memory=False)
    pid = live_vm.process.pid
    res = faults.live_fault(live_vm, phase=phase, fault="cancel", timeout=60)
    assert res.extra["reached"] == phase, res.extra
    if phase == "setup":
        assert res.extra["still_setup_after_1s"], "the migration left setup before the cancel"
    assert res.status == "cancelled", res.summary()
    assert res.source_running, res.extra
    assert live_vm.process.pid == pid  # the same QEMU still runs the guest
    state.assert_survived(before, state.snapshot(live_vm))


def test_destination_killed_mid_migration(live_vm: Machine) -> None:
    before = state.snapshot(live_vm, memory=False)
    res = faults.live_fault(live_vm, phase="active", fault="kill-destination", timeout=60)
    assert res.extra["reached"] == "active"
    assert res.extra["destination_exit"] == -9
    assert res.status == "failed" and res.signature == "destination-aborted", res.summary()
    assert res.source_running
    state.assert_survived(before, state.snapshot(live_vm))


def test_destination_killed_before_switchover(live_vm: Machine) -> None:
    # QEMU 10.0.2: paused before switchover (the guest is stopped), the source waits for
    # migrate-continue and does not notice a dead destination (no return path): it stays
    # in pre-switchover until cancelled, then resumes the guest.
    before = state.snapshot(live_vm, memory=False)
    res = faults.live_fault(live_vm, phase="pre-switchover", fault="kill-destination", timeout=8)
    assert res.extra["reached"] == "pre-switchover"
    assert res.extra["final"].get("stuck_in") == "pre-switchover", res.extra
    assert res.status == "cancelled" and res.source_running, res.summary()
    state.assert_survived(before, state.snapshot(live_vm))


def test_destination_vanishing_after_the_source_completed(live_vm: Machine) -> None:
    # The window precopy without a return path leaves open (met for real by aarch64's
    # 7.2 -> 10.0.2 refusal in CI): the source reports 'completed' and sits in
    # 'postmigrate', then the destination is gone.  The harness resumes the source with
    # 'cont'; the guest's disk and varstore (inactivated at completion) work again.
    before = state.snapshot(live_vm, memory=False)
    pid = live_vm.process.pid
    res = faults.live_to_vanishing_destination(live_vm, timeout=120)
    assert res.extra["final"].get("status") == "completed", res.extra
    assert res.extra["runstate_after"] == "postmigrate", res.extra
    assert res.extra["bytes_taken"] > 1 << 20, res.extra
    assert res.extra["source_recovery"] == "resumed with 'cont' from postmigrate", res.extra
    assert res.source_running and live_vm.process.pid == pid
    state.assert_survived(before, state.snapshot(live_vm))
    state.write_efivar(live_vm, "AfterPostmigrate", b"written")  # pflash writable again
    assert state.read_efivar(live_vm, "AfterPostmigrate") == b"written"
    assert live_vm.ssh.run("echo ok > /root/after-postmigrate && sync", timeout=30).rc == 0


def test_bad_destination(live_vm: Machine, tmp_path: Path) -> None:
    before = state.snapshot(live_vm, memory=False)
    res = faults.migrate_to_uri(live_vm, f"unix:{tmp_path / 'nobody-listens.sock'}")
    assert res.status == "failed" and res.signature == "destination-unreachable", res.summary()
    assert "nobody-listens.sock" in res.error
    assert res.source_running
    state.assert_survived(before, state.snapshot(live_vm))


def test_uuid_mismatch_with_validate_uuid(live_vm: Machine) -> None:
    before = state.snapshot(live_vm, memory=False)
    pid = live_vm.process.pid
    spec = live_vm.spec
    live_vm.spec = spec.replace(uuid=UUID_B)  # the destination is started with another -uuid
    try:
        res = migration.live(live_vm, capabilities=["validate-uuid"], check=False)
    finally:
        live_vm.spec = spec
    assert not res.ok
    assert res.signature == "uuid-mismatch", res.error
    assert UUID_A in res.error and UUID_B in res.error
    assert res.source_running, res.summary()
    assert live_vm.process.pid == pid
    live_vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "validate-uuid", "state": False}])
    state.assert_survived(before, state.snapshot(live_vm))


def test_guest_still_migrates_after_the_faults(live_vm: Machine) -> None:
    before = state.snapshot(live_vm, memory=False)
    res = migration.live(live_vm, check=False)
    assert res.ok, res.summary()
    state.assert_survived(before, state.snapshot(live_vm))


# --- cpr-transfer: destination killed mid-transfer -------------------------------------------


@pytest.mark.requires(mode="cpr-transfer")
def test_destination_killed_mid_cpr_transfer(cpr_vm: Machine) -> None:
    state.write_efivar(cpr_vm, "FaultCpr", b"kept")
    before = state.snapshot(cpr_vm, memory=False)
    pid = cpr_vm.process.pid
    res = faults.cpr_transfer_kill_destination(cpr_vm, timeout=60)
    # the source sent its CPR state and waits in setup for the destination to hang up
    assert res.extra["reached"] == "setup" and res.extra["status_after_1s"] == "setup", res.extra
    assert res.extra["running_while_waiting"], "cpr-transfer stopped the guest before switchover"
    assert res.status == "failed", res.summary()
    assert res.signature == "destination-unreachable", res.error
    assert res.source_running and cpr_vm.process.pid == pid
    state.assert_survived(before, state.snapshot(cpr_vm))
    # nothing lost: the guest's RAM memfds and varstore still carry a real cpr-transfer
    ok = migration.cpr_transfer(cpr_vm, check=False)
    assert ok.ok, ok.summary()
    state.assert_survived(before, state.snapshot(cpr_vm))
    state.assert_efivar(cpr_vm, "FaultCpr", b"kept")


# --- state files: corrupted, and no space left ----------------------------------------------


@pytest.fixture(scope="module")
def saved_state(pool: GuestPool) -> Iterator[Path]:
    vm = pool.get(LIVE_SPEC)
    path = vm.workdir.parent / "state-good.bin"
    res = migration.save(vm, path, resume=True)
    assert res.ok and vm.qmp("query-status").get("running")
    yield path
    path.unlink(missing_ok=True)


CORRUPTIONS: dict[str, tuple[Callable[[Path, Path], Path], set[str]]] = {
    "truncated-half": (lambda s, d: faults.truncate_copy(s, d, 0.5), {"state-file-truncated"}),
    # 6 bytes: the magic and half the version word; QEMU 10.0.2 reads the rest as zeros
    "truncated-header": (lambda s, d: faults.truncate_copy(s, d, 6), {"unsupported-version"}),
    "bitflip-magic": (lambda s, d: faults.bitflip_copy(s, d, (0,)), {"bad-magic"}),
    "bitflip-version": (lambda s, d: faults.bitflip_copy(s, d, (7,), bit=3), {"unsupported-version"}),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_corrupted_state_file_fails_classified_and_untouched(
    live_vm: Machine, saved_state: Path, tmp_path: Path, damage: str,
) -> None:
    make, expected = CORRUPTIONS[damage]
    bad = make(saved_state, tmp_path / f"{damage}.bin")
    digest, mtime = faults.sha256(bad), bad.stat().st_mtime_ns
    good_digest = faults.sha256(saved_state)
    pid = live_vm.process.pid
    before = state.snapshot(live_vm, memory=False)
    res = migration.restore(live_vm, bad, check=False)
    assert not res.ok and res.status == "failed", res.summary()
    assert res.signature in expected, f"{res.signature}: {res.error[-600:]}"
    assert faults.sha256(bad) == digest and bad.stat().st_mtime_ns == mtime
    assert faults.sha256(saved_state) == good_digest
    assert live_vm.process.pid == pid and live_vm.running  # the running guest is untouched
    state.assert_survived(before, state.snapshot(live_vm))


@pytest.mark.skipif(faults.can_mount() is not None, reason=str(faults.can_mount()))
def test_no_space_left_while_saving(live_vm: Machine) -> None:
    before = state.snapshot(live_vm, memory=False)
    with faults.small_tmpfs("16M") as fs:
        assert faults.is_mountpoint(fs) and (fs.stat().st_mode & 0o777) == 0o700
        previous = fs / "state.bin"
        previous.write_bytes(os.urandom(2 << 20))
        digest = faults.sha256(previous)
        res = migration.save(live_vm, previous, check=False)
        assert not res.ok and res.signature == "no-space", res.summary()
        assert "No space left on device" in res.error
        assert res.source_running, "a failed save must leave the guest running"
        assert faults.sha256(previous) == digest
        assert sorted(p.name for p in fs.iterdir()) == ["state.bin"]  # no partial file left
    assert not faults.is_mountpoint(fs) and not fs.exists()
    state.assert_survived(before, state.snapshot(live_vm))


# --- paused and frozen guests: waits stay bounded ---------------------------------------------


def test_paused_guest_waits_are_bounded(live_vm: Machine) -> None:
    before = state.snapshot(live_vm, memory=False)
    live_vm.qmp("stop")
    try:
        t0 = time.monotonic()
        with pytest.raises(GuestTimeout):
            live_vm.console.wait_for("NEVER-PRINTED", timeout=3)
        with pytest.raises(GuestTimeout):
            live_vm.ssh.run("agent status", timeout=5)
        assert time.monotonic() - t0 < 40
    finally:
        live_vm.qmp("cont")
    live_vm.ssh.close()
    state.assert_survived(before, state.snapshot(live_vm))


def test_frozen_qemu_waits_are_bounded(live_vm: Machine) -> None:
    before = state.snapshot(live_vm, memory=False)
    with faults.frozen(live_vm.current):
        t0 = time.monotonic()
        with pytest.raises(GuestTimeout):
            live_vm.console.wait_for("NEVER-PRINTED", timeout=3)
        with pytest.raises(GuestTimeout):
            live_vm.ssh.run("agent status", timeout=5)
        assert time.monotonic() - t0 < 40
    live_vm.ssh.close()
    state.assert_survived(before, state.snapshot(live_vm))


def test_crash_during_a_wait_ends_the_wait(live_vm: Machine) -> None:
    # runs last among the shared-guest checks: the pool replaces the dead guest
    timer = threading.Timer(1.0, faults.crash, args=(live_vm.current,))
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(MachineError, match="QEMU exited"):
            live_vm.console.wait_for("NEVER-PRINTED", timeout=120)
    finally:
        timer.join()
    assert time.monotonic() - t0 < 15
    with pytest.raises(MachineError):
        live_vm.qmp("query-status")
    assert faults.find_qemu(live_vm.workdir) == []


# --- a whole test run with a crashed and a hung guest -----------------------------------------

INNER = """
import os, tempfile, threading
from pathlib import Path
import pytest
from harness import faults
from harness import snapshots
from harness.machine import Machine

def fast(vm_factory, tmp_path):
    vm = vm_factory(start=False, name="inner")
    short = Path(tempfile.mkdtemp(prefix="t", dir=os.environ["HARNESS_RUNDIR"]))  # socket paths
    return snapshots.start_fast(vm, make_template=lambda: Machine(vm.spec, short / "t"))

def test_guest_crashes(vm_factory, tmp_path):
    vm = fast(vm_factory, tmp_path)
    vm.qmp("query-status")
    threading.Timer(1.0, faults.crash, args=(vm.current,)).start()
    vm.console.wait_for("NEVER-PRINTED", timeout=600)

def test_guest_hangs(vm_factory, tmp_path):
    vm = fast(vm_factory, tmp_path)
    vm.qmp("query-status")
    faults.freeze(vm.current)
    vm.ssh.run("agent status", timeout=10)
"""


def test_crashed_and_hung_guests_fail_in_bounded_time_with_artifacts(
    pytester: pytest.Pytester, harness_rundir: Path, tmp_path: Path,
    find_qemu: Callable[[str], list[int]],
) -> None:
    art = tmp_path / "art"
    pytester.makepyfile(test_inner=INNER)
    t0 = time.monotonic()
    res = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider",
                                        f"--harness-artifacts={art}", timeout=900)
    took = time.monotonic() - t0
    res.assert_outcomes(failed=2)
    res.stdout.fnmatch_lines(["*QEMU exited while waiting*", "*timed out after 10.0s*"])
    assert took < 600, f"the inner run took {took:.0f} s"
    for test in ("test_guest_crashes", "test_guest_hangs"):
        kept = next(art.glob(f"test_inner.py_{test}*"))
        guest = next(p for p in kept.iterdir() if p.is_dir())
        names = {p.name for p in guest.iterdir()}
        assert {"qemu-0.cmdline.txt", "qemu-0.log", "qemu-0.serial.log", "qemu-0.qmp.log"} <= names, names
        assert '"execute": "query-status"' in (guest / "qemu-0.qmp.log").read_text()
        assert test in (kept / "failure.txt").read_text()
    assert find_qemu(str(harness_rundir)) == []


def test_diagnosis_of_a_running_and_a_paused_guest() -> None:
    # what a failed guest check records: QEMU's run state and the vCPU's program counter
    from harness.factory import MachineFactory

    with MachineFactory(VmSpec(name="diag"), fast=True) as factory:
        vm = factory()
        running = state.diagnose(vm, interval=0.2)
        assert running["status"] == "running" and "error" not in running, running
        assert all(s["pc"].startswith("0x") for s in running["vcpu"])
        assert isinstance(running["console_tail"], str)
        vm.qmp("stop")
        paused = state.diagnose(vm, interval=0.2)
        assert paused["status"] == "paused" and paused["pc_moving"] is False, paused
        assert state.describe_diagnosis(paused).startswith("QEMU status paused; vCPU pc 0x")
        vm.qmp("cont")
        assert vm.ssh.run("true", timeout=30).rc == 0
