"""The catalogue: parsing, validation errors that name the file and field, version order."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import AmbiguousVersionError, CatalogError, UnknownVersionError
from harness.inventory import catalog
from harness.inventory.catalog import Version


def test_shipped_catalogue_has_the_mission_builds() -> None:
    cat = catalog.default()
    assert {q.version for q in cat.qemu if q.arch == "x86_64"} >= {"5.2", "7.2", "10.0.2"}
    assert {f.version for f in cat.firmware if f.arch == "x86_64"} >= {"2020.11", "2022.11", "2025.02"}
    assert cat.python.source == "qemu"
    assert {"bullseye", "bookworm", "bookworm-backports", "trixie"} <= cat.suites()


def test_version_order_is_numeric() -> None:
    assert Version.parse("10.0") > Version.parse("7.2")
    assert Version.parse("7.2.22") > Version.parse("7.2")
    assert Version.parse("5.2") < Version.parse("7.2") < Version.parse("10.0.2")
    assert Version.parse("10.0") == Version.parse("10.0.0")
    assert Version.parse("7.2.22").matches(Version.parse("7.2"))
    assert not Version.parse("7.20").matches(Version.parse("7.2"))
    with pytest.raises(ValueError):
        Version.parse("abc")


def test_lookup_by_prefix_and_unknown_version_lists_available() -> None:
    cat = catalog.default()
    assert cat.qemu_entry("10.0.2").version == "10.0.2"
    assert cat.qemu_entry("7.2").suite == "bookworm"
    assert cat.qemu_entry("11.1.3").suite == "trixie-backports"
    # a prefix that matches two builds names them instead of picking one
    with pytest.raises(AmbiguousVersionError) as amb:
        cat.qemu_entry("10.0")
    assert amb.value.matching == ["10.0.13", "10.0.2"] and "ambiguous" in str(amb.value)
    with pytest.raises(UnknownVersionError) as err:
        cat.qemu_entry("6.0")
    assert "6.0" in str(err.value) and "10.0.2" in str(err.value) and "5.2" in str(err.value)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "qemu.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[qemu]]\nversion = '1.0'\n", "missing field 'arch'"),
        ("[[qemu]]\nversion = 'ten'\n", "not dotted numbers"),
        ("qemu = 3\n", "expected at least one [[qemu]] table"),
        ("[[qemu]]\nversion='1.0'\narch='x86_64'\nsuite='s'\npackages=[]\nbinary='b'\n", "'packages' is empty"),
        ("[[qemu]]\nversion='1.0'\narch='x86_64'\nsuite='s'\npackages=[1]\nbinary='b'\n", "list of strings"),
        ("[[qemu]]\nversion='1.0'\narch='x86_64'\nsuite='s'\npackages=['p']\nbinary='b'\n", "[python]"),
        ("not toml ===", "not valid TOML"),
    ],
)
def test_malformed_qemu_catalogue_names_file_and_problem(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(CatalogError) as err:
        catalog.load(path, catalog.FIRMWARE_CATALOG)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_package_suite_override() -> None:
    entry = catalog.default().qemu_entry("10.0.2")
    suites = {p.name: p.suite for p in entry.packages}
    assert suites["ipxe-qemu"] == "bookworm"
    assert suites["qemu-system-x86"] == "bookworm-backports"
