"""Builds registered from users' packages and directories, against the real catalogue builds:
libraries borrowed or named as missing, the run registry seen by other processes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.errors import ConfigError, ProvisionError
from harness.inventory import builds, firmware, registry, sources
from harness.paths import cache_root

DEBS = cache_root() / "debs"
QEMU72 = DEBS / "qemu-7.2-x86_64"
OVMF2502 = DEBS / "ovmf-2025.02-x86_64"
QEMU_PKGS = ("qemu-system-x86_", "qemu-system-common_", "qemu-system-data_", "seabios_", "ipxe-qemu_")


def qemu_debs(d: Path = QEMU72) -> list[Path]:
    """QEMU 7.2's .debs as provisioning downloaded them (provisioned here when absent)."""
    builds.get_build("7.2")
    found = sorted(p for p in d.glob("*.deb") if p.name.startswith(QEMU_PKGS))
    assert len(found) == len(QEMU_PKGS), f"provisioning QEMU 7.2 left {found} under {d}"
    return found


def ovmf_deb() -> Path:
    """OVMF 2025.02's .deb as provisioning downloaded it (provisioned here when absent)."""
    firmware.get_firmware("2025.02")
    found = sorted(OVMF2502.glob("ovmf_*.deb"))
    assert found, f"provisioning OVMF 2025.02 left no .deb under {OVMF2502}"
    return found[0]


def run_elsewhere(code: str, env_registry: Path | None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (an xdist worker stands in for it)."""
    env = dict(os.environ)
    env.pop(registry.ENV_VAR, None)
    if env_registry is not None:
        env[registry.ENV_VAR] = str(env_registry)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def test_missing_sonames_named_when_no_catalogue_entry_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "catalog_entry_for", lambda version, arch="x86_64": None)
    with pytest.raises(ProvisionError) as err:
        registry.register_qemu_debs(qemu_debs())
    msg = str(err.value)
    assert "libcapstone.so.4" in msg and "no catalogue QEMU entry matches version 7.2" in msg


def test_debs_without_the_emulator_package() -> None:
    debs = [p for p in qemu_debs() if not p.name.startswith("qemu-system-x86_")]
    with pytest.raises(ConfigError, match="none of the given .debs is qemu-system-x86"):
        registry.register_qemu_debs(debs)


def test_qemu_debs_borrow_catalogue_libraries() -> None:
    build = registry.register_qemu_debs(qemu_debs())
    assert build.label.startswith("deb:7.2+dfsg")
    assert build.source.startswith("deb:1:7.2")
    assert build.binary.is_file() and build.prefix is not None
    assert "registered-qemu-" in build.prefix.name
    ref = builds.from_catalog(registry.catalog_entry_for("7.2"))  # type: ignore[arg-type]
    # the packages alone lack libcapstone & co; the catalogue 7.2 prefix provides them
    alone = registry.missing_sonames(build.binary, [d for d in build.libdirs if d not in ref.libdirs])
    assert "libcapstone.so.4" in alone
    assert set(ref.libdirs) <= set(build.libdirs)
    assert registry.missing_sonames(build.binary, build.libdirs) == []
    assert any(str(d).endswith("usr/share/seabios") for d in build.datadirs)


def test_qemu_debs_unpacked_once() -> None:
    a = registry.register_qemu_debs(qemu_debs())
    mtime = a.binary.stat().st_mtime_ns
    b = registry.register_qemu_debs(list(reversed(qemu_debs())))  # same set, other order
    assert b.prefix == a.prefix and b.binary.stat().st_mtime_ns == mtime


def test_missing_sonames_named_when_catalogue_prefix_lacks_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # a catalogue prefix of the right version that does not carry the libraries
    real = builds.from_catalog

    def no_libs(entry: object) -> builds.QemuBuild:
        b = real(entry)  # type: ignore[arg-type]
        return builds.QemuBuild(b.label, b.arch, b.binary, b.datadirs, (), b.source, b.prefix)

    monkeypatch.setattr(builds, "from_catalog", no_libs)
    with pytest.raises(ProvisionError, match=r"needs .*libcapstone\.so\.4.*neither the given packages"):
        registry.register_qemu_debs(qemu_debs())


def test_missing_sonames_on_the_bare_binary() -> None:
    build = registry.register_qemu_debs(qemu_debs())
    assert "libcapstone.so.4" in registry.missing_sonames(build.binary, [])


def test_qemu_dir_of_unpacked_packages_gets_libraries() -> None:
    prefix = registry.register_qemu_debs(qemu_debs()).prefix
    assert prefix is not None
    build = registry.register_qemu_dir(prefix, label="dir72")
    assert build.label == "dir72"
    assert registry.missing_sonames(build.binary, build.libdirs) == []


def test_register_from_options_visible_to_another_process(clean_registry: Path) -> None:
    args = argparse.Namespace(qemu_deb=qemu_debs(), ovmf_deb=[ovmf_deb()], qemu_dir=[])
    reg = registry.register_from_options(args, path=clean_registry)
    assert reg.path == clean_registry.resolve()
    assert os.environ[registry.ENV_VAR] == str(reg.path)
    [qlabel] = reg.qemu
    [fver] = reg.firmware
    assert fver.startswith("2025.02-")
    # this process
    assert builds.get_build(qlabel).label == qlabel
    assert firmware.get_firmware(fver).version == fver
    assert qlabel in [b.label for b in builds.all_builds()]
    assert fver in [f.version for f in firmware.all_firmware()]
    data = json.loads(clean_registry.read_text())
    assert data["format"] == registry.FORMAT and len(data["qemu"]) == 1
    # a fresh interpreter with only the environment variable (what an xdist worker has)
    code = (
        "from harness.inventory import builds, firmware\n"
        f"b = builds.get_build({qlabel!r}); print(b.binary); print(':'.join(map(str, b.libdirs)))\n"
        f"print(firmware.get_firmware({fver!r}).vars_template)\n"
        f"print({qlabel!r} in [x.label for x in builds.all_builds()])\n"
    )
    proc = run_elsewhere(code, clean_registry)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(builds.get_build(qlabel).binary)
    assert "qemu-7.2-x86_64" in lines[1]
    assert "OVMF_VARS" in lines[2]
    assert lines[3] == "True"


def test_without_the_registry_another_process_does_not_know_the_build(clean_registry: Path) -> None:
    args = argparse.Namespace(qemu_deb=qemu_debs(), ovmf_deb=[], qemu_dir=[])
    [qlabel] = registry.register_from_options(args, path=clean_registry).qemu
    proc = run_elsewhere(f"from harness.inventory import builds\nbuilds.get_build({qlabel!r})\n", None)
    assert proc.returncode != 0
    assert "UnknownVersionError" in proc.stderr and qlabel in proc.stderr


def test_registry_records_accumulate_and_replace(clean_registry: Path) -> None:
    b = registry.register_qemu_debs(qemu_debs())
    registry.record(clean_registry, qemu=[b])
    other = builds.QemuBuild("other", "x86_64", b.binary, b.datadirs, b.libdirs, "test", b.prefix)
    registry.record(clean_registry, qemu=[other, b])
    labels = [r["label"] for r in json.loads(clean_registry.read_text())["qemu"]]
    assert sorted(labels) == sorted([b.label, "other"])
    assert registry.qemu_from_record(registry.qemu_record(b)) == b


def test_absent_registry_file_is_empty(clean_registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(registry.ENV_VAR, str(clean_registry))  # not created yet
    assert builds.get_build("10.0.2").label == "10.0.2"


def test_source_build_found_by_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registry: Path,
                                     fake_source_build: Callable[..., Any]) -> None:  # fmt: skip
    monkeypatch.setattr(sources, "builds_root", lambda: tmp_path)
    sb = fake_source_build(tmp_path)
    assert sb.label == "src:10.0.2+abababab"
    build = builds.get_build(sb.label)
    assert build.binary == sb.binary
    assert build.datadirs[0] == sb.build_dir / "pc-bios"
    # SeaBIOS and iPXE come from the catalogue 10.0.2 prefix (the tarball has none)
    assert any("qemu-10.0.2-x86_64" in str(d) and str(d).endswith("seabios") for d in build.datadirs)
    # a source build is not part of every run's matrix unless registered
    builds._REGISTERED.pop(sb.label)
    assert sb.label not in [b.label for b in builds.all_builds()]

