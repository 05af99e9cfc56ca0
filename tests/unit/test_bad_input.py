"""Bad input, each a clear error from harness.errors that names the input: a wrong firmware
path, a varstore of the wrong size or corrupted, an unknown version, a malformed catalogue
entry, a mode a build lacks, a malformed spec.  No QEMU is started (the caller's varstore
is refused before launch; that is asserted too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import migration, varstore
from harness.errors import (
    CatalogError,
    ConfigError,
    FirmwareError,
    HarnessError,
    ProvisionError,
    SpecError,
    UnknownVersionError,
    UnsupportedError,
    VarstoreError,
)
from harness.inventory import builds, catalog, firmware
from harness.spec import from_dict

FW = "2022.11"


# --- firmware and varstore files ----------------------------------------------------------


def test_register_firmware_from_a_wrong_path(tmp_path: Path) -> None:
    wrong = tmp_path / "not-ovmf"
    with pytest.raises(FirmwareError, match=str(wrong)):
        firmware.register_firmware(wrong)
    (wrong).mkdir()
    with pytest.raises(FirmwareError, match=str(wrong)):
        firmware.register_firmware(wrong)  # a directory that is no package


def test_missing_varstore_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "gone.fd"
    with pytest.raises(VarstoreError, match=str(missing)):
        varstore.read_varstore(missing)


# --- versions, builds and modes ------------------------------------------------------------


def test_unknown_qemu_version_lists_the_known_ones() -> None:
    with pytest.raises(UnknownVersionError) as exc:
        builds.get_build("99.9")
    assert "'99.9'" in str(exc.value) and "10.0.2" in str(exc.value)
    assert exc.value.kind == "QEMU"


def test_unknown_firmware_version_lists_the_known_ones() -> None:
    with pytest.raises(UnknownVersionError) as exc:
        firmware.get_firmware("1999.01")
    assert "'1999.01'" in str(exc.value) and FW in str(exc.value)


def test_qemu_binary_path_that_is_not_qemu(tmp_path: Path) -> None:
    wrong = tmp_path / "qemu-system-x86_64"
    with pytest.raises(ProvisionError, match=str(wrong)):
        builds.get_build(str(wrong))


def test_unknown_operation() -> None:
    with pytest.raises(ConfigError, match="teleport"):
        migration.operation("teleport")


# --- catalogue entries ----------------------------------------------------------------------


GOOD_QEMU = {"version": "10.0.2", "arch": "x86_64", "suite": "bookworm-backports",
             "packages": ["qemu-system-x86"], "libs": [], "binary": "usr/bin/qemu-system-x86_64",
             "datadirs": ["usr/share/qemu"]}  # fmt: skip
PY = {"source": "qemu", "suite": "bookworm-backports"}


def test_good_qemu_entry_parses() -> None:
    entries, _ = catalog.parse_qemu(Path("q.toml"), {"qemu": [GOOD_QEMU], "python": PY})
    assert entries[0].version == "10.0.2"


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"arch": None}, "missing field 'arch'"),
        ({"version": 10}, "'version' must be str"),
        ({"packages": "qemu-system-x86"}, "packages"),
        ({"packages": []}, "'packages' is empty"),
        ({"binary": ["x"]}, "binary"),
    ],
)
def test_malformed_qemu_entry_names_file_and_field(change: dict[str, object], expect: str) -> None:
    entry = {k: v for k, v in {**GOOD_QEMU, **change}.items() if v is not None}
    with pytest.raises(CatalogError) as exc:
        catalog.parse_qemu(Path("/cat/qemu.toml"), {"qemu": [entry], "python": PY})
    assert str(exc.value).startswith("/cat/qemu.toml:") and expect in str(exc.value)


def test_duplicate_and_missing_tables() -> None:
    with pytest.raises(CatalogError, match="duplicate"):
        catalog.parse_qemu(Path("q.toml"), {"qemu": [GOOD_QEMU, GOOD_QEMU], "python": PY})
    with pytest.raises(CatalogError, match=r"\[python\]"):
        catalog.parse_qemu(Path("q.toml"), {"qemu": [GOOD_QEMU]})
    with pytest.raises(CatalogError, match=r"\[\[firmware\]\]"):
        catalog.parse_firmware(Path("f.toml"), {})


def test_malformed_catalogue_file(tmp_path: Path) -> None:
    bad = tmp_path / "qemu.toml"
    bad.write_text("[[qemu]\nversion = \n")
    fw = tmp_path / "firmware.toml"
    fw.write_text("")
    with pytest.raises(CatalogError, match=str(bad)) as exc:
        catalog.load(bad, fw)
    assert "not valid TOML" in str(exc.value)
    with pytest.raises(CatalogError, match="file not found"):
        catalog.load(tmp_path / "missing.toml", fw)


def test_malformed_firmware_descriptor(tmp_path: Path) -> None:
    desc = tmp_path / "60-ovmf.json"
    desc.write_text('{"interface-types": [], "mapping": {}}')
    with pytest.raises(CatalogError, match=str(desc)):
        firmware.parse_descriptor(desc, tmp_path)
    desc.write_text("{not json")
    with pytest.raises(CatalogError, match="not valid JSON"):
        firmware.parse_descriptor(desc, tmp_path)


# --- specs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"memory_mb": "lots"}, "memory_mb"),
        ({"memory_backend": "nvme"}, "memory_backend"),
        ({"uuid": "not-a-uuid"}, "uuid"),
        ({"name": "a b/c"}, "name"),
        ({"boot": "uefi", "firmware": None}, "firmware"),
        ({"aux_ram_share": True}, "aux_ram_share"),
        ({"smp": 0}, "smp"),
        ({"guest_config": {"Bad Key": "x"}}, "guest_config"),
        ({"colour": "red"}, "colour"),
        ({"extra_args": [1, 2]}, "extra_args"),
    ],
)
def test_malformed_spec_names_the_field(fields: dict[str, object], names: str) -> None:
    with pytest.raises(SpecError) as exc:
        from_dict(fields)
    assert names in str(exc.value)


def test_every_bad_input_error_is_a_harness_error() -> None:
    # the CLI and the plugin catch HarnessError: nothing above may escape it
    for cls in (CatalogError, ConfigError, FirmwareError, ProvisionError, SpecError,
                UnknownVersionError, UnsupportedError, VarstoreError):  # fmt: skip
        assert issubclass(cls, HarnessError)


# --- scenario settings (`harness repro ... --set KEY=VALUE`) ------------------------------


@pytest.mark.parametrize(("value", "expect"), [("1", True), ("yes", True), ("On", True), (True, True),
                                               ("0", False), ("no", False), ("false", False), (False, False)])
def test_yes_no_settings_read_both_ways(value: object, expect: bool) -> None:
    from harness.scenarios import ScenarioOptions

    assert ScenarioOptions(extra={"fast": value}).flag("fast") is expect
    assert ScenarioOptions().flag("fast") is False and ScenarioOptions().flag("tpm", default=True) is True


def test_a_yes_no_setting_that_is_neither_is_refused() -> None:
    from harness.scenarios import ScenarioOptions

    # before, "--set fast=0" read as a yes (any non-empty string was true)
    with pytest.raises(ConfigError, match=r"--set fast=maybe: expected one of 1, true, yes, on, 0"):
        ScenarioOptions(extra={"fast": "maybe"}).flag("fast")
