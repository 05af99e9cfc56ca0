"""Machine types a build deprecates are data (expected-incompatibilities.toml): a hop onto
such a build must print QEMU's text, and an uncovered warning is a problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import matrix
from harness.errors import CatalogError
from harness.inventory.catalog import Version

WARN = ("qemu-system-x86_64: warning: Machine type 'pc-q35-5.2' is deprecated: machines more "
        "than 3 years old are subject to deletion after 6 years\n")


def test_shipped_file_covers_the_11_1_deprecations() -> None:
    inc = matrix.load_incompatibilities()
    v = Version.parse("11.1.3")
    problems, entry = inc.machine_problems(v, "11.1.3", "pc-q35-5.2", WARN)
    assert problems == [] and entry is not None and "3 years" in entry.text
    assert inc.lookup_machine(Version.parse("10.0.13"), "pc-q35-5.2") is not None
    assert inc.lookup_machine(Version.parse("10.0.13"), "pc-q35-7.1") is None
    assert inc.lookup_machine(Version.parse("7.2"), "pc-q35-5.2") is None
    assert inc.lookup_machine(v, "pc-q35-8.2") is None
    assert inc.lookup_machine(Version.parse("11.1.2"), "virt-7.2") is not None


def test_a_missing_warning_and_an_uncovered_one_are_problems() -> None:
    inc = matrix.load_incompatibilities()
    silent, _ = inc.machine_problems(Version.parse("11.1.3"), "11.1.3", "pc-q35-5.2", "")
    assert silent and "printed no deprecation warning" in silent[0]
    uncovered, entry = inc.machine_problems(Version.parse("7.2"), "7.2", "pc-q35-5.2", WARN)
    assert entry is None and uncovered and "no [[deprecated-machine]] entry" in uncovered[0]
    other_text = WARN.replace("3 years old", "2 years old")
    changed, _ = inc.machine_problems(Version.parse("11.1.3"), "11.1.3", "pc-q35-5.2", other_text)
    assert changed and "expects" in changed[0]


@pytest.mark.parametrize(("body", "needle"), [
    ("[[deprecated-machine]]\nqemu='>=11'\nfamily='q35'\nversions='<8'\ntext='t'\nreason='r'\n", "family 'q35'"),
    ("[[deprecated-machine]]\nqemu='new'\nfamily='pc-q35'\nversions='<8'\ntext='t'\nreason='r'\n", "not a version constraint"),
    ("[[deprecated-machine]]\nqemu='>=11'\nfamily='pc-q35'\nversions='<8'\nreason='r'\n", "missing field 'text'"),
    ("[[deprecated-machine]]\nqemu='>=11'\nfamily='pc-q35'\nversions='<8'\ntext='t'\nreason='r'\nops=['live']\n", "unknown field"),
])
def test_malformed_entries_name_the_file_and_field(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "x.toml"
    path.write_text(body)
    with pytest.raises(CatalogError) as err:
        matrix.load_incompatibilities(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_firmware_constraints_narrow_an_incompatibility(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[[incompatible]]\nsource='>=0'\ndestination='>=0'\nfirmware='<2026'\n"
                    "dest_firmware='>=2026.08'\nsignature='bootorder-apps-moved'\nreason='r'\n")
    inc = matrix.load_incompatibilities(path)
    q = Version.parse("11.1.3")
    hit = inc.lookup(q, q, "live", "pc-q35-11.1", Version.parse("2025.02"), Version.parse("2026.08"))
    assert hit is not None and hit.signature == "bootorder-apps-moved"
    assert inc.lookup(q, q, "live", "pc-q35-11.1", Version.parse("2022.11"), Version.parse("2025.02")) is None
    assert inc.lookup(q, q, "live", "pc-q35-11.1") is None  # a QEMU hop without firmware change
    path.write_text("[[incompatible]]\nsource='>=0'\ndestination='>=0'\nfirmware='new'\n"
                    "signature='bootorder-apps-moved'\nreason='r'\n")
    with pytest.raises(CatalogError, match="firmware 'new' is not a version constraint"):
        matrix.load_incompatibilities(path)


def test_cross_version_parts_take_one_value_and_refuse_unknown_ones() -> None:
    from harness.errors import ConfigError
    from harness.scenarios import ScenarioOptions
    from harness.scenarios.cross_version import build_plans

    with pytest.raises(ConfigError, match="parts=nosuch: unknown"):
        build_plans(ScenarioOptions(qemu=["7.2"], extra={"parts": "nosuch"}))
