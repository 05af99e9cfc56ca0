"""The provisioned AAVMF: a 64 MiB split pair, and OVMF's vars refused with its code."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import VarstoreError
from harness.inventory.firmware import MiB, check_flash_pair, is_blank

# --- catalogue ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aavmf_2022() -> object:
    from harness.inventory.firmware import get_firmware

    return get_firmware("2022.11", "aarch64")


def test_provisioned_aavmf_is_64mib_split(aavmf_2022: object) -> None:
    from harness.inventory.firmware import FirmwareBuild

    assert isinstance(aavmf_2022, FirmwareBuild)
    d = aavmf_2022.select()
    assert d.name == "60-edk2-aarch64.json"
    assert (d.code.name, d.vars_template.name) == ("AAVMF_CODE.fd", "AAVMF_VARS.fd")
    assert aavmf_2022.flash_layouts() == frozenset({(64 * MiB, 64 * MiB)})
    assert is_blank(d.vars_template)  # Debian's 2022.11 template: formatted on first boot
    assert check_flash_pair(d.code, d.vars_template, aavmf_2022) == 128 * MiB


def test_ovmf_vars_do_not_fit_aavmf_code(aavmf_2022: object, tmp_path: Path) -> None:
    from harness.inventory.firmware import FirmwareBuild

    assert isinstance(aavmf_2022, FirmwareBuild)
    small = tmp_path / "vars.fd"
    small.write_bytes(bytes(540672))  # OVMF_VARS_4M.fd's size
    with pytest.raises(VarstoreError, match="does not fit code .*expected vars of 67108864"):
        check_flash_pair(aavmf_2022.select().code, small, aavmf_2022)

