"""Firmware builds from the real provisioned OVMF packages: their descriptors, flash layouts
(the 2m variants some ship), selection, the flash-pair check, users' registered packages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.errors import (
    FirmwareError,
    VarstoreError,
)
from harness.inventory import catalog
from harness.inventory.firmware import (
    SYNTHESIZED_TAG,
    FirmwareBuild,
    MiB,
    check_flash_pair,
    get_firmware,
    register_firmware,
    unregister_firmware,
)
from harness.inventory.provision import upstream_version

VERSIONS = [e.version for e in catalog.default().firmware if e.arch == "x86_64"]
WITH_2M = ["2020.11", "2022.11"]


@pytest.fixture(scope="module", params=VERSIONS)
def build(request: pytest.FixtureRequest) -> FirmwareBuild:
    return get_firmware(request.param)


def test_default_is_non_secure_split_4m_pair(build: FirmwareBuild) -> None:
    d = build.select()
    assert d.name == "60-edk2-x86_64.json"
    assert (d.mode, d.device, d.secure_boot) == ("split", "flash", False)
    assert d.code == build.prefix / "usr/share/OVMF/OVMF_CODE_4M.fd"
    assert d.vars_template == build.prefix / "usr/share/OVMF/OVMF_VARS_4M.fd"
    sizes = d.code.stat().st_size + d.vars_template.stat().st_size
    assert build.flash_size == d.flash_size == sizes == 4 * MiB
    assert (build.code, build.vars_template) == (d.code, d.vars_template)


def test_build_metadata_from_manifest(build: FirmwareBuild) -> None:
    entry = catalog.default().firmware_entry(build.version)
    # forky split OVMF: the images are in ovmf-generic ('ovmf' only depends on it)
    assert build.package == entry.package == ("ovmf-generic" if build.version >= "2026" else "ovmf")
    assert build.prefix.is_dir()
    # The Debian version's upstream part is the catalogue version.
    assert upstream_version(build.debian_version) == build.version  # 2026.08+ds-2 too
    assert build.to_json()["flash_size"] == 4 * MiB


def test_secure_boot_selection(build: FirmwareBuild) -> None:
    d = build.select(secure_boot=True)
    assert d.secure_boot and d.requires_smm
    # By file name, the enrolled-keys descriptor comes first (40- before 50-).
    assert d.name.startswith("40-") and d.enrolled_keys
    assert d.vars_template.name == "OVMF_VARS_4M.ms.fd"


def test_select_failing_case_names_what_was_offered(build: FirmwareBuild) -> None:
    with pytest.raises(FirmwareError, match="no firmware for.*machine=virt.*offered: 40-"):
        build.select(machine="virt")
    with pytest.raises(FirmwareError, match="mode=combined"):
        build.select(mode="combined")


def test_machine_aliases_and_versions_match(build: FirmwareBuild) -> None:
    assert build.select(machine="pc-q35-7.2").name == "60-edk2-x86_64.json"
    assert build.select(machine="q35") == build.select(machine="pc-i440fx-5.2")
    with pytest.raises(FirmwareError):
        build.select(secure_boot=True, machine="pc")  # SMM builds are q35-only


@pytest.mark.parametrize("version", WITH_2M)
def test_2m_variant_where_shipped(version: str) -> None:
    b = get_firmware(version)
    d = b.variant("2m")
    assert d.synthesized and SYNTHESIZED_TAG in d.tags
    assert (d.code.name, d.vars_template.name) == ("OVMF_CODE.fd", "OVMF_VARS.fd")
    assert d.flash_size == 2 * MiB == d.code.stat().st_size + d.vars_template.stat().st_size
    assert b.variant("4m") == b.select()
    # Both layouts come from the files, not from constants.
    assert b.flash_layouts() == {
        (b.code.stat().st_size, b.vars_template.stat().st_size),
        (d.code.stat().st_size, d.vars_template.stat().st_size),
    }


def test_2m_variant_absent_in_2025() -> None:
    b = get_firmware("2025.02")
    assert not any(d.synthesized and d.mode == "split" for d in b.candidates())
    with pytest.raises(FirmwareError, match="flash_size=2097152"):
        b.variant("2m")
    with pytest.raises(FirmwareError, match="unknown flash variant"):
        b.variant("8m")


def test_stateless_is_the_combined_image(build: FirmwareBuild) -> None:
    d = build.select(mode="stateless")
    assert d.synthesized and d.device == "memory" and d.nvram_template is None
    assert d.executable == build.prefix / "usr/share/ovmf/OVMF.fd"
    assert d.flash_size == d.executable.stat().st_size
    with pytest.raises(FirmwareError, match="no NVRAM template"):
        _ = d.vars_template
    assert all(d.mode == "split" for d in build.descriptors)


@pytest.mark.parametrize("version", WITH_2M)
def test_flash_pair_accepts_matching_sizes(version: str) -> None:
    b = get_firmware(version)
    assert check_flash_pair(b.code, b.vars_template, b) == 4 * MiB
    two = b.variant("2m")
    assert check_flash_pair(two.code, two.vars_template, b) == 2 * MiB
    # Without a build, the owner of the code image is found.
    assert check_flash_pair(b.code, b.vars_template) == 4 * MiB


@pytest.mark.parametrize("version", WITH_2M)
def test_flash_pair_refuses_2m_vars_with_4m_code(version: str, tmp_path: Path) -> None:
    b = get_firmware(version)
    two = b.variant("2m")
    vars_copy = tmp_path / "guest_VARS.fd"
    shutil.copyfile(two.vars_template, vars_copy)
    with pytest.raises(VarstoreError) as info:
        check_flash_pair(b.code, vars_copy, b)
    msg = str(info.value)
    assert str(vars_copy) in msg
    assert f"{vars_copy.stat().st_size} bytes" in msg
    assert f"expected vars of {b.vars_template.stat().st_size} bytes" in msg
    with pytest.raises(VarstoreError, match="131072 bytes does not fit"):
        check_flash_pair(b.code, vars_copy)  # found through the catalogue


@pytest.mark.parametrize("version", WITH_2M)
def test_flash_pair_refuses_4m_vars_with_2m_code(version: str) -> None:
    b = get_firmware(version)
    two = b.variant("2m")
    with pytest.raises(VarstoreError, match=f"expected vars of {two.vars_size} bytes"):
        check_flash_pair(two.code, b.vars_template, b)


def test_flash_pair_missing_vars_names_file(tmp_path: Path) -> None:
    b = get_firmware("2025.02")
    with pytest.raises(VarstoreError, match=str(tmp_path / "nope.fd")):
        check_flash_pair(b.code, tmp_path / "nope.fd", b)
    with pytest.raises(FirmwareError, match="nope-code"):
        check_flash_pair(tmp_path / "nope-code", b.vars_template, b)


def test_register_unpacked_directory() -> None:
    real = get_firmware("2022.11")
    build = register_firmware(real.prefix)
    try:
        assert build.version == real.debian_version
        assert build.source.startswith("registered:")
        assert get_firmware(real.debian_version) is build
        assert build.code == real.code
    finally:
        unregister_firmware(real.debian_version)
    # Unregistered, the Debian version falls back to the catalogue's 2022.11 by prefix.
    assert get_firmware(real.debian_version).source == "catalog"


def test_register_deb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = get_firmware("2025.02")
    debs = sorted((real.prefix.parent.parent / "debs" / real.key).glob("ovmf_*.deb"))
    if not debs:
        pytest.skip(f"no cached .deb for {real.key}")
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    build = register_firmware(debs[0], version="my-ovmf")
    try:
        assert build.prefix.is_relative_to(tmp_path)
        assert build.debian_version == real.debian_version
        assert build.code.read_bytes() == real.code.read_bytes()
        assert get_firmware("my-ovmf") is build
    finally:
        unregister_firmware("my-ovmf")


def test_cli_firmware_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    from harness import cli

    assert cli.main(["firmware", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    versions = [b["version"] for b in data]
    # the catalogue's builds first; after them only builds another test of this worker
    # registered (a distro package under test)
    from harness.inventory import firmware

    assert versions[: len(VERSIONS)] == VERSIONS
    registered = {b.version for b in firmware._REGISTERED.values()}
    assert set(versions[len(VERSIONS) :]) <= registered, versions
    for b in data[: len(VERSIONS)]:
        assert b["flash_size"] == 4 * MiB and b["code"].endswith("OVMF_CODE_4M.fd")

