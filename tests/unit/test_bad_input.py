"""Bad input, each a clear error from harness.errors that names the input: a wrong firmware
path, a varstore of the wrong size or corrupted, an unknown version, a malformed catalogue
entry, a mode a build lacks, a malformed spec.  No QEMU is started (the caller's varstore
is refused before launch; that is asserted too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import builds, catalog, firmware, migration, varstore
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
from harness.machine import Machine
from harness.qemu_process import live_processes
from harness.spec import VmSpec, from_dict

FW = "2022.11"


@pytest.fixture(scope="module")
def pair() -> tuple[Path, Path]:
    desc = firmware.get_firmware(FW).select()
    assert desc.vars_template is not None
    return desc.code, desc.vars_template


# --- firmware and varstore files ----------------------------------------------------------


def test_missing_firmware_code_names_the_path(pair: tuple[Path, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "OVMF_CODE_4M.fd"
    with pytest.raises(FirmwareError, match=str(missing)) as exc:
        firmware.check_flash_pair(missing, pair[1])
    assert "No such file" in str(exc.value)


def test_register_firmware_from_a_wrong_path(tmp_path: Path) -> None:
    wrong = tmp_path / "not-ovmf"
    with pytest.raises(FirmwareError, match=str(wrong)):
        firmware.register_firmware(wrong)
    (wrong).mkdir()
    with pytest.raises(FirmwareError, match=str(wrong)):
        firmware.register_firmware(wrong)  # a directory that is no package


def test_wrong_size_varstore_names_file_and_sizes(pair: tuple[Path, Path], tmp_path: Path) -> None:
    code, template = pair
    short = tmp_path / "short_VARS.fd"
    short.write_bytes(template.read_bytes()[: 128 * 1024])
    with pytest.raises(VarstoreError) as exc:
        firmware.check_flash_pair(code, short)
    msg = str(exc.value)
    assert str(short) in msg and str(128 * 1024) in msg
    assert str(template.stat().st_size) in msg  # says what size would fit


def test_right_size_is_accepted(pair: tuple[Path, Path]) -> None:
    code, template = pair
    assert firmware.check_flash_pair(code, template) == code.stat().st_size + template.stat().st_size


@pytest.mark.parametrize("damage", ["random", "zeros", "header-cut"])
def test_corrupted_varstore_names_the_file(pair: tuple[Path, Path], tmp_path: Path, damage: str) -> None:
    template = pair[1]
    size = template.stat().st_size
    bad = tmp_path / f"{damage}_VARS.fd"
    if damage == "random":
        bad.write_bytes(os.urandom(size))
    elif damage == "zeros":
        bad.write_bytes(bytes(size))
    else:
        bad.write_bytes(bytes(64) + template.read_bytes()[64:])
    with pytest.raises(VarstoreError, match=str(bad)):
        varstore.read_varstore(bad)


def test_machine_refuses_a_corrupt_varstore_before_launching_qemu(pair: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    bad = tmp_path / "corrupt_VARS.fd"
    bad.write_bytes(os.urandom(pair[1].stat().st_size))
    before = len(live_processes())
    m = Machine(VmSpec(firmware=FW, name="badvars"), tmp_path / "vm", varstore=bad)
    with pytest.raises(VarstoreError, match=str(bad)):
        m.start(timeout=30)
    assert m.history == [] and len(live_processes()) == before


def test_machine_refuses_a_wrong_size_varstore_before_launching_qemu(pair: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    # a valid varstore of the 2 MB layout against the 4 MB code
    small = firmware.get_firmware(FW).variant("2m").vars_template
    assert small is not None
    wrong = tmp_path / "2m_VARS.fd"
    wrong.write_bytes(small.read_bytes())
    m = Machine(VmSpec(firmware=FW, name="wrongsize"), tmp_path / "vm", varstore=wrong)
    with pytest.raises(VarstoreError, match=str(wrong)):
        m.start(timeout=30)
    assert m.history == []


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


def test_machine_with_unknown_firmware_version(tmp_path: Path) -> None:
    with pytest.raises(UnknownVersionError, match="1999.01"):
        Machine(VmSpec(firmware="1999.01", name="nofw"), tmp_path / "vm")


def test_qemu_binary_path_that_is_not_qemu(tmp_path: Path) -> None:
    wrong = tmp_path / "qemu-system-x86_64"
    with pytest.raises(ProvisionError, match=str(wrong)):
        builds.get_build(str(wrong))


def test_mode_a_build_lacks_names_mode_and_build() -> None:
    b72 = builds.get_build("7.2")
    assert not b72.capabilities.has_mode("cpr-transfer")
    with pytest.raises(UnsupportedError) as exc:
        migration._require_mode(b72, "cpr-transfer")
    assert exc.value.capability == "migration mode cpr-transfer"
    assert "7.2" in str(exc.value) and "normal" in str(exc.value)


def test_capability_a_build_lacks() -> None:
    b = builds.get_build("10.0.2")
    with pytest.raises(UnsupportedError, match="no-such-capability"):
        migration.check_caps(["no-such-capability"], b)


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
