"""The storm's bookkeeping (pure): its log, the state it implies, the view comparison, the
hop plan; and the varstore structure walk on crafted files (each corruption kind)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import storm, varstore
from harness.errors import VarstoreError

pytestmark = pytest.mark.unit

LOG = """1 set 1 24 b
2 set 2 300 c
3 append 1 24 d
4 fail set 4 1200 e dd: error writing '/sys/firmware/efi/efivars/HarnessStorm4-x': No space left on device
7 delete 1 300 h
8 absent 2 24 a
9 set 3 2800 b
10 set 3 2"""  # a torn last line: the guest was reading while the loop wrote


def test_log_parses_completed_and_failed_writes_and_ignores_a_torn_line() -> None:
    writes = storm.parse_log(LOG)
    assert [w.seq for w in writes] == [1, 2, 3, 4, 7, 8, 9]
    assert writes[3].failed and "No space left" in writes[3].failed
    assert writes[0].data == b"s00000001" + b"b" * 15 and len(writes[6].data) == 2800


def test_expected_state_replays_completed_writes_only() -> None:
    exp = storm.expected_state(storm.parse_log(LOG))
    assert exp[1] is None  # set, append, then deleted
    assert exp[2] is None  # 'absent': deleted before (the delete of a missing variable)
    assert exp[3] == b"s00000009" + b"b" * 2791
    assert 4 not in exp  # its only write failed: never created
    appended = storm.expected_state(storm.parse_log("1 set 0 24 a\n2 append 0 24 b"))
    assert appended[0] == b"s00000001" + b"a" * 15 + b"s00000002" + b"b" * 15


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_view_problems_name_each_difference() -> None:
    exp: dict[int, bytes | None] = {0: b"x" * 20, 1: None, 2: b"y" * 30}
    view = {0: (7, _sha(b"x" * 20)), 1: (7, _sha(b"old")), 3: (7, _sha(b"z"))}
    probs = storm.view_problems(exp, view, "the file")
    assert any("HarnessStorm1 exists, but its last completed write deleted it" in p for p in probs)
    assert any("HarnessStorm2 is missing" in p for p in probs)
    assert not any("HarnessStorm0" in p for p in probs)
    assert storm.view_problems(exp, {0: (7, _sha(b"x" * 20)), 2: (0x47, _sha(b"y" * 30))}, "g") == [
        "g: HarnessStorm2 has attributes 0x47, expected 0x7"]
    assert storm.view_problems({0: b"a"}, {0: (7, _sha(b"b"))}, "g")[0].startswith("g: HarnessStorm0 holds other data")


def test_console_errors_find_variable_and_flash_errors_only() -> None:
    text = ("BdsDxe: starting Boot0001\nASSERT [VariableRuntimeDxe] Variable.c(123): !EFI_ERROR\n"
            "efivars: set_variable failed\nvirtio_blk virtio1: [vda] 65536 512-byte logical blocks\n")
    assert len(storm.console_errors(text)) == 2


def test_reboot_and_cross_version_hops_are_planned() -> None:
    class Caps:
        def __init__(self, modes: tuple[str, ...]) -> None:
            self.modes = modes

        def has_mode(self, m: str) -> bool:
            return m in self.modes

    class B:
        def __init__(self, label: str, modes: tuple[str, ...]) -> None:
            self.label, self.capabilities = label, Caps(modes)

    from harness.scenarios import storm as scen

    old, new = B("7.2", ("normal",)), B("11.1.3", ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec"))
    hops = scen.plan([old, new], 2)  # type: ignore[list-item]
    assert [(op, getattr(d, "label", None)) for op, d in hops] == [
        ("live", "7.2"), ("save-restore", "7.2"), ("reboot", None), ("live", "11.1.3"),
        ("live", "11.1.3"), ("save-restore", "11.1.3"), ("cpr-reboot", "11.1.3"),
        ("cpr-transfer", "11.1.3"), ("cpr-exec", "11.1.3"), ("reboot", None), ("live", "7.2")]


# --- the varstore's structure -----------------------------------------------------------------

def _copy(kept_template: Callable[..., Path]) -> tuple[Path, list[varstore.StoreSlot]]:
    """OVMF 2022.11's enrolled 4M template (kept with the tests), as ``vars.fd``."""
    path = kept_template("template-2022.11-4m-ms.fd", "vars.fd")
    slots, problems = varstore.store_slots(path)
    assert slots and problems == []
    return path, slots


def _poke(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_a_real_store_is_clean(kept_template: Callable[..., Path]) -> None:
    path, slots = _copy(kept_template)
    assert varstore.integrity_problems(path) == []
    assert {s.state for s in slots} <= {0x3F, 0x3D, 0x3C}


def test_a_bad_state_byte_is_named_with_its_offset(kept_template: Callable[..., Path]) -> None:
    path, slots = _copy(kept_template)
    _poke(path, slots[2].offset + 2, b"\x12")
    [problem] = varstore.integrity_problems(path)
    assert f"offset {slots[2].offset:#x}" in problem and "0x12" in problem and str(path) in problem


def test_a_half_written_variable_is_a_problem_once_settled(kept_template: Callable[..., Path]) -> None:
    path, slots = _copy(kept_template)
    _poke(path, slots[-1].offset + 2, bytes([varstore.VAR_HEADER_VALID_ONLY]))
    assert varstore.integrity_problems(path, settled=False) == []
    [problem] = varstore.integrity_problems(path)
    assert "header valid only" in problem
    _poke(path, slots[-1].offset + 2, bytes([0x3E]))
    assert "in deleted transition" in varstore.integrity_problems(path)[0]


def test_a_variable_running_past_the_end_and_garbage_after_the_last(kept_template: Callable[..., Path]) -> None:
    path, slots = _copy(kept_template)
    _poke(path, slots[-1].offset + 40, struct.pack("<L", 0x7FFFFFF0))  # its data size
    [problem] = varstore.integrity_problems(path)
    assert "runs past the store's end" in problem and f"{slots[-1].offset:#x}" in problem
    path, slots = _copy(kept_template)
    _poke(path, slots[-1].end + 64, b"\x00\x01")
    [problem] = varstore.integrity_problems(path)
    assert "neither a variable header nor erased flash" in problem and f"{slots[-1].end + 64:#x}" in problem


def test_no_store_at_all_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.fd"
    path.write_bytes(b"\xff" * 4096)
    with pytest.raises(VarstoreError, match="no edk2 variable store"):
        varstore.store_slots(path)


def test_bandwidth_setting_parses_suffixes_and_refuses_nonsense() -> None:
    from harness.errors import ConfigError
    from harness.scenarios.storm import parse_bandwidth

    assert parse_bandwidth(None) is None and parse_bandwidth("") is None
    assert parse_bandwidth("20M") == 20_000_000 and parse_bandwidth("1.5g") == 1_500_000_000
    assert parse_bandwidth("512k") == 512_000 and parse_bandwidth(4096) == 4096
    for bad in ("fast", "-3M", "0"):
        with pytest.raises(ConfigError, match=f"bandwidth={bad}: expected a positive number"):
            parse_bandwidth(bad)
