"""Bad input against real builds and firmware: wrong-size and corrupt varstores refused before
QEMU starts, unknown versions, modes and capabilities a build lacks, each named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import migration, varstore
from harness.errors import (
    FirmwareError,
    UnknownVersionError,
    UnsupportedError,
    VarstoreError,
)
from harness.guest.qemu_process import live_processes
from harness.inventory import builds, firmware
from harness.machine import Machine
from harness.spec import VmSpec

FW = "2022.11"


@pytest.fixture(scope="module")
def pair() -> tuple[Path, Path]:
    desc = firmware.get_firmware(FW).select()
    assert desc.vars_template is not None
    return desc.code, desc.vars_template


def test_missing_firmware_code_names_the_path(pair: tuple[Path, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "OVMF_CODE_4M.fd"
    with pytest.raises(FirmwareError, match=str(missing)) as exc:
        firmware.check_flash_pair(missing, pair[1])
    assert "No such file" in str(exc.value)


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


def test_machine_with_unknown_firmware_version(tmp_path: Path) -> None:
    with pytest.raises(UnknownVersionError, match="1999.01"):
        Machine(VmSpec(firmware="1999.01", name="nofw"), tmp_path / "vm")


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

