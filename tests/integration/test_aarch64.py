"""aarch64 guests on TCG: the ARM VM System Specification's UEFI behaviour under AAVMF.

- first boot from a pristine varstore (Debian's blank AAVMF_VARS.fd: no variables at all):
  AAVMF formats the store, finds the removable-media path \\EFI\\BOOT\\BOOTAA64.EFI on the
  ESP and builds a default boot order;
- an OS-set BootOrder (a new Boot0100 first) and an OS-written variable persist across a
  guest reboot, live migration, save/restore and cpr-reboot (10.0.2), and two
  cpr-transfers in a row; the last process's varstore file carries them and the next boot
  takes Boot0100;
- cross-version 7.2 -> 10.0.2 on the versioned virt-7.2 machine with a named CPU model
  (cortex-a57, not -cpu max): QEMU refuses the CPU state in both directions (listed in
  firmware/expected-incompatibilities.toml); the guest keeps running on the source, and
  virt-7.2 migrates within 7.2;
- fw_cfg boot order (-boot order=, bootindex) against the varstore, recorded per AAVMF
  version in firmware/bootorder-fwcfg-aarch64.toml (re-record with
  ``HARNESS_RECORD_BOOTORDER=1``; a recording run skips);
- ``harness boot --arch aarch64 -- uname -m`` prints ``aarch64``.

The machine is small and shared: each test runs one aarch64 guest at a time, and the
persistence scenario reuses one guest for every step.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness import bootorder, matrix, migration, state, varstore
from harness.factory import MachineFactory
from harness.images import ensure_image
from harness.inventory import builds, firmware
from harness.survival import assert_no_problems

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

ARCH = "aarch64"
CPU = "cortex-a57"  # in 7.2 and 10.0.2; unlike -cpu max its migration ABI is fixed
AAVMF_VERSIONS = ("2020.11", "2022.11", "2025.02")
RECORD = Path(__file__).resolve().parents[2] / "firmware" / "bootorder-fwcfg-aarch64.toml"
VAR = "HarnessArm"
VALUE = b"aarch64 survives \x00\x01\xfe"
# The ESP is the first PCI device on the virt machine's root bus (virtio-blk-pci), as
# virt-firmware prints device paths (the raw FAT image has no partition table).
ESP_PATH = "PciRoot()/PCI(dev=01:0)"
TIMINGS = os.environ.get("HARNESS_AARCH64_TIMINGS")  # append JSON lines here when set


def _note(**data: Any) -> None:
    """Every scenario step as one JSON record that names the architecture."""
    record = {"arch": ARCH, **data}
    log.info("aarch64: %s", json.dumps(record))
    if TIMINGS:
        with open(TIMINGS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def test_image_is_an_aarch64_uki_on_an_esp() -> None:
    img = ensure_image("minimal", ARCH)
    assert img.arch == ARCH and img.name == "minimal-aarch64"
    data = img.uki.read_bytes()
    pe = int.from_bytes(data[0x3C:0x40], "little")
    assert data[pe : pe + 4] == b"PE\0\0"
    assert int.from_bytes(data[pe + 4 : pe + 6], "little") == 0xAA64  # IMAGE_FILE_MACHINE_ARM64
    names = {data[pe + 24 + int.from_bytes(data[pe + 20 : pe + 22], "little") + 40 * i:][:8]
             .rstrip(b"\0") for i in range(int.from_bytes(data[pe + 6 : pe + 8], "little"))}  # fmt: skip
    assert {b".linux", b".initrd", b".cmdline", b".osrel"} <= names
    listing = subprocess.run(["mdir", "-b", "-i", str(img.esp), "::/EFI/BOOT"], capture_output=True,
                             text=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, check=True)  # fmt: skip
    assert "BOOTAA64.EFI" in listing.stdout.upper()


def test_first_boot_from_pristine_varstore(vm_factory: MachineFactory) -> None:
    fw = firmware.get_firmware("2022.11", ARCH)
    template = fw.select().vars_template
    assert firmware.is_blank(template), f"{template} is no longer blank: pick a blank AAVMF"
    t0 = time.monotonic()
    vm = vm_factory(arch=ARCH, qemu="10.0.2", firmware="2022.11", cpu=CPU, name="arm-first")
    _note(step="boot-to-ssh", qemu="10.0.2", firmware="2022.11", cpu=CPU,
          ready_s=round(vm.ready.seconds if vm.ready else -1, 1),
          ssh_s=round(time.monotonic() - t0, 1))  # fmt: skip
    assert vm.ssh.run("uname -m").stdout.strip() == "aarch64"

    view = bootorder.guest_boot(vm)
    assert view.current is not None, "BootCurrent missing on a UEFI boot"
    bootorder.assert_booted(vm, view.current, view=view)  # guest and firmware agree
    booted = view.entries[view.current]
    assert ESP_PATH in booted.device_path, (
        f"booted {view.title(view.current)} at {booted.device_path}, not the ESP disk")
    assert view.order and view.current in view.order

    # The firmware formatted the blank store and wrote its default boot options to it.
    model = varstore.read_varstore(vm.varstore_path)
    assert_no_problems(bootorder.boot_order_problems(view.order, model.boot_order, "the varstore file"),
                       "default boot order")  # fmt: skip
    assert view.current in model.boot_entries

    # The agent works as on x86: heartbeat, memory region, EFI variables.
    hb1 = vm.agent("heartbeat")["count"]
    mem = vm.agent("mem-checksum")
    assert mem["checksum"] == mem["expected"]
    assert vm.agent("heartbeat")["count"] > hb1
    state.write_efivar(vm, VAR, VALUE)
    state.assert_efivar(vm, VAR, VALUE)


def _assert_persisted(vm: Any, order: tuple[int, ...], where: str) -> None:
    state.assert_efivar(vm, VAR, VALUE)
    view = bootorder.guest_boot(vm)
    model = varstore.read_varstore(vm.varstore_path)
    assert_no_problems(
        bootorder.boot_order_problems(order, view.order, "the guest")
        + bootorder.boot_order_problems(order, model.boot_order, "the varstore file")
        + ([] if (VAR, state.HARNESS_GUID) in model.variables
           else [f"{VAR} missing from {vm.varstore_path}"]),
        where,
    )  # fmt: skip


def _set_os_state(vm: Any) -> tuple[int, ...]:
    """The OS writes a variable and puts its own boot entry first (UEFI 3.3, 3.4.1.1)."""
    state.write_efivar(vm, VAR, VALUE)
    first = bootorder.guest_boot(vm)
    bootorder.add_boot_entry(vm, view=first)
    order = (bootorder.USER_ENTRY, *(n for n in first.order if n != bootorder.USER_ENTRY))
    bootorder.set_boot_order(vm, order)
    return order


def _step(vm: Any, what: str, run: Any, order: tuple[int, ...]) -> None:
    before = state.snapshot(vm, memory=False)
    result = run()
    result.extra["arch"] = ARCH
    after = state.snapshot(vm)
    state.assert_survived(before, after)
    _assert_persisted(vm, order, f"after {what}")
    _note(step=what, **{k: result.to_json()[k] for k in
                        ("op", "source", "destination", "machine", "status", "wall_s",
                         "downtime_ms", "pause_s")})  # fmt: skip


def _ok_or_expected(vm: Any, result: Any) -> Any:
    """The result of a hop that succeeded; for one that failed as an entry of the expected
    incompatibilities says it may, after checking the guest went on on the source, the
    test is an expected failure naming the entry; any other failure fails the test."""
    if result.ok:
        return result
    verdict, expected = matrix.judge_result(result, matrix.load_incompatibilities())
    assert verdict.expected_failure and expected is not None, f"{result.summary()}: {verdict.note}"
    assert migration.source_still_running(vm), f"{result.summary()}: the guest did not go on on the source"
    pytest.xfail(f"{result.summary()} ({expected.where}: {expected.reason[:160]})")


def test_os_state_persists_across_reboot_migration_save_restore_cpr(vm_factory: MachineFactory) -> None:
    build = builds.get_build("10.0.2", ARCH)
    if not build.capabilities.has_mode("cpr-reboot"):
        pytest.fail(f"QEMU {build.label} lost cpr-reboot")
    # restored from a saved boot: the reboots below are the boots this test checks
    vm = vm_factory(arch=ARCH, qemu="10.0.2", cpu=CPU, firmware="2022.11", name="arm-persist", fast=True,
                    **migration.spec_fields_for("cpr-reboot"))  # fmt: skip
    machine = migration.machine_type(vm)
    assert machine.startswith("virt-10.0"), machine
    _note(step="restore-to-ssh", qemu="10.0.2", firmware="2022.11", cpu=CPU, machine=machine,
          ready_s=round(vm.ready.seconds if vm.ready else -1, 1))  # fmt: skip
    order = _set_os_state(vm)

    mark = state.reboot(vm)
    bootorder.assert_booted(vm, bootorder.USER_ENTRY, since=mark)
    _assert_persisted(vm, order, "after a reboot")

    for what, run in (
        ("live 10.0.2 -> 10.0.2", lambda: migration.live(vm, to=build, check=True)),
        ("save-restore 10.0.2", lambda: migration.save_restore(vm, to=build, check=True)),
        ("cpr-reboot 10.0.2", lambda: migration.cpr_reboot(vm, to=build, check=True)),
    ):
        _step(vm, what, run, order)
        assert migration.machine_type(vm) == machine

    # The varstore file the last process wrote is the one the next boot reads.
    mark = state.reboot(vm)
    bootorder.assert_booted(vm, bootorder.USER_ENTRY, since=mark)
    _assert_persisted(vm, order, "after a reboot following the migrations")


@pytest.mark.exhaustive  # x86's back-to-back cpr-transfer tests run in make test
def test_os_state_persists_across_back_to_back_cpr_transfer(vm_factory: MachineFactory) -> None:
    """cpr-transfer on aarch64 (10.0.2): guest RAM in a memfd handed to the new QEMU, twice
    in a row; the OS-set BootOrder and variable survive, and the next boot takes them."""
    build = builds.get_build("10.0.2", ARCH)
    if not build.capabilities.has_mode("cpr-transfer"):
        pytest.fail(f"QEMU {build.label} ({ARCH}) lost cpr-transfer")
    vm = vm_factory(arch=ARCH, qemu="10.0.2", cpu=CPU, firmware="2022.11", name="arm-cprt",
                    fast=True, **migration.spec_fields_for("cpr-transfer"))  # fmt: skip
    machine = migration.machine_type(vm)
    order = _set_os_state(vm)
    for n in (1, 2):
        _step(vm, f"cpr-transfer #{n} 10.0.2",
              lambda: migration.cpr_transfer(vm, to=build, check=True), order)  # fmt: skip
        assert migration.machine_type(vm) == machine
    mark = state.reboot(vm)
    bootorder.assert_booted(vm, bootorder.USER_ENTRY, since=mark)
    _assert_persisted(vm, order, "after a reboot following two cpr-transfers")


@pytest.mark.exhaustive  # tests/integration/test_new_releases.py runs on x86 in make test
def test_new_releases_migrate_and_cpr_exec_on_aarch64(vm_factory: MachineFactory) -> None:
    """The newer suites' ARM emulators (own C library, through their loader) with AAVMF
    2026.08: 11.1.3 -> 10.0.13 on the newest virt type both offer is an expected failure
    (the data says which; the guest stays on the source), then live 11.1.3 -> 11.1.2 and
    back, and cpr-exec updates of the same process 11.1.3 -> 11.1.3 -> 11.1.2; the OS-set
    state survives each."""
    old, new, peer = (builds.get_build(v, ARCH) for v in ("10.0.13", "11.1.3", "11.1.2"))
    for b in (old, new, peer):
        assert b.loader is not None, f"{b.label} should run through its own loader"
    if not new.capabilities.has_mode("cpr-exec"):
        pytest.fail(f"QEMU {new.label} ({ARCH}) lost cpr-exec")
    machine = builds.newest_common_machine(old.capabilities, new.capabilities, family="virt")
    vm = vm_factory(arch=ARCH, qemu="11.1.3", machine=machine, cpu=CPU, firmware="2026.08",
                    name="arm-new", fast=True, **migration.spec_fields_for("cpr-exec"))  # fmt: skip
    order = _set_os_state(vm)
    before = state.snapshot(vm, memory=False)
    back = migration.live(vm, to=old, check=False)
    expected = matrix.load_incompatibilities().lookup(
        new.version, old.version, "live", machine, arch=ARCH, signature=None if back.ok else back.signature)
    verdict = matrix.judge(not back.ok, back.signature, expected)
    _note(step=f"live 11.1.3 -> 10.0.13 ({machine})", status=back.status,
          signature=back.signature, expected_failure=verdict.expected_failure)  # fmt: skip
    assert verdict.ok or verdict.expected_failure, f"{back.summary()}: {verdict.note}"
    if verdict.expected_failure:
        assert migration.source_still_running(vm), "the refused migration took the guest down"
        state.assert_survived(before, state.snapshot(vm))
        _assert_persisted(vm, order, "on the source after the refused migration")
    _step(vm, f"live 11.1.3 -> 11.1.2 ({machine})", lambda: migration.live(vm, to=peer), order)
    _step(vm, f"live 11.1.2 -> 11.1.3 ({machine})", lambda: migration.live(vm, to=new), order)
    pid = vm.process.pid
    for n, dest in ((1, new), (2, peer)):
        _step(vm, f"cpr-exec #{n} -> {dest.label}", lambda d=dest: migration.cpr_exec(vm, to=d), order)
        assert vm.process.pid == pid and migration.machine_type(vm) == machine
    mark = state.reboot(vm)
    bootorder.assert_booted(vm, bootorder.USER_ENTRY, since=mark)
    _assert_persisted(vm, order, "after a reboot following the migrations and cpr-execs")


def test_cross_version_virt_7_2_is_an_expected_incompatibility(vm_factory: MachineFactory) -> None:
    """7.2 -> 10.0.2 on virt-7.2 with a named CPU model: QEMU refuses the 'cpu' section
    (firmware/expected-incompatibilities.toml says why); the guest must keep running on
    the source with its state, and the same machine type migrates within 7.2."""
    old, new = builds.get_build("7.2", ARCH), builds.get_build("10.0.2", ARCH)
    machine = builds.newest_common_machine(old.capabilities, new.capabilities, family="virt")
    assert machine == "virt-7.2"
    assert CPU in old.capabilities.cpu_models and CPU in new.capabilities.cpu_models
    vm = vm_factory(arch=ARCH, qemu="7.2", machine=machine, cpu=CPU, firmware="2022.11",
                    name="arm-cross", fast=True)  # fmt: skip
    _note(step="restore-to-ssh", qemu="7.2", firmware="2022.11", cpu=CPU, machine=machine,
          ready_s=round(vm.ready.seconds if vm.ready else -1, 1))  # fmt: skip
    order = _set_os_state(vm)

    before = state.snapshot(vm, memory=False)
    result = migration.live(vm, to=new, check=False)
    result.extra["arch"] = ARCH
    expected = matrix.load_incompatibilities().lookup(
        old.version, new.version, "live", migration.machine_type(vm), arch=ARCH,
        signature=None if result.ok else result.signature)
    verdict = matrix.judge(not result.ok, result.signature, expected)
    _note(step="live 7.2 -> 10.0.2", op="live", source=old.label, destination=new.label,
          machine=machine, status=result.status, signature=result.signature,
          expected_failure=verdict.expected_failure)  # fmt: skip
    assert verdict.expected_failure, f"{result.summary()}: {verdict.note}"
    assert "device 'cpu'" in result.error
    assert migration.source_still_running(vm), "the failed migration took the guest down"
    after = state.snapshot(vm)
    state.assert_survived(before, after)
    _assert_persisted(vm, order, "on the source after the refused migration")

    # a source older than 9.0 may lose dirty pages under TCG (an intermittent data entry):
    # then the hop is an expected failure with that entry's signature, the guest on the source
    _step(vm, "live 7.2 -> 7.2", lambda: _ok_or_expected(vm, migration.live(vm, to=old, check=False)), order)
    assert migration.machine_type(vm) == machine


@pytest.mark.exhaustive  # another architecture's variant: x86's fw_cfg record is checked in make test
@pytest.mark.parametrize("aavmf", AAVMF_VERSIONS)
def test_fwcfg_boot_order_matches_the_record(vm_factory: MachineFactory, aavmf: str) -> None:
    observed = bootorder.observe_fwcfg(vm_factory, aavmf, arch=ARCH, qemu="10.0.2", cpu=CPU)
    if os.environ.get("HARNESS_RECORD_BOOTORDER") == "1":
        path = bootorder.write_fwcfg_records(observed, path=RECORD, header=_HEADER)
        pytest.skip(f"recorded AAVMF {aavmf} into {path}; rerun without HARNESS_RECORD_BOOTORDER")
    recorded = bootorder.load_fwcfg_records(RECORD)
    assert_no_problems(bootorder.fwcfg_problems(recorded, observed),
                       f"AAVMF {aavmf}'s -boot/bootindex behaviour changed from the record")  # fmt: skip


def test_cli_boot_aarch64_uname() -> None:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "harness", "boot", "--arch", ARCH, "--json",
                          "--", "uname", "-m"], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["output"].strip() == "aarch64"
    assert data["arch"] == ARCH
    _note(step="cli-boot", qemu=data["qemu"], ready_s=data["ready_s"],
          wall_s=round(time.monotonic() - t0, 1), cpu="max")  # fmt: skip


_HEADER = """\
# How AAVMF (Debian's qemu-efi-aarch64) treats the varstore's BootOrder under QEMU's
# fw_cfg boot order, per version, on QEMU 10.0.2's virt machine (cortex-a57, TCG).
# Recorded on real guests by tests/integration/test_aarch64.py (HARNESS_RECORD_BOOTORDER=1)
# through harness.bootorder.observe_fwcfg; the same test asserts it stays stable.
# The "ovmf" key holds the AAVMF version.  One varstore per version goes through:
#   fresh          fresh template copy (blank before 2025.02), no -boot, no bootindex; the
#                  guest then adds Boot0100 "harness-user" (the boot disk's device path,
#                  no optional data) and sets BootOrder = Boot0100 first, then the rest
#   boot-order-n   restart with -boot order=n
#   bootindex-disk restart with bootindex=1 on the boot disk (virtio-blk at PCI 00:01.0)
# boot_current = BootCurrent the guest read; started = AAVMF's last
# "BdsDxe: starting Boot####" line; boot_order = BootOrder the guest read after boot.

"""
