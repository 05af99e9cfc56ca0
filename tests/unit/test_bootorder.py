"""harness.bootorder pure logic: load options, the agent's boot answer, the firmware's
serial lines, boot-order and BootNext checks, and the fw_cfg record, on recorded real data
(booted OVMF 2025.02 varstore and its serial log) and on the record file itself."""

from __future__ import annotations

import dataclasses
import lzma
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness import bootorder, varstore
from harness.bootorder import FwcfgObservation, GuestBootView, LoadOption
from harness.errors import CatalogError, StateError, VarstoreError

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "varstore"
SERIAL = DATA / "booted-2025.02-4m.serial.log"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> varstore.VarstoreModel:
    path = tmp_path_factory.mktemp("vs") / "booted.fd"
    path.write_bytes(lzma.decompress((DATA / "booted-2025.02-4m.fd.xz").read_bytes()))
    return varstore.read_varstore(path)


def test_parse_number() -> None:
    assert bootorder.parse_number("0003") == 3
    assert bootorder.parse_number("Boot00A0") == 0xA0
    assert bootorder.parse_number(7) == 7
    with pytest.raises(StateError, match="not a boot number"):
        bootorder.parse_number("Boot00G0")
    with pytest.raises(StateError, match="out of range"):
        bootorder.parse_number(0x10000)


def test_split_and_encode_round_trip_real_entries(model: varstore.VarstoreModel) -> None:
    assert model.boot_entries
    for n in model.boot_entries:
        raw = model.get(varstore.boot_name(n))
        assert raw is not None
        opt = bootorder.split_load_option(raw.data)
        assert opt.encode() == raw.data
        assert opt.title == model.boot_entries[n].title


def test_new_entry_decodes_with_virt_firmware(model: varstore.VarstoreModel) -> None:
    n = next(iter(model.boot_entries))
    base = bootorder.split_load_option(model.get(varstore.boot_name(n)).data)  # type: ignore[union-attr]
    new = LoadOption(1, "harness-user", base.device_path)
    entry = varstore.decode_load_option(new.encode(), 0x100)
    assert entry.title == "harness-user"
    assert entry.device_path == model.boot_entries[n].device_path
    assert entry.optional_data == b"" and entry.active


@pytest.mark.parametrize("data,why", [
    (b"\x01\x00\x00\x00\x04", "too short"),
    (b"\x01\x00\x00\x00\x04\x00A\x00B\x00", "not a terminated UCS-2"),
    (b"\x01\x00\x00\x00\x40\x00A\x00\x00\x00\x7f\xff\x04\x00", "runs past the end"),
])  # fmt: skip
def test_split_load_option_rejects_malformed(data: bytes, why: str) -> None:
    with pytest.raises(VarstoreError, match=why):
        bootorder.split_load_option(data)


def test_guest_boot_view_from_agent(model: varstore.VarstoreModel) -> None:
    entries = {f"{n:04X}": model.get(varstore.boot_name(n)).data.hex()  # type: ignore[union-attr]
               for n in model.boot_entries}  # fmt: skip
    first = min(model.boot_entries)
    view = GuestBootView.from_agent({"BootCurrent": f"{first:04X}", "BootNext": None,
                                     "BootOrder": ["0002", "0001"], "entries": entries})  # fmt: skip
    assert view.current == first and view.next is None and view.order == (2, 1)
    assert set(view.entries) == set(model.boot_entries)
    assert view.title(first) == f'{varstore.boot_name(first)} "{model.boot_entries[first].title}"'
    assert view.title(0x999) == "Boot0999 (no such entry)"
    assert view.title(None) == "(none)"
    with pytest.raises(StateError, match="malformed"):
        GuestBootView.from_agent({"BootCurrent": "zz", "BootOrder": []})
    with pytest.raises(StateError, match="malformed"):
        GuestBootView.from_agent({"BootCurrent": None})


def test_started_entries_from_the_recorded_serial_log() -> None:
    text = SERIAL.read_text(errors="replace")
    started = bootorder.started_entries(text)
    assert started and started[-1] == (2, "EFI Internal Shell")
    # "failed to load" lines are not starts
    assert all(n != 1 for n, _ in started)
    assert bootorder.started_entries('=3h=3hBdsDxe: starting Boot0100 "harness-user" from X') == [
        (0x100, "harness-user")]


def _view(current: int | None, nxt: int | None = None) -> GuestBootView:
    opt = LoadOption(1, "disk", b"\x7f\xff\x04\x00").encode()
    return GuestBootView(current, nxt, (0x100, 1), {1: opt, 0x100: LoadOption(1, "harness-user", b"\x7f\xff\x04\x00").encode()})


def test_booted_problems() -> None:
    assert bootorder.booted_problems(0x100, _view(0x100), [(0x100, "harness-user")]) == []
    problems = bootorder.booted_problems(0x100, _view(1), [(1, "disk")])
    assert problems == [
        'BootCurrent is Boot0001 "disk", expected Boot0100 "harness-user"',
        'the firmware started Boot0001 "disk", expected Boot0100 "harness-user"',
    ]
    (p,) = bootorder.booted_problems(1, _view(1), [])
    assert "printed no 'BdsDxe: starting Boot####' line" in p
    (p,) = bootorder.booted_problems(1, _view(1), [(2, "pxe"), (3, "shell")])
    assert "(all started this boot: Boot0002, Boot0003)" in p


def test_assert_booted_reads_the_console_from_the_mark(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b'BdsDxe: starting Boot0001 "disk" from X\n')
    mark = log.stat().st_size
    with log.open("ab") as fh:
        fh.write(b'\x1b[2J BdsDxe: starting Boot0100 "harness-user" from X\n')
    vm: Any = SimpleNamespace(console=SimpleNamespace(log_path=log))
    bootorder.assert_booted(vm, 0x100, since=mark, view=_view(0x100))
    with pytest.raises(StateError, match="wrong boot entry booted"):
        bootorder.assert_booted(vm, 0x100, since=0, view=_view(1))
    with pytest.raises(StateError, match='firmware started Boot0100 "harness-user", expected Boot0001'):
        bootorder.assert_booted(vm, 1, since=mark, view=_view(1))


def test_boot_order_and_boot_next_problems(model: varstore.VarstoreModel) -> None:
    assert bootorder.boot_order_problems([1, 2], [1, 2], "x") == []
    assert bootorder.boot_order_problems([0x100, 1], [1], "the guest") == [
        "BootOrder in the guest: removed Boot0100; [Boot0100, Boot0001] -> [Boot0001]"]
    assert bootorder.boot_order_problems([0x100, 1], [0x100, 1, 5], "x", may_grow=True) == []
    (p,) = bootorder.boot_order_problems([0x100, 1], [1, 0x100, 5], "x", may_grow=True)
    assert "reordered" in p and "added Boot0005" in p
    (p,) = bootorder.boot_order_problems([0x100, 1], [0x100, 1, 5], "x")
    assert p.startswith("BootOrder in x: added Boot0005")
    assert bootorder.boot_next_problems(_view(1)) == []
    (p,) = bootorder.boot_next_problems(_view(1, nxt=1))
    assert 'BootNext is still set in the guest (Boot0001 "disk")' in p
    with_next = dataclasses.replace(model, boot_next=3)
    (p,) = bootorder.boot_next_problems(_view(1), with_next)
    assert p == f"BootNext is still set in {model.path} (Boot0003)"


def test_set_boot_order_and_next_talk_to_the_agent() -> None:
    calls: list[tuple[str, ...]] = []
    vm: Any = SimpleNamespace(agent=lambda *a: calls.append(a) or {"ok": True})
    bootorder.set_boot_order(vm, [0x100, 1])
    bootorder.set_boot_next(vm, 3)
    bootorder.set_boot_next(vm, None)
    assert calls == [("bootorder", "set", "0100,0001"), ("bootnext", "set", "0003"), ("bootnext", "rm")]
    with pytest.raises(StateError, match="empty BootOrder"):
        bootorder.set_boot_order(vm, [])


def test_add_boot_entry_copies_the_device_path_without_optional_data(model: varstore.VarstoreModel) -> None:
    calls: list[tuple[str, ...]] = []
    vm: Any = SimpleNamespace(agent=lambda *a: calls.append(a) or {"ok": True})
    raw = {n: model.get(varstore.boot_name(n)).data for n in model.boot_entries}  # type: ignore[union-attr]
    n = max(raw)
    view = GuestBootView(n, None, tuple(raw), raw)
    opt = bootorder.add_boot_entry(vm, view=view)
    assert opt.optional_data == b""
    (call,) = calls
    assert call[:3] == ("efivar", "set", f"Boot0100-{varstore.EFI_GLOBAL_VARIABLE}") and call[4] == "7"
    assert bootorder.split_load_option(bytes.fromhex(call[3])).device_path == \
        bootorder.split_load_option(raw[n]).device_path
    with pytest.raises(StateError, match="cannot copy boot entry"):
        bootorder.add_boot_entry(vm, view=dataclasses.replace(view, current=None))


# --- the fw_cfg record -----------------------------------------------------------------


def _obs(**kw: Any) -> FwcfgObservation:
    base: dict[str, Any] = dict(ovmf="2022.11", qemu="10.0.2", config="fresh",
                                boot_current="Boot0001", started="Boot0001",
                                boot_order=("Boot0000", "Boot0001"),
                                entries={"Boot0000": "UiApp", "Boot0001": "disk"})  # fmt: skip
    base.update(kw)
    return FwcfgObservation(**base)


def test_the_record_file_loads_and_covers_every_version_and_config() -> None:
    records = bootorder.load_fwcfg_records()
    configs = [c for c, _, _ in bootorder.FWCFG_CONFIGS]
    for version in ("2020.11", "2022.11", "2025.02"):
        got = sorted(r.config for r in records if r.ovmf == version)
        assert got == sorted(configs), f"{version}: recorded {got}"
    for r in records:
        assert r.boot_current is not None and r.boot_current in r.entries


def test_fwcfg_problems_name_every_difference() -> None:
    rec = [_obs()]
    assert bootorder.fwcfg_problems(rec, [_obs()]) == []
    problems = bootorder.fwcfg_problems(rec, [_obs(boot_current="Boot0100", started="Boot0100",
                                                   boot_order=("Boot0001", "Boot0000"),
                                                   entries={"Boot0000": "UiApp", "Boot0002": "x"})])  # fmt: skip
    assert problems[0] == "OVMF 2022.11 on QEMU 10.0.2, fresh: BootCurrent Boot0100, recorded Boot0001"
    assert problems[1].endswith("the firmware started Boot0100, recorded Boot0001")
    assert "BootOrder differs from the record: reordered" in problems[2]
    assert problems[3].endswith("missing ['Boot0001'], new ['Boot0002'], retitled none")
    (p,) = bootorder.fwcfg_problems(rec, [_obs(config="bootindex-disk")])
    assert "nothing recorded" in p


def test_records_round_trip_through_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "rec.toml"
    a = _obs(description='quote " and backslash \\')
    b = _obs(ovmf="2025.02", config="bootindex-disk", boot_current=None, started=None)
    bootorder.write_fwcfg_records([a, b], path, header="# test\n")
    assert bootorder.load_fwcfg_records(path) == [a, b]
    c = dataclasses.replace(a, boot_current="Boot0000")
    bootorder.write_fwcfg_records([c], path)  # replaces 2022.11's rows, keeps 2025.02's
    assert bootorder.load_fwcfg_records(path) == [c, b]


def test_malformed_record_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[case]]\novmf = 1\n")
    with pytest.raises(CatalogError, match=r"case\[0\] malformed"):
        bootorder.load_fwcfg_records(bad)
    bad.write_text("not toml = = =")
    with pytest.raises(CatalogError, match="not valid TOML"):
        bootorder.load_fwcfg_records(bad)
    with pytest.raises(CatalogError, match="cannot read"):
        bootorder.load_fwcfg_records(tmp_path / "missing.toml")
