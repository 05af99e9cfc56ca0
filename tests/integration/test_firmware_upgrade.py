"""Firmware upgrade and flash-size mismatch, on real guests and real OVMF builds.

- A varstore instantiated from OVMF 2020.11's 4M template and written by the guest
  (a variable, its own boot entry first in BootOrder) keeps all of it when the guest is
  booted with 2022.11 and then 2025.02 CODE_4M on the same file, and the new firmware
  honours that BootOrder (BootCurrent and the serial line name the guest's entry).
- A 2 MB varstore with 4 MB code, and the reverse, are refused before QEMU starts.
- Migrating a 4M-flash guest to a destination with 2M-flash firmware fails with the
  RAMBlock length-mismatch signature and the source keeps running.
- ``harness varstore show`` on every provisioned template prints Boot entries and
  BootOrder; ``harness varstore diff`` between a template and a booted copy lists the
  entries OVMF added.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from harness import bootorder, cli, migration, signatures, state, survival, varstore
from harness.errors import VarstoreError
from harness.factory import MachineFactory
from harness.inventory import firmware

pytestmark = pytest.mark.integration

UPGRADE_PATH = ("2020.11", "2022.11", "2025.02")


def _templates() -> list[tuple[str, Path]]:
    out = []
    for build in firmware.all_firmware("x86_64"):
        for d in build.candidates():
            if d.mode == "split" and d.nvram_template is not None:
                out.append((f"{build.version}:{d.nvram_template.name}", d.nvram_template))
    return sorted(set(out))


def test_cli_show_prints_boot_entries_and_order_of_every_template(
    capsys: pytest.CaptureFixture[str],
) -> None:
    templates = _templates()
    assert {v.split(":")[0] for v, _ in templates} >= set(UPGRADE_PATH)
    for label, path in templates:
        assert cli.main(["varstore", "show", str(path)]) == 0, label
        out = capsys.readouterr().out
        model = varstore.read_varstore(path)
        order = ", ".join(varstore.boot_name(n) for n in model.boot_order) or "(none)"
        assert f"BootOrder: {order}\n" in out, f"{label}: {out[:400]}"
        if model.boot_entries:
            for e in model.boot_entries.values():
                assert f'{e.name} "{e.title}"' in out, label
        else:
            assert "Boot entries: (none)" in out, label


def test_mismatched_flash_sizes_are_refused_before_launch(vm_factory: MachineFactory,
                                                          tmp_path: Path) -> None:
    fw = firmware.get_firmware("2022.11")
    cases = [
        ("4m", fw.variant("2m").vars_template, "2 MB varstore with 4 MB code"),
        ("2m", fw.variant("4m").vars_template, "4 MB varstore with 2 MB code"),
    ]
    for flash, template, what in cases:
        vars_copy = varstore.instantiate(template, tmp_path / f"{flash}-vars.fd")
        before = vars_copy.read_bytes()
        vm = vm_factory(start=False, flash=flash, varstore=vars_copy, name=f"mismatch-{flash}")
        with pytest.raises(VarstoreError) as exc:
            vm.start()
        text = str(exc.value)
        assert str(vars_copy) in text and "does not fit code" in text, f"{what}: {text}"
        assert f"{vars_copy.stat().st_size} bytes" in text, what
        assert vm.history == [] and not vm.running, f"{what}: QEMU was started"
        assert vars_copy.read_bytes() == before, f"{what}: the varstore was touched"


def test_varstore_survives_firmware_upgrades_and_size_mismatch_migration_fails(
    vm_factory: MachineFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "vars.fd"
    booted_copy = tmp_path / "booted-2020.11.fd"  # the file after the first boot
    oldest = firmware.get_firmware(UPGRADE_PATH[0])
    planted: survival.Planted | None = None
    vm = None
    for i, version in enumerate(UPGRADE_PATH):
        vm = vm_factory(firmware=version, varstore=path, name=f"fw-{version}")
        assert vm.varstore_path == path
        if i == 0:
            # The file was instantiated from the oldest template; the guest writes to it.
            template = oldest.select().vars_template
            assert vm.varstore_template == template
            planted = survival.plant(vm)
            # The CLI diff lists what OVMF added to the template, and the guest's writes.
            shutil.copyfile(path, booted_copy)
            assert cli.main(["varstore", "diff", str(template), str(booted_copy)]) == 1
            out = capsys.readouterr().out
            added = varstore.diff(varstore.read_varstore(template),
                                  varstore.read_varstore(booted_copy)).added_boot_entries()  # fmt: skip
            assert bootorder.USER_ENTRY in added and len(added) >= 3, out
            for n in added:
                assert re.search(rf"^\+ Boot{n:04X} ", out, re.M), f"Boot{n:04X} not listed:\n{out}"
            assert re.search(r"^\+ HarnessSurvive ", out, re.M), out
            assert re.search(r"^\+ BootOrder |^BootOrder: ", out, re.M), out
        else:
            assert planted is not None
            # Same file, newer CODE: everything the guest wrote is still there and used.
            bootorder.assert_booted(vm, bootorder.USER_ENTRY)
            # Newer OVMF enumerates devices the old one did not (2022.11 adds PXEv6 and
            # HTTPv6 options): it appends them after the guest's order, which it keeps.
            survival.assert_persisted(vm, planted, order_may_grow=True,
                                      what=f"booting OVMF {version} on a {UPGRADE_PATH[0]} varstore")
            model = varstore.read_varstore(path)
            appended = model.boot_order[len(planted.boot_order or ()):]
            first_entries = varstore.read_varstore(booted_copy).boot_entries
            for n in appended:
                assert n in model.boot_entries and n not in first_entries, (
                    f"OVMF {version} appended {varstore.boot_name(n)}, which is not a new option")
            print(f"OVMF {version} on the {UPGRADE_PATH[0]} varstore appended: "
                  + (", ".join(str(model.boot_entries[n]) for n in appended) or "nothing"))
        if i < len(UPGRADE_PATH) - 1:
            guest_vars = state.guest_variables(vm)
            state.poweroff(vm)
            survival.assert_no_problems(survival.view_problems(path, guest_vars),
                                        f"varstore file after poweroff on OVMF {version}")  # fmt: skip

    # The newest guest (4M flash) migrates to a destination whose firmware is 2 MB.
    assert vm is not None and planted is not None
    small = firmware.get_firmware("2022.11").variant("2m")
    # the destination host's OVMF has 2 MB flash: a size change, provoked on purpose
    vm.use_firmware("2022.11", flash="2m", allow_size_change=True)
    assert vm.firmware_code == small.code and vm.varstore_template == small.vars_template
    result = migration.live(vm, check=False)
    assert not result.ok, result.summary()
    assert result.signature == "ramblock-length-mismatch", (result.signature, result.error)
    sig = signatures.classify(result.error)
    assert sig is not None and sig.name == "ramblock-length-mismatch"
    assert result.source_running is True, result.summary()
    assert vm.varstore_path == path, "the source's varstore must stay the guest's"
    assert vm.ssh.run("agent status", timeout=60).rc == 0
    survival.assert_persisted(vm, planted, order_may_grow=True,
                              what="a failed migration to 2M-flash firmware")
