"""A guest-written EFI variable and a guest-set BootOrder survive live migration,
save/restore, cpr-transfer and cpr-reboot: in the guest's view and in the host-side
varstore file; the destination's varstore (a fresh template copy) equals the source's
byte for byte afterwards; the guest's view equals the file after each operation and after
the guest powers off.  Stateless firmware boots, keeps variables only in guest RAM, and
forgets them when QEMU restarts.

One guest serves several operations.  The migrating guests are restored from a saved boot
(what is checked happens after the start); the stateless guest boots cold, since what it
shows happens at boot.
"""

from __future__ import annotations

import time

import pytest

from harness import migration, state, survival
from harness.errors import StateError
from harness.factory import MachineFactory
from harness.machine import Machine

pytestmark = pytest.mark.integration


def _move(vm: Machine, op: str, planted: survival.Planted) -> migration.MigrationResult:
    """One operation, then every survival check; the source's varstore is captured first."""
    src_vars = vm.varstore_path
    before = state.snapshot(vm, memory=False)
    result = migration.operation(op)(vm)  # check=True: raises MigrationError with the result
    after = state.snapshot(vm)
    state.assert_survived(before, after)
    assert vm.varstore_path != src_vars, f"{op}: the destination reused the source's varstore"
    survival.assert_persisted(vm, planted, source_varstore=src_vars, what=f"after {op}")
    return result


def _poweroff_and_check(vm: Machine, planted: survival.Planted) -> None:
    """Guest view before poweroff == the file QEMU leaves behind."""
    path = vm.varstore_path
    guest_vars = state.guest_variables(vm)
    survival.assert_no_problems(survival.guest_problems(vm, planted, guest_vars), "before poweroff")
    state.poweroff(vm)
    assert not vm.running
    survival.assert_no_problems(
        survival.host_problems(path, planted) + survival.view_problems(path, guest_vars),
        "the varstore file after guest poweroff",
    )


def test_efivarfs_dump_in_one_process_reads_what_each_variable_holds(vm_factory: MachineFactory) -> None:
    """The harness reads the guest's variables with stat, head and od over all of efivarfs
    at once; the per-variable dump must read the same, and a file whose efivarfs size is
    stale (after a write the firmware refused) must be read again on its own."""
    vm = vm_factory(name="dump", fast=True)
    state.write_efivar(vm, "HarnessDump", b"0123456789")
    bulk, again = state.parse_efivar_bulk(vm.ssh.run(state.DUMP_VARS_BULK).stdout) or ({}, ["unparsed"])
    each = state.parse_efivar_dump(vm.ssh.run(state.DUMP_VARS_EACH).stdout)
    assert again == [] and len(bulk) > 20 and bulk == each, sorted(set(bulk) ^ set(each))
    assert bulk[("HarnessDump", state.HARNESS_GUID)] == (7, b"0123456789")
    fname = f"HarnessDump-{state.HARNESS_GUID}"
    path = f"/sys/firmware/efi/efivars/{fname}"
    refused = vm.ssh.run(f"chattr -i {path}; printf '\\006\\000\\000\\000abc' > {path}; echo $?; stat -c %s {path}")
    assert refused.stdout.split() == ["1", "0"], refused.stdout  # other attributes: refused, size now 0
    bulk, again = state.parse_efivar_bulk(vm.ssh.run(state.DUMP_VARS_BULK).stdout) or ({}, ["unparsed"])
    assert again == [fname] and bulk == {k: v for k, v in each.items() if k[0] != "HarnessDump"}
    assert state.guest_variables(vm) == each


@pytest.mark.requires(mode="cpr-transfer")
def test_live_save_restore_and_cpr_transfer_keep_the_varstore(vm_factory: MachineFactory) -> None:
    vm = vm_factory(name="surv-memfd", fast=True, **migration.spec_fields_for("cpr-transfer"))
    planted = survival.plant(vm)
    survival.assert_persisted(vm, planted, what="before any operation")
    timings = {}
    for op in ("live", "save-restore", "cpr-transfer"):
        t0 = time.monotonic()
        _move(vm, op, planted)
        timings[op] = round(time.monotonic() - t0, 2)
    print(f"op+checks wall seconds: {timings}")
    _poweroff_and_check(vm, planted)


@pytest.mark.requires(mode="cpr-transfer")
def test_cpr_reboot_and_cpr_transfer_in_turn_keep_the_varstore(vm_factory: MachineFactory) -> None:
    """Guest RAM in a shared file: cpr-reboot keeps it in place (``x-ignore-shared``),
    cpr-transfer hands its descriptor to the new QEMU, in turn on one guest.  Each hop
    must start from plain settings: a cpr-reboot's new QEMU kept the capability on, and
    the next cpr-transfer's destination refused the stream ("Capability x-ignore-shared
    is off, but received capability is on")."""
    vm = vm_factory(name="surv-file", fast=True, **{**migration.spec_fields_for("cpr-reboot"), "aux_ram_share": True})
    planted = survival.plant(vm)
    for op in ("cpr-reboot", "cpr-transfer", "cpr-reboot"):
        _move(vm, op, planted)
    _poweroff_and_check(vm, planted)


def test_stateless_firmware_forgets_guest_variables_on_restart(vm_factory: MachineFactory) -> None:
    vm = vm_factory(name="stateless", firmware_mode="stateless", fast=True)  # the boot checked is the restart
    planted = survival.plant(vm, boot_order=False)
    # In the running guest the variable is there, and stays there across a live migration
    # (it lives in guest RAM) ...
    survival.assert_persisted(vm, planted, what="on stateless firmware before restart")
    migration.live(vm)
    survival.assert_persisted(vm, planted, what="live migration on stateless firmware")
    # ... but there is no file, and the checks say so rather than failing obscurely.
    with pytest.raises(StateError, match="stateless firmware"):
        survival.host_problems(vm, planted)
    spec = vm.spec
    vm.stop()
    again = vm_factory(**{k: getattr(spec, k) for k in ("name", "firmware", "firmware_mode")})
    assert again.spec == spec
    survival.assert_forgotten(again, planted)
    with pytest.raises(StateError, match="stateless firmware: variables live in guest RAM only"):
        (name, guid), value = next(iter(planted.variables.items()))
        state.assert_efivar(again, name, value, guid)
