"""cpr-exec on real guests: QEMU saves the guest to a file and exec's the new QEMU in place.

The seed scenario verbatim ("perform a live update, then, using the same QEMU instance,
another one") on a build whose schema offers cpr-exec (11.1.x brings its own C library and
runs through its own loader here), an update across releases in both directions, and an
exec that fails: the old image must keep the guest."""

from __future__ import annotations

import pytest

from harness import migration, state
from harness.factory import MachineFactory
from harness.inventory import builds
from harness.spec import VmSpec

pytestmark = pytest.mark.integration

CPR_EXEC_BUILD = "11.1.3"


def _spec(name: str, qemu: str = CPR_EXEC_BUILD, machine: str = "q35") -> VmSpec:
    return VmSpec(qemu=qemu, name=name, machine=machine, **migration.spec_fields_for("cpr-exec"))


def _require_cpr_exec(*versions: str) -> None:
    for v in versions:
        caps = builds.get_build(v).capabilities
        if not caps.has_mode("cpr-exec"):  # a catalogue build whose schema lost it: a finding
            pytest.fail(f"QEMU {v} no longer offers cpr-exec (modes: {caps.migration_modes})")


def test_cpr_exec_twice_from_the_same_instance() -> None:
    _require_cpr_exec(CPR_EXEC_BUILD)
    with MachineFactory(_spec("cprexec2"), fast=True) as factory:
        vm = factory()
        proc, pid = vm.process, vm.process.pid
        results = migration.back_to_back(vm, "cpr-exec", 3)
        assert [r.cycle for r in results] == [1, 2, 3], [r.summary() for r in results]
        for r in results:
            assert r.ok, f"cycle {r.cycle}: {r.summary()} {r.problems}"
            assert r.extra["pid_kept"] is True and r.pause_s is not None
        # one process, one owner, three images: the pid and the QemuProcess never changed
        assert vm.process is proc and vm.process.pid == pid
        assert [h.get("exec") for h in vm.history[-3:]] == [True, True, True]
        assert str(vm.sock_dir) in " ".join(proc.cmdline_now())  # the last image's argv
        assert proc.qmp("query-status")["status"] == "running"


def test_cpr_exec_across_releases_both_directions() -> None:
    _require_cpr_exec("11.1.2", "11.1.3")
    old, new = builds.get_build("11.1.2"), builds.get_build("11.1.3")
    machine = builds.newest_common_machine(old.capabilities, new.capabilities)
    with MachineFactory(_spec("cprexecx", qemu=old.label, machine=machine), fast=True) as factory:
        vm = factory()
        pid = vm.process.pid
        results = migration.back_to_back(vm, "cpr-exec", 2, builds=[new, old])
        assert [(r.source, r.destination) for r in results] == [("11.1.2", "11.1.3"), ("11.1.3", "11.1.2")]
        for r in results:
            assert r.ok, f"cycle {r.cycle}: {r.summary()} {r.problems}"
            assert r.machine == machine
        assert vm.process.pid == pid and vm.build.label == "11.1.2"
        version = vm.qmp("query-version")["qemu"]
        assert (version["major"], version["minor"], version["micro"]) == (11, 1, 2)


def test_failed_exec_leaves_the_old_qemu_running_the_guest() -> None:
    _require_cpr_exec(CPR_EXEC_BUILD)
    with MachineFactory(_spec("cprexecf"), fast=True) as factory:
        vm = factory()
        state.write_efivar(vm, "ExecFails", b"kept")
        before = state.snapshot(vm, memory=False)
        proc, pid = vm.process, vm.process.pid
        res = migration.cpr_exec(vm, check=False, command=["/nonexistent/qemu-system-x86_64"])
        assert not res.ok and res.extra.get("exec_failed") is True, res.summary()
        assert "execvp /nonexistent/qemu-system-x86_64 failed" in res.error, res.error
        assert res.source_running is True, res.extra
        assert vm.process is proc and proc.pid == pid
        assert " ".join(proc.cmdline_now()).count("/nonexistent") == 0  # never replaced
        state.assert_survived(before, state.snapshot(vm))
        state.assert_efivar(vm, "ExecFails", b"kept")
        # the same instance still updates afterwards, to the real build
        again = migration.cpr_exec(vm, check=False)
        assert again.ok, again.summary()
        assert proc.pid == pid
        state.assert_survived(before, state.snapshot(vm))
        state.assert_efivar(vm, "ExecFails", b"kept")
