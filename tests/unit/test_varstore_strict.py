"""The varstore reader refuses what it cannot parse completely: a garbled variable header,
a variable running past the store's end, a state byte edk2 never writes, bytes after the
last header that are not erased flash.  Crafted from a really booted OVMF 2025.02 copy
(tests/unit/data/varstore), which itself must still read."""

from __future__ import annotations

import lzma
import random
import struct
from pathlib import Path

import pytest

from harness import cli
from harness.errors import VarstoreError
from harness.varstore import read_varstore, store_slots

BOOTED = Path(__file__).parent / "data" / "varstore" / "booted-2025.02-4m.fd.xz"
HEADER = struct.Struct("<HBxLQ16sLLL16s")  # edk2's authenticated variable header


@pytest.fixture
def booted(tmp_path: Path) -> Path:
    path = tmp_path / "booted_VARS.fd"
    path.write_bytes(lzma.decompress(BOOTED.read_bytes()))
    return path


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_the_real_booted_copy_reads_completely(booted: Path) -> None:
    model = read_varstore(booted)
    slots, problems = store_slots(booted)
    assert problems == [] and len(slots) >= len(model.variables) > 10


@pytest.mark.parametrize("fill", ["zeros", "random"])
def test_garbled_headers_are_refused_not_read_as_empty(booted: Path, fill: str) -> None:
    # the report's case: bytes 0x60-0x2000 of a booted 2025.02 varstore overwritten
    size = 0x2000 - 0x60
    junk = bytes(size) if fill == "zeros" else random.Random(7).randbytes(size)
    _patch(booted, 0x60, junk)
    with pytest.raises(VarstoreError) as exc:
        read_varstore(booted)
    text = str(exc.value)
    assert str(booted) in text and "not a complete edk2 variable store" in text
    assert "offset 0x" in text


def test_a_garbled_header_in_the_middle_is_refused(booted: Path) -> None:
    slots, _ = store_slots(booted)
    victim = slots[len(slots) // 2]
    _patch(booted, victim.offset, b"\x12\x34")  # its magic (0x55aa) gone
    with pytest.raises(VarstoreError, match=rf"offset {victim.offset:#x}"):
        read_varstore(booted)


def test_a_variable_running_past_the_end_is_refused(booted: Path) -> None:
    slots, _ = store_slots(booted)
    last = slots[-1]
    data_size_at = last.offset + HEADER.size - 16 - 4  # DataSize, before the GUID
    _patch(booted, data_size_at, struct.pack("<L", 0x7FFFFFF0))
    with pytest.raises(VarstoreError, match=rf"offset {last.offset:#x} .* runs past the store's end"):
        read_varstore(booted)


def test_a_state_byte_edk2_never_writes_is_refused(booted: Path) -> None:
    slots, _ = store_slots(booted)
    victim = slots[1]
    _patch(booted, victim.offset + 2, b"\x5a")
    with pytest.raises(VarstoreError, match=rf"offset {victim.offset:#x} has state byte 0x5a"):
        read_varstore(booted)


def test_cli_show_of_a_garbled_store_is_one_line_exit_2(
    booted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _patch(booted, 0x60, bytes(0x2000 - 0x60))
    assert cli.main(["varstore", "show", str(booted)]) == 2
    captured = capsys.readouterr()
    assert "variables" not in captured.out
    assert len(captured.err.strip().splitlines()) == 1 and str(booted) in captured.err
