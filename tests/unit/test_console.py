"""Console waits on a log file: matches, timeouts that say what was seen, hostile output."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from harness.errors import ConsoleSilent, GuestTimeout, MachineError
from harness.guest.console import MAX_LINE, Console, clean


def test_wait_finds_text_written_later(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"booting\n")
    c = Console(log)

    def later() -> None:
        time.sleep(0.2)
        with log.open("ab") as fh:
            fh.write(b'\x1b[0mHARNESS-READY {"boot_id": "x"}\r\n')

    threading.Thread(target=later).start()
    m = c.wait_for(r"HARNESS-READY (\{.*\})", timeout=5)
    assert m.group(1) == '{"boot_id": "x"}'


def test_timeout_names_what_and_last_output(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("kernel panic - not syncing\n")
    with pytest.raises(GuestTimeout) as err:
        Console(log).wait_for("READY", timeout=0.3, what="the ready line")
    assert "the ready line" in str(err.value)
    assert "kernel panic" in str(err.value)


def test_dead_qemu_stops_the_wait_early(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("partial")
    t0 = time.monotonic()
    with pytest.raises(MachineError, match="QEMU exited"):
        Console(log, alive=lambda: False).wait_for("READY", timeout=30)
    assert time.monotonic() - t0 < 5


def test_a_silent_console_gives_up_at_the_silence_limit(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("output of the previous boot\n")
    c = Console(log, alive=lambda: True)
    c.mark()
    t0 = time.monotonic()
    with pytest.raises(ConsoleSilent) as err:
        c.wait_for("READY", timeout=30, silence=0.3, what="the ready line")
    assert time.monotonic() - t0 < 5
    assert "no output at all" in str(err.value) and "the ready line" in str(err.value)
    assert str(log) in str(err.value) and isinstance(err.value, GuestTimeout)


def test_any_output_lifts_the_silence_limit(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("")

    def later() -> None:
        time.sleep(0.1)
        with log.open("ab") as fh:
            fh.write(b"BdsDxe: loading Boot0001\n")

    threading.Thread(target=later).start()
    with pytest.raises(GuestTimeout) as err:
        Console(log, alive=lambda: True).wait_for("READY", timeout=0.8, silence=0.4)
    assert not isinstance(err.value, ConsoleSilent) and "timed out after 0.8s" in str(err.value)


def test_mark_skips_old_output(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text("READY old\n")
    c = Console(log)
    c.mark()
    with pytest.raises(GuestTimeout):
        c.wait_for("READY", timeout=0.2)


def test_garbage_and_huge_lines_are_handled(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"\xff\xfe\x00garbage" + b"A" * (MAX_LINE * 3) + b"\nend\n")
    c = Console(log)
    assert c.wait_for("end", timeout=1)
    assert "\x00" not in c.read_log()
    assert clean("a\x1b[31mred\x1b[0m\r\n") == "ared\n"
