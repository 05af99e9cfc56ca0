"""Varstores through virt-firmware: real OVMF templates, a really booted copy, bad input."""

from __future__ import annotations

import json
import lzma
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import cli
from harness.errors import VarstoreError
from harness.varstore import (
    EFI_GLOBAL_VARIABLE,
    VarstoreModel,
    boot_order_diff,
    compare_guest_view,
    decode_boot_order,
    decode_load_option,
    diff,
    instantiate,
    private_copy,
    read_varstore,
)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "varstore"
BOOTED = DATA / "booted-2025.02-4m.fd.xz"
SERIAL = DATA / "booted-2025.02-4m.serial.log"


@pytest.fixture(scope="module")
def booted_bytes() -> bytes:
    return lzma.decompress(BOOTED.read_bytes())


@pytest.fixture
def booted(tmp_path: Path, booted_bytes: bytes) -> Path:
    path = tmp_path / "booted_VARS.fd"
    path.write_bytes(booted_bytes)
    return path


def _started_by_ovmf() -> dict[int, str]:
    """Boot entries the recorded serial log says BdsDxe tried: number -> title."""
    text = SERIAL.read_text(errors="replace")
    found = re.findall(r'BdsDxe: (?:starting|failed to load) Boot([0-9A-F]{4}) "([^"]*)"', text)
    return {int(n, 16): title for n, title in found}


def _with_virt_firmware(src: Path, dest: Path, order: list[int]) -> None:
    """Rewrite BootOrder with virt-firmware's own writer (a guest-like change)."""
    from virt.firmware.varstore import edk2

    store = edk2.Edk2VarStore(str(src))
    varlist = store.get_varlist()
    varlist["BootOrder"].set_boot_order(order)
    store.write_varstore(str(dest), varlist)


# --- the real templates ----------------------------------------------------------------


# --- the booted copy (golden) ----------------------------------------------------------


def test_booted_copy_boot_entries_match_the_serial_log(booted: Path) -> None:
    model = read_varstore(booted)
    started = _started_by_ovmf()
    assert started, "the recorded serial log shows no BdsDxe boot attempt"
    for number, title in started.items():
        assert model.boot_entries[number].title == title
    assert sorted(model.boot_order) == sorted(model.boot_entries)
    assert model.boot_entries[0].title == "UiApp"
    assert model.boot_entries[1].device_path.startswith("PciRoot()")
    assert all(e.active for e in model.boot_entries.values())


def test_diff_shows_a_changed_boot_order(booted: Path, tmp_path: Path) -> None:
    changed = tmp_path / "reordered.fd"
    _with_virt_firmware(booted, changed, [2, 0, 1])
    d = diff(read_varstore(booted), read_varstore(changed))
    assert [(o.name, n.name) for o, n in d.changed] == [("BootOrder", "BootOrder")]
    assert "reordered" in d.boot_order
    assert "was [Boot0000, Boot0001, Boot0002]" in str(d)
    assert "now [Boot0002, Boot0000, Boot0001]" in str(d)


def test_boot_order_diff_words() -> None:
    assert boot_order_diff([1, 2], [1, 2]) == []
    words = boot_order_diff([1, 2, 3], [3, 1, 4])
    assert words[:3] == ["added Boot0004", "removed Boot0002", "reordered"]


# --- decoding for the guest's view -----------------------------------------------------


def test_decoders_on_real_data(booted: Path) -> None:
    model = read_varstore(booted)
    boot1 = model.get("Boot0001")
    assert boot1 is not None
    entry = decode_load_option(boot1.data, 1)
    assert entry == model.boot_entries[1]
    order = model.get("BootOrder")
    assert order is not None and decode_boot_order(order.data) == model.boot_order


@pytest.mark.parametrize("cut", [0, 3, 7, 10, 20])
def test_decode_truncated_load_option(booted: Path, cut: int) -> None:
    var = read_varstore(booted).get("Boot0001")
    assert var is not None
    with pytest.raises(VarstoreError, match="Boot0001"):
        decode_load_option(var.data[:cut], 1)


def test_decode_boot_order_odd_length() -> None:
    with pytest.raises(VarstoreError, match="UINT16"):
        decode_boot_order(b"\x01\x00\x02")


def _guest_view(model: VarstoreModel) -> dict[tuple[str, str], tuple[int, bytes]]:
    return {k: (v.attributes, v.data) for k, v in model.variables.items()}


def test_compare_guest_view(booted: Path) -> None:
    model = read_varstore(booted)
    guest = _guest_view(model)
    assert compare_guest_view(model, guest, complete=True) == []
    # Volatile variables (BootCurrent) cannot be in the file: ignored.
    guest[("BootCurrent", EFI_GLOBAL_VARIABLE)] = (6, b"\x02\x00")
    assert compare_guest_view(model, guest) == []
    guest[("BootOrder", EFI_GLOBAL_VARIABLE)] = (7, b"\x02\x00\x00\x00")
    guest[("HarnessTest", "12345678-1234-1234-1234-123456789abc")] = (7, b"x")
    del guest[("Lang", EFI_GLOBAL_VARIABLE)]
    problems = compare_guest_view(model, guest)
    assert any("BootOrder" in p and "[Boot0002, Boot0000]" in p for p in problems)
    assert any("HarnessTest" in p and "not in" in p for p in problems)
    assert not any("Lang" in p for p in problems)
    complete = compare_guest_view(model, guest, complete=True)
    assert any(p.startswith("Lang") and "not in the guest" in p for p in complete)
    guest[("Timeout", EFI_GLOBAL_VARIABLE)] = (3, guest[("Timeout", EFI_GLOBAL_VARIABLE)][1])
    assert any("Timeout: attributes differ" in p for p in compare_guest_view(model, guest))


# --- private copies --------------------------------------------------------------------


def test_instantiate_refuses_bad_template(tmp_path: Path) -> None:
    with pytest.raises(VarstoreError, match="does not exist"):
        instantiate(tmp_path / "missing.fd", tmp_path / "x.fd")
    junk = tmp_path / "junk.fd"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(VarstoreError, match="junk.fd"):
        instantiate(junk, tmp_path / "x.fd")
    assert not (tmp_path / "x.fd").exists()


# --- bad files -------------------------------------------------------------------------


def test_nonexistent_file(tmp_path: Path) -> None:
    with pytest.raises(VarstoreError, match=re.escape(str(tmp_path / "none.fd"))):
        read_varstore(tmp_path / "none.fd")
    with pytest.raises(VarstoreError, match="not a regular file"):
        read_varstore(tmp_path)


@pytest.mark.parametrize("length", [0, 64, 100, 200, 4096, 0x3FFFF])
def test_truncated_file(tmp_path: Path, booted_bytes: bytes, length: int) -> None:
    path = tmp_path / "cut.fd"
    path.write_bytes(booted_bytes[:length])
    with pytest.raises(VarstoreError, match="cut.fd"):
        read_varstore(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.fd"
    path.write_bytes(os.urandom(540672))
    with pytest.raises(VarstoreError, match="random.fd.*no edk2 variable store"):
        read_varstore(path)


def test_virt_firmware_exit_becomes_our_error(tmp_path: Path, booted_bytes: bytes) -> None:
    # Keep the NvData GUID (so virt-firmware probes it) but break the _FVH signature:
    # virt-firmware logs "not a firmware volume" and calls sys.exit(1).
    data = bytearray(booted_bytes)
    data[40:44] = b"XXXX"
    path = tmp_path / "badsig.fd"
    path.write_bytes(bytes(data))
    with pytest.raises(VarstoreError, match="badsig.fd.*not a firmware volume"):
        read_varstore(path)


def test_garbage_boot_entry_is_a_problem_not_a_crash(booted: Path, tmp_path: Path) -> None:
    from virt.firmware.varstore import edk2

    store = edk2.Edk2VarStore(str(booted))
    varlist = store.get_varlist()
    varlist["Boot0001"].data = b"\x01\x00\x00\x00\xff"
    out = tmp_path / "garbage.fd"
    store.write_varstore(str(out), varlist)
    model = read_varstore(out)
    assert 1 not in model.boot_entries and 2 in model.boot_entries
    assert any("Boot0001" in p for p in model.problems)
    assert "Boot0001 undecodable (5 bytes)" in str(model)


# --- fuzzing: only VarstoreError comes out ---------------------------------------------


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 540672)),
)
def test_mutated_varstore_only_raises_varstore_error(
    tmp_path: Path, booted_bytes: bytes, flips: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(booted_bytes)
    for offset, value in flips:
        data[offset] = value
    path = tmp_path / "mutant.fd"
    path.write_bytes(bytes(data[:cut]))
    try:
        model = read_varstore(path)
    except VarstoreError as exc:
        assert "mutant.fd" in str(exc)
        return
    str(model)
    json.dumps(model.to_json())


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_fuzzed_load_option_only_raises_varstore_error(data: bytes) -> None:
    try:
        entry = decode_load_option(data, 7)
    except VarstoreError as exc:
        assert "Boot0007" in str(exc)
    else:
        assert entry.number == 7 and isinstance(entry.device_path, str)


# --- real templates kept with the tests -------------------------------------------------


def test_golden_diff_lists_what_ovmf_added(booted: Path, kept_templates: dict[str, Path]) -> None:
    template = read_varstore(kept_templates["template-2025.02-4m.fd"])
    after = read_varstore(booted)
    d = diff(template, after)
    assert d and not d.removed and not d.changed
    assert {v.key for v in d.added} == set(after.variables)
    assert d.added_boot_entries() == sorted(after.boot_entries) == [0, 1, 2]
    text = str(d)
    for entry in after.boot_entries.values():
        assert f"+ {entry.name} " in text and entry.title in text
    assert "+ BootOrder" in text and "[Boot0000, Boot0001, Boot0002]" in text
    js = d.to_json()
    assert {v["name"] for v in js["added"]} >= {"Boot0000", "BootOrder", "ConOut", "Lang"}
    # Reverse direction: the same variables are removed.
    back = diff(after, template)
    assert [v.key for v in back.removed] == [v.key for v in d.added] and not back.added
    assert not diff(after, read_varstore(booted))


def test_cli_diff(booted: Path, capsys: pytest.CaptureFixture[str], kept_templates: dict[str, Path]) -> None:
    tmpl = str(kept_templates["template-2025.02-4m.fd"])
    assert cli.main(["varstore", "diff", tmpl, str(booted)]) == 1
    assert "+ Boot0002 " in capsys.readouterr().out
    assert cli.main(["varstore", "diff", "--json", str(booted), str(booted)]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == []


def test_instantiate_private_copy(tmp_path: Path, kept_templates: dict[str, Path]) -> None:
    tmpl = kept_templates["template-2022.11-4m-ms.fd"]
    dest = instantiate(tmpl, tmp_path / "guest_VARS.fd")
    assert dest.read_bytes() == tmpl.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["guest_VARS.fd"]  # no temp left over
    with pytest.raises(VarstoreError, match="already exists"):
        instantiate(tmpl, dest)
    dest.write_bytes(b"guest wrote this")
    instantiate(tmpl, dest, overwrite=True)
    assert dest.read_bytes() == tmpl.read_bytes()


def test_instantiate_refuses_template_itself(tmp_path: Path, kept_template: Callable[..., Path]) -> None:
    tmpl = kept_template()
    before = tmpl.read_bytes()
    with pytest.raises(VarstoreError, match="template"):
        instantiate(tmpl, tmpl, overwrite=True)
    os.symlink(tmpl, tmp_path / "alias.fd")
    with pytest.raises(VarstoreError, match="template"):
        instantiate(tmpl, tmp_path / "alias.fd", overwrite=True)
    assert tmpl.read_bytes() == before


def test_private_copy_is_removed_on_exit(tmp_path: Path, kept_templates: dict[str, Path]) -> None:
    tmpl = kept_templates["template-2025.02-4m.fd"]
    with private_copy(tmpl, tmp_path / "v.fd") as path:
        assert path.exists()
    assert not path.exists()


def test_a_scratch_copy_is_the_same_atomic_private_copy(tmp_path: Path, kept_templates: dict[str, Path]) -> None:
    tmpl = kept_templates["template-2022.11-4m-ms.fd"]
    dest = instantiate(tmpl, tmp_path / "scratch_VARS.fd", durable=False)
    assert dest.read_bytes() == tmpl.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["scratch_VARS.fd"]
    with pytest.raises(VarstoreError, match="already exists"):
        instantiate(tmpl, dest, durable=False)


def test_a_blank_template_is_valid_and_read_again_once_it_changed(tmp_path: Path) -> None:
    tmpl = tmp_path / "AAVMF_VARS.fd"  # AAVMF before 2025.02: all zeros, formatted on first boot
    tmpl.write_bytes(bytes(4096))
    instantiate(tmpl, tmp_path / "a.fd", durable=False)
    instantiate(tmpl, tmp_path / "b.fd", durable=False)  # remembered: the same file version
    tmpl.write_bytes(b"\x01" + bytes(8191))  # another version of the file: junk now
    with pytest.raises(VarstoreError, match="AAVMF_VARS.fd"):
        instantiate(tmpl, tmp_path / "c.fd", durable=False)
