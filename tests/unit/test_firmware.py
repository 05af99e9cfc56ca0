"""Firmware builds from QEMU descriptors: the real provisioned OVMF builds and bad input."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import catalog
from harness.errors import (
    CatalogError,
    FirmwareError,
    HarnessError,
    UnknownVersionError,
    VarstoreError,
)
from harness.firmware import (
    SYNTHESIZED_TAG,
    FirmwareBuild,
    MiB,
    check_flash_pair,
    get_firmware,
    in_prefix,
    load_build,
    load_descriptors,
    parse_descriptor,
    register_firmware,
    unregister_firmware,
)
from harness.provision import upstream_version

pytestmark = pytest.mark.unit

VERSIONS = [e.version for e in catalog.default().firmware if e.arch == "x86_64"]
WITH_2M = ["2020.11", "2022.11"]


@pytest.fixture(scope="module", params=VERSIONS)
def build(request: pytest.FixtureRequest) -> FirmwareBuild:
    return get_firmware(request.param)


def _good_descriptor() -> dict[str, Any]:
    return {
        "description": "test firmware",
        "interface-types": ["uefi"],
        "mapping": {
            "device": "flash",
            "executable": {"filename": "/usr/share/OVMF/CODE.fd", "format": "raw"},
            "nvram-template": {"filename": "/usr/share/OVMF/VARS.fd", "format": "raw"},
        },
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
        "features": ["acpi-s3"],
        "tags": [],
    }


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    """A fake unpacked package: 3 + 1 bytes of images and one good descriptor."""
    root = tmp_path / "prefix"
    (root / "usr/share/OVMF").mkdir(parents=True)
    (root / "usr/share/qemu/firmware").mkdir(parents=True)
    (root / "usr/share/OVMF/CODE.fd").write_bytes(b"abc")
    (root / "usr/share/OVMF/VARS.fd").write_bytes(b"v")
    _write(root, "60-test.json", _good_descriptor())
    return root


def _write(root: Path, name: str, data: Any) -> Path:
    path = root / "usr/share/qemu/firmware" / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# --- the real builds -------------------------------------------------------------------


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


def test_unknown_version_lists_available() -> None:
    with pytest.raises(UnknownVersionError) as info:
        get_firmware("1999.01")
    for v in VERSIONS:
        assert v in str(info.value)


# --- flash pair check ------------------------------------------------------------------


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


# --- descriptor parsing ----------------------------------------------------------------


def test_fake_prefix_parses_and_resolves_into_prefix(prefix: Path) -> None:
    (d,) = load_descriptors(prefix)
    assert d.executable == prefix / "usr/share/OVMF/CODE.fd"
    assert d.vars_template == prefix / "usr/share/OVMF/VARS.fd"
    assert (d.mode, d.flash_size, d.format) == ("split", 4, "raw")


def test_absolute_symlink_is_rerooted_and_dotdot_stays_inside(prefix: Path) -> None:
    link = prefix / "usr/share/OVMF/LINK.fd"
    os.symlink("/usr/share/OVMF/CODE.fd", link)
    assert in_prefix(prefix, "/usr/share/OVMF/LINK.fd") == prefix / "usr/share/OVMF/CODE.fd"
    assert in_prefix(prefix, "/../../etc/passwd") == prefix / "etc/passwd"
    os.symlink("LOOP.fd", prefix / "usr/share/OVMF/LOOP.fd")
    with pytest.raises(FirmwareError, match="symbolic links"):
        in_prefix(prefix, "/usr/share/OVMF/LOOP.fd")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("description"), "'description'"),
        (lambda d: d.pop("targets"), "'targets'"),
        (lambda d: d.pop("tags"), "'tags'"),
        (lambda d: d["mapping"].pop("device"), "'mapping.device'"),
        (lambda d: d["mapping"]["executable"].pop("filename"), "'mapping.executable.filename'"),
        (lambda d: d["mapping"]["executable"].update(format="vmdk"), "mapping.executable.format"),
        (lambda d: d["mapping"].update(mode="hybrid"), "'mapping.mode'"),
        (lambda d: d["mapping"].update(mode=3), "'mapping.mode'"),
        (lambda d: d["mapping"].update(mode="stateless"), "nvram-template"),
        (lambda d: d["mapping"].pop("nvram-template"), "nvram-template"),
        (lambda d: d.update(features="acpi-s3"), "'features'"),
        (lambda d: d["targets"][0].pop("machines"), "'targets[0].machines'"),
        (lambda d: d.update({"interface-types": []}), "'interface-types'"),
    ],
)
def test_malformed_descriptor_names_file_and_field(prefix: Path, mutate: Any, field: str) -> None:
    data = _good_descriptor()
    mutate(data)
    path = _write(prefix, "10-bad.json", data)
    with pytest.raises(CatalogError) as info:
        load_descriptors(prefix)
    assert str(path) in str(info.value)
    assert field in str(info.value)


@pytest.mark.parametrize("text", ["{not json", "[]", '"x"', "\udcff"])
def test_unparseable_descriptor_names_file(prefix: Path, text: str) -> None:
    path = prefix / "usr/share/qemu/firmware/10-bad.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CatalogError, match=str(path)):
        load_descriptors(prefix)


def test_absent_mode_means_split_and_other_modes_parse(prefix: Path) -> None:
    data = _good_descriptor()
    data["mapping"].pop("nvram-template")
    data["mapping"]["mode"] = "stateless"
    _write(prefix, "70-stateless.json", data)
    data = copy.deepcopy(data)
    data["mapping"]["mode"] = "combined"
    _write(prefix, "80-combined.json", data)
    descs = {d.name: d for d in load_descriptors(prefix)}
    assert descs["60-test.json"].mode == "split"
    assert descs["70-stateless.json"].mode == "stateless"
    assert descs["70-stateless.json"].nvram_template is None
    assert descs["80-combined.json"].mode == "combined"
    with pytest.raises(FirmwareError, match="no NVRAM template"):
        _ = descs["70-stateless.json"].vars_template
    build = load_build(prefix, version="0.1")
    assert build.select(mode="stateless").name == "70-stateless.json"


def test_skipped_descriptors_are_logged_with_reason(
    prefix: Path, caplog: pytest.LogCaptureFixture
) -> None:
    aarch64 = _good_descriptor()
    aarch64["targets"] = [{"architecture": "aarch64", "machines": ["virt-*"]}]
    _write(prefix, "10-arm.json", aarch64)
    missing = _good_descriptor()
    missing["mapping"]["executable"]["filename"] = "/usr/share/OVMF/GONE.fd"
    _write(prefix, "20-missing.json", missing)
    qcow = _good_descriptor()
    qcow["mapping"]["executable"]["format"] = "qcow2"
    _write(prefix, "30-qcow.json", qcow)
    _write(prefix, "40-hidden.json", "")
    with caplog.at_level(logging.DEBUG, logger="harness.firmware"):
        descs = load_descriptors(prefix)
    assert [d.name for d in descs] == ["60-test.json"]
    text = caplog.text
    assert "10-arm.json: targets aarch64, not x86_64" in text
    assert "20-missing.json: executable" in text and "GONE.fd is not in the prefix" in text
    assert "30-qcow.json: format qcow2" in text
    assert "40-hidden.json: zero-length" in text


def test_prefix_without_usable_descriptor(tmp_path: Path) -> None:
    with pytest.raises(FirmwareError, match="no usr/share/qemu/firmware"):
        load_build(tmp_path, version="1")
    (tmp_path / "usr/share/qemu/firmware").mkdir(parents=True)
    with pytest.raises(FirmwareError, match="no usable descriptor"):
        load_build(tmp_path, version="1")


# --- registering a user's package ------------------------------------------------------


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


def test_register_refuses_other_files(tmp_path: Path) -> None:
    junk = tmp_path / "x.txt"
    junk.write_text("x")
    with pytest.raises(FirmwareError, match="neither a .deb"):
        register_firmware(junk)
    fake = tmp_path / "x.deb"
    fake.write_text("not a deb")
    with pytest.raises(HarnessError, match="x.deb"):
        register_firmware(fake)


# --- fuzzing: only our own errors come out ---------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_PATHS = [
    ("description",), ("interface-types",), ("mapping",), ("mapping", "device"),
    ("mapping", "mode"), ("mapping", "executable"), ("mapping", "executable", "filename"),
    ("mapping", "executable", "format"), ("mapping", "nvram-template"),
    ("mapping", "nvram-template", "filename"), ("targets",), ("features",), ("tags",),
]  # fmt: skip


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=st.lists(st.tuples(st.sampled_from(_PATHS), st.booleans(), _json), max_size=4))
def test_fuzzed_descriptor_only_raises_catalog_error(
    prefix: Path, edits: list[tuple[tuple[str, ...], bool, Any]]
) -> None:
    data: Any = _good_descriptor()
    for path, delete, value in edits:
        node = data
        for key in path[:-1]:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            if isinstance(node, dict):
                if delete:
                    node.pop(path[-1], None)
                else:
                    node[path[-1]] = value
    try:
        parse_descriptor(prefix / "usr/share/qemu/firmware/fuzz.json", prefix, data)
    except CatalogError as exc:
        assert "fuzz.json" in str(exc)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=_json)
def test_arbitrary_json_only_raises_catalog_error(prefix: Path, doc: Any) -> None:
    with pytest.raises(CatalogError, match="fuzz.json"):
        parse_descriptor(prefix / "usr/share/qemu/firmware/fuzz.json", prefix, doc)


def test_cli_firmware_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    from harness import cli

    assert cli.main(["firmware", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    versions = [b["version"] for b in data]
    # the catalogue's builds first; after them only builds another test of this worker
    # registered (a distro package under test)
    from harness import firmware

    assert versions[: len(VERSIONS)] == VERSIONS
    registered = {b.version for b in firmware._REGISTERED.values()}
    assert set(versions[len(VERSIONS) :]) <= registered, versions
    for b in data[: len(VERSIONS)]:
        assert b["flash_size"] == 4 * MiB and b["code"].endswith("OVMF_CODE_4M.fd")
