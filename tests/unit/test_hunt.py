"""The hunt's loop (pure, with a fake scenario): it stops at the first failing record, keeps
that run's artifacts only, counts runs and hops, and names the command that repeats it."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.nightly import hunt
from harness.scenarios import ScenarioOptions, ScenarioReport

pytestmark = pytest.mark.unit


def fake(fail_on: int, signature: str = "varstore-file-lost-writes", expected: bool = False):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def run(opts: ScenarioOptions) -> ScenarioReport:
        calls["n"] += 1
        assert opts.artifacts is not None
        opts.artifacts.mkdir(parents=True)
        (opts.artifacts / "serial.log").write_text(f"run {calls['n']}")
        rep = ScenarioReport("storm")
        rep.records.append({"op": "live", "source": "10.0.2", "destination": "10.0.2", "ok": True})
        if calls["n"] == fail_on:
            rep.records.append({"op": "live", "source": "10.0.2", "destination": "10.0.2", "ok": False,
                                "expected_failure": expected, "signature": signature,
                                "problems": ["the varstore file x: HarnessStorm0 is missing"]})
        return rep

    return run


def test_stops_at_the_first_failure_and_keeps_only_its_artifacts(tmp_path: Path) -> None:
    opts = ScenarioOptions(qemu=["10.0.2"], extra={"arch": "aarch64", "ops": ["live", "cpr-transfer"]})
    res = hunt.hunt("storm", opts, 60, tmp_path, run=fake(3))
    assert res.runs == 3 and res.hops == 4 and res.found is not None
    assert (tmp_path / "failure" / "serial.log").read_text() == "run 3"
    assert not list(tmp_path.glob("run-*")) and (tmp_path / "hunt.json").is_file()
    assert res.repeat == "harness repro storm --qemu 10.0.2 --set arch=aarch64 --set ops=live,cpr-transfer"
    assert "found after 3 runs, 4 hops" in res.summary() and "[varstore-file-lost-writes]" in res.summary()


def test_expected_failures_end_the_hunt_only_when_their_signature_is_hunted(tmp_path: Path) -> None:
    res = hunt.hunt("storm", ScenarioOptions(), 60, tmp_path / "a", run=fake(2, expected=True), max_runs=4)
    assert res.found is None and res.runs == 4 and res.signatures_seen == {"varstore-file-lost-writes": 1}
    assert "not found in 4 runs" in res.summary()
    res = hunt.hunt("storm", ScenarioOptions(), 60, tmp_path / "b", run=fake(2, expected=True),
                    signatures=["varstore-file-lost-writes"])
    assert res.found is not None and res.runs == 2


def test_a_budget_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--budget"):
        hunt.hunt("storm", ScenarioOptions(), 0, tmp_path, run=fake(1))
