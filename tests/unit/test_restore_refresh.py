"""The identity refresh a restored guest gets on its console (agent protocol 2): what is
typed, and how the answer is judged.  The guest's side is booted in
tests/integration/test_fast_start.py."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from harness import snapshots
from harness.errors import MachineError
from harness.guest.console import Console


class FakeMachine:
    def __init__(self, log: Path) -> None:
        self.console = Console(log)
        self.typed: list[str] = []
        self.console.write = self.typed.append  # type: ignore[method-assign,assignment]


@pytest.fixture
def machine(tmp_path: Path) -> Any:
    log = tmp_path / "serial.log"
    log.write_text("HARNESS-READY {}\n")
    return FakeMachine(log)


def test_the_refresh_line_carries_the_clock_random_bytes_and_a_nonce(machine: Any) -> None:
    nonce = snapshots.request_refresh(machine)
    (line,) = machine.typed
    m = re.fullmatch(r"harness-refresh (\d+) ([A-Za-z0-9_-]{32}) ([0-9a-f]{8})\n", line)  # 24 bytes
    assert m, line
    assert abs(int(m.group(1)) - time.time()) < 5 and m.group(3) == nonce
    assert snapshots.request_refresh(machine) != nonce  # fresh bytes and nonce each time
    assert machine.typed[0].split()[2] != machine.typed[1].split()[2]


def test_only_this_refreshs_answer_counts(machine: Any) -> None:
    nonce = snapshots.request_refresh(machine)
    with machine.console.log_path.open("a") as fh:
        fh.write("HARNESS-REFRESHED 0000000000000000\n")  # an earlier restore's
        fh.write(f"HARNESS-REFRESHED {nonce}0\n")  # one that begins with this nonce
    with pytest.raises(MachineError, match="identity refresh"):
        snapshots.await_refresh(machine, nonce, timeout=0.2)
    with machine.console.log_path.open("a") as fh:
        fh.write(f"HARNESS-REFRESHED {nonce}\n")
    snapshots.await_refresh(machine, nonce, timeout=1)


def test_a_guest_that_could_not_refresh_fails_the_restore(machine: Any) -> None:
    nonce = snapshots.request_refresh(machine)
    with machine.console.log_path.open("a") as fh:
        fh.write(f"HARNESS-REFRESH-FAILED {nonce}\n")
    with pytest.raises(MachineError, match="could not set its clock"):
        snapshots.await_refresh(machine, nonce, timeout=1)


class FakeQmp:
    """``info jit`` answers from a list of translated-block counts (the last repeats)."""

    def __init__(self, counts: list[int] | None, params: tuple[str, ...] = ("announce-rounds",)) -> None:
        self.counts = counts
        self.asked = 0
        self.spec = type("Spec", (), {"name": "fake", "extra_args": ()})()
        caps = type("Caps", (), {"migration_parameters": params})()
        self.build = type("Build", (), {"capabilities": caps})()

    def qmp(self, cmd: str, **args: Any) -> str:
        assert cmd == "human-monitor-command" and args == {"command-line": "info jit"}
        self.asked += 1
        if self.counts is None:
            return "JIT information is only available with accel=tcg\r\n"
        n = self.counts[min(self.asked - 1, len(self.counts) - 1)]
        return f"Translation buffer state:\r\ngen code size       1/2\r\nTB count            {n}\r\n"


def test_a_guest_is_quiet_once_it_translates_nothing_new() -> None:
    m = FakeQmp([100, 250, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400, 400])
    t0 = time.monotonic()
    assert snapshots.await_quiet(m, still_s=0.05, timeout=5) is True  # type: ignore[arg-type]
    assert m.asked >= 4 and time.monotonic() - t0 < 2


def test_a_guest_that_keeps_running_new_code_is_saved_anyway_and_says_so(caplog: Any) -> None:
    m = FakeQmp(list(range(1000)))
    assert snapshots.await_quiet(m, still_s=0.05, timeout=0.2) is False  # type: ignore[arg-type]
    assert "still ran new code" in caplog.text


def test_without_a_translator_there_is_nothing_to_wait_for() -> None:
    m = FakeQmp(None)
    assert snapshots.await_quiet(m) is True  # type: ignore[arg-type]
    assert m.asked == 1


def test_a_restore_announces_once_only_on_the_harness_network() -> None:
    m = FakeQmp(None)
    assert snapshots.restore_params(m) == {"announce-rounds": 1}  # type: ignore[arg-type]
    m.spec.extra_args = ("-netdev", "tap,id=t0")
    assert snapshots.restore_params(m) == {}  # type: ignore[arg-type]
    old = FakeQmp(None, params=())  # a build without the parameter
    assert snapshots.restore_params(old) == {}  # type: ignore[arg-type]
