"""Firmware builds from QEMU descriptors: descriptor parsing, selection rules on built-up
prefixes, and bad input (the real OVMF packages: tests/integration/test_firmware_packages.py)."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import (
    CatalogError,
    FirmwareError,
    HarnessError,
    UnknownVersionError,
)
from harness.inventory import catalog
from harness.inventory.firmware import (
    get_firmware,
    in_prefix,
    load_build,
    load_descriptors,
    parse_descriptor,
    register_firmware,
)

pytestmark = pytest.mark.unit

VERSIONS = [e.version for e in catalog.default().firmware if e.arch == "x86_64"]


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


def test_unknown_version_lists_available() -> None:
    with pytest.raises(UnknownVersionError) as info:
        get_firmware("1999.01")
    for v in VERSIONS:
        assert v in str(info.value)


# --- flash pair check ------------------------------------------------------------------


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
    with caplog.at_level(logging.DEBUG, logger="harness.inventory.firmware"):
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


