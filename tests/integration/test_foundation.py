"""Issue 2: every provisioned build launches through qemu.machine and reports the version
the catalogue says; doctor's JSON contract; provisioning errors and corrupt prefixes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qemu.machine import QEMUMachine

from harness.errors import ProvisionError
from harness.inventory import builds, catalog
from harness.inventory.catalog import PackageRef, Version
from harness.inventory.provision import Provisioner, verify_prefix

pytestmark = pytest.mark.integration
HARNESS = [sys.executable, "-m", "harness"]


@pytest.mark.parametrize("entry", catalog.default().qemu, ids=lambda e: f"qemu{e.version}")
def test_every_build_launches_through_qemu_machine(entry: catalog.QemuEntry, tmp_path: Path) -> None:
    b = builds.from_catalog(entry)
    vm = QEMUMachine(str(b.binary), args=[*b.data_args(), "-machine", "none", "-nodefaults"],
                     wrapper=b.command()[:-1],  # env (libraries, modules), then its loader if any
                     base_temp_dir=str(tmp_path))  # fmt: skip
    with vm:
        vm.launch()
        v = vm.cmd("query-version")["qemu"]
    got = Version.parse(f"{v['major']}.{v['minor']}.{v['micro']}")
    assert got.matches(Version.parse(entry.version)), (got, entry.version)


def test_doctor_json_contract() -> None:
    out = subprocess.run([*HARNESS, "doctor", "--json"], capture_output=True, text=True, check=False)
    data = json.loads(out.stdout)
    assert {"chosen", "reason"} <= set(data["accel"])
    assert {"present", "usable", "nested", "reason"} <= set(data["kvm"])
    versions = {q["version"] for q in data["qemu"]}
    assert {"5.2.0", "10.0.2"} <= versions and any(v.startswith("7.2.") for v in versions)
    for q in data["qemu"]:
        assert {"version", "path", "source", "machine_types", "migration_modes"} <= set(q)
    assert {f["version"] for f in data["firmware"]} >= {"2020.11", "2022.11", "2025.02"}
    for f in data["firmware"]:
        assert {"version", "code", "vars_template", "flash_size"} <= set(f)
    if Path("/sys/module/kvm_pvm").exists():
        assert data["accel"]["chosen"] == "tcg" and "PVM" in data["accel"]["reason"]
    assert out.returncode == 0


def test_unknown_version_lists_available() -> None:
    out = subprocess.run([*HARNESS, "boot", "--qemu", "6.1", "--", "true"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown QEMU version '6.1'" in out.stderr and "10.0.2" in out.stderr and "5.2" in out.stderr


def test_missing_package_names_package_and_suite(tmp_path: Path) -> None:
    prov = Provisioner(catalog.default())
    with pytest.raises(ProvisionError) as err:
        prov.archive().download([PackageRef("no-such-package-harness", "bookworm")], tmp_path / "d")
    assert "no-such-package-harness/bookworm" in str(err.value)


def test_corrupt_prefix_is_detected_and_reprovisioned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a private cache root so the shared one is never touched; the apt lists are reused
    root = tmp_path / "cache"
    real = Provisioner(catalog.default())
    shutil.copytree(real.root / "apt", root / "apt", symlinks=True)  # type: ignore[operator]
    monkeypatch.setenv("HARNESS_CACHE", str(root))
    prov = Provisioner(catalog.default(), root=root)
    entry = catalog.default().firmware_entry("2022.11")
    prefix = prov.ensure_firmware(entry)
    assert verify_prefix(prefix) is None
    code = prefix / "usr/share/OVMF/OVMF_CODE_4M.fd"
    with code.open("r+b") as fh:
        fh.truncate(1000)
    problem = verify_prefix(prefix)
    assert problem is not None and "OVMF_CODE_4M.fd" in problem
    again = prov.ensure_firmware(entry)
    assert verify_prefix(again) is None and code.stat().st_size == 3653632
    # no half-installed prefix left behind
    assert not [p for p in prefix.parent.iterdir() if ".partial-" in p.name]
    assert os.stat(prefix).st_mode
