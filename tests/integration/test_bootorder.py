"""Boot order on real guests: BootNext is used once and consumed, the guest's BootOrder
is honoured across reboots (BootCurrent and OVMF's serial line agree), and what QEMU's
fw_cfg boot order (-boot order=, bootindex) does to the varstore's BootOrder is the
behaviour recorded per OVMF version in firmware/bootorder-fwcfg.toml.

Re-record (after a deliberate firmware change) with
``HARNESS_RECORD_BOOTORDER=1 .venv/bin/pytest tests/integration/test_bootorder.py -k fwcfg``;
a recording run skips instead of passing.
"""

from __future__ import annotations

import os

import pytest

from harness import bootorder, state, varstore
from harness.factory import MachineFactory
from harness.inventory.catalog import DEFAULT_FIRMWARE
from harness.survival import assert_no_problems

pytestmark = pytest.mark.integration

OVMF_VERSIONS = ("2020.11", "2022.11", "2025.02")


def test_boot_next_is_consumed_and_boot_order_is_honoured(vm_factory: MachineFactory) -> None:
    # restored from a saved boot: the two boots this test checks (BootCurrent and OVMF's
    # serial line agreeing each time) are the reboots below
    vm = vm_factory(name="bootnext", fast=True)
    first = bootorder.guest_boot(vm)
    assert first.current is not None, "BootCurrent missing on a UEFI boot"
    assert first.current in first.order, first
    disk = first.current
    bootorder.add_boot_entry(vm, view=first)
    order = (bootorder.USER_ENTRY, *(n for n in first.order if n != bootorder.USER_ENTRY))
    bootorder.set_boot_order(vm, order)
    bootorder.set_boot_next(vm, disk)  # BootNext beats BootOrder's first entry, once
    assert bootorder.guest_boot(vm).next == disk

    mark = state.reboot(vm)
    view = bootorder.assert_booted(vm, disk, since=mark)
    model = varstore.read_varstore(vm.varstore_path)
    assert_no_problems(
        bootorder.boot_next_problems(view, model)
        + bootorder.boot_order_problems(order, view.order, "the guest")
        + bootorder.boot_order_problems(order, model.boot_order, "the varstore file"),
        "after the BootNext boot",
    )

    mark = state.reboot(vm)
    view = bootorder.assert_booted(vm, bootorder.USER_ENTRY, since=mark)
    assert view.title(bootorder.USER_ENTRY).endswith(f'"{bootorder.USER_TITLE}"')
    assert_no_problems(bootorder.boot_order_problems(order, view.order, "the guest"),
                       "after the BootOrder boot")  # fmt: skip


@pytest.mark.parametrize("ovmf", [v if v == DEFAULT_FIRMWARE else pytest.param(v, marks=pytest.mark.exhaustive)
                                  for v in OVMF_VERSIONS])  # fmt: skip
def test_fwcfg_boot_order_interplay_matches_the_record(vm_factory: MachineFactory, ovmf: str) -> None:
    observed = bootorder.observe_fwcfg(vm_factory, ovmf)
    if os.environ.get("HARNESS_RECORD_BOOTORDER") == "1":
        path = bootorder.write_fwcfg_records(observed, header=_HEADER)
        pytest.skip(f"recorded OVMF {ovmf} into {path}; rerun without HARNESS_RECORD_BOOTORDER")
    recorded = bootorder.load_fwcfg_records()
    assert_no_problems(bootorder.fwcfg_problems(recorded, observed),
                       f"OVMF {ovmf}'s -boot/bootindex behaviour changed from the record")  # fmt: skip


_HEADER = """\
# How OVMF treats the varstore's BootOrder under QEMU's fw_cfg boot order, per version.
# Recorded on real guests by tests/integration/test_bootorder.py (HARNESS_RECORD_BOOTORDER=1)
# through harness.bootorder.observe_fwcfg; the same test asserts it stays stable.
# One varstore per OVMF version goes through the configs in order:
#   fresh          fresh template copy, no -boot, no bootindex; the guest then adds
#                  Boot0100 "harness-user" (the boot disk's device path, no optional
#                  data) and sets BootOrder = Boot0100 first, then the previous order
#   boot-order-n   restart with -boot order=n
#   bootindex-disk restart with bootindex=1 on the boot disk (virtio-blk at PCI 00:01.0)
# boot_current = BootCurrent the guest read; started = OVMF's last
# "BdsDxe: starting Boot####" line; boot_order = BootOrder the guest read after boot.

"""
