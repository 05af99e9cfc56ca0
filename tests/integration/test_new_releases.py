"""Every Debian QEMU and OVMF release on one host: the newer suites' builds bring their own
C library (run through their prefix's loader), doctor lists every build with the migration
modes its schema offers, a guest boots on each new build, and archive drift is named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import ProvisionError
from harness.inventory import builds, catalog
from harness.inventory.provision import Provisioner

pytestmark = pytest.mark.integration

HARNESS = str(Path(sys.executable).with_name("harness"))
NEW = ("10.0.13", "11.1.2", "11.1.3")


def test_doctor_lists_every_build_with_its_modes() -> None:
    proc = subprocess.run([HARNESS, "doctor", "--json"], capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    data = json.loads(proc.stdout)
    qemu = {(q["label"], q["arch"]): q for q in data["qemu"]}
    for v in ("5.2", "7.2", "10.0.2", *NEW):
        assert (v, "x86_64") in qemu, sorted(qemu)
    for v in ("7.2", "10.0.2", *NEW):
        assert (v, "aarch64") in qemu, sorted(qemu)
    for v in NEW:
        for arch in ("x86_64", "aarch64"):
            q = qemu[(v, arch)]
            assert q["version"] == v and q["own_libc"] is True and q["loader"], q
            assert {"normal", "cpr-reboot", "cpr-transfer"} <= set(q["migration_modes"]), q
    for v in ("11.1.2", "11.1.3"):
        assert "cpr-exec" in qemu[(v, "x86_64")]["migration_modes"]
    assert "cpr-exec" not in qemu[("10.0.13", "x86_64")]["migration_modes"]
    fw = {(f["version"], f["arch"]) for f in data["firmware"]}
    for v in ("2020.11", "2022.11", "2025.02", "2026.08"):
        assert (v, "x86_64") in fw and (v, "aarch64") in fw, sorted(fw)


@pytest.mark.parametrize("version", NEW)
def test_new_build_boots_uefi_with_its_own_c_library(version: str, vm_factory) -> None:  # type: ignore[no-untyped-def]
    build = builds.get_build(version)
    assert build.loader is not None and build.prefix is not None
    assert build.loader.is_relative_to(build.prefix)
    vm = vm_factory(qemu=version, firmware="2026.08", name=f"new{version.replace('.', '')}")
    assert vm.build.label == version
    ver = vm.qmp("query-version")["qemu"]
    assert f"{ver['major']}.{ver['minor']}.{ver['micro']}" == version
    # the process is the prefix's loader running the prefix's QEMU, not the host's libc
    cmdline = vm.process.cmdline_now()
    assert cmdline[0] == str(build.loader) and str(build.binary) in cmdline
    libcs = {line.split()[-1] for line in Path(f"/proc/{vm.process.pid}/maps").read_text().splitlines()
             if line.rstrip().endswith("/libc.so.6")}
    assert libcs and all(p.startswith(str(build.prefix)) for p in libcs), libcs
    assert vm.ssh.run("uname -r").rc == 0


def test_archive_drift_names_the_wanted_and_the_offered_version() -> None:
    entry = catalog.default().qemu_entry("10.0.13")
    prefix = Provisioner(catalog.default()).ensure_qemu(entry)
    manifest = json.loads((prefix / "harness-prefix.json").read_text())
    deb = Path(next(d for d in manifest["debs"] if "/qemu-system-x86_" in d))
    if not deb.is_file():
        pytest.skip(f"the provisioned .deb {deb} is gone from the cache")
    with pytest.raises(ProvisionError) as err:
        Provisioner._check_version([deb], "qemu-system-x86", "10.0.12", "trixie")
    text = str(err.value)
    assert "10.0.13" in text and "10.0.12" in text and "trixie" in text and "catalogue" in text


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_deprecated_machine_data_matches_every_builds_own_flags(arch: str) -> None:
    """[[deprecated-machine]] is kept true: for every build, the versioned machine types its
    query-machines flags deprecated are exactly those an entry covers."""
    from harness import matrix

    inc = matrix.load_incompatibilities()
    problems = []
    for b in builds.all_builds(arch):
        flagged = {m.name for m in b.capabilities.machine_types if m.versioned() and m.deprecated}
        covered = {m.name for m in b.capabilities.machine_types
                   if m.versioned() and inc.lookup_machine(b.version, m.name) is not None}
        if flagged != covered:
            problems.append(f"QEMU {b.label} ({arch}): flagged but not covered "
                            f"{sorted(flagged - covered)}, covered but not flagged {sorted(covered - flagged)}")
    assert not problems, "\n".join(problems)


def test_qemu_dir_with_its_own_libc_runs_through_its_loader_and_without_it_is_refused(tmp_path: Path) -> None:
    from harness.inventory import registry

    prefix = builds.get_build("11.1.3").prefix
    assert prefix is not None
    build = registry.register_qemu_dir(prefix, label="dir-11.1.3")
    assert build.loader is not None and build.capabilities.version == "11.1.3"
    bare = tmp_path / "bare"
    (bare / "usr/bin").mkdir(parents=True)
    (bare / "usr/bin/qemu-system-x86_64").write_bytes((prefix / "usr/bin/qemu-system-x86_64").read_bytes())
    (bare / "usr/bin/qemu-system-x86_64").chmod(0o755)
    with pytest.raises(ProvisionError) as err:
        registry.register_qemu_dir(bare)
    assert "GLIBC_2.38" in str(err.value) and "--qemu-deb" in str(err.value)
