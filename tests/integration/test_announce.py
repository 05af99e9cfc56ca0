"""The announce-timer-freed finding, on real guests: with announce-rounds 0 for a load, the
guest's next reset kills QEMU (an expected incompatibility with its signature); with one
round - what the harness's restores use - the guest reboots and SSH answers again."""

from __future__ import annotations

from pathlib import Path

from harness.scenarios import ScenarioOptions
from harness.scenarios.announce import run_announce_reset


def test_a_reset_after_a_load_without_announce_kills_qemu_and_one_round_does_not(tmp_path: Path) -> None:
    crashed = run_announce_reset(ScenarioOptions(workdir=tmp_path / "r0", artifacts=tmp_path / "a0"))
    (rec,) = crashed.records
    assert rec["signature"] == "announce-timer-freed", rec
    assert rec["expected_failure"] is True and rec["expected_signature"] == "announce-timer-freed", rec
    assert "signal 11" in rec["error"]
    once = run_announce_reset(ScenarioOptions(workdir=tmp_path / "r1", artifacts=tmp_path / "a1",
                                              extra={"rounds": "1"}))  # fmt: skip
    (rec,) = once.records
    assert rec["ok"] is True and rec["status"] == "completed" and not rec["problems"], rec
