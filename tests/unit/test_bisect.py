"""Bisection over ordered builds with a fake scenario runner (pure logic)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import scenarios
from harness.errors import ConfigError, UnsupportedError
from harness.nightly import bisect as bisect_mod
from harness.nightly.bisect import Outcome, bisect

pytestmark = pytest.mark.unit

BUILDS = [f"b{i}" for i in range(10)]


def fake(first_bad: int, skip: frozenset[int] = frozenset(),
         calls: list[str] | None = None) -> Callable[[str], Outcome]:  # fmt: skip
    def run(label: str) -> Outcome:
        if calls is not None:
            calls.append(label)
        i = int(label[1:])
        if i in skip:
            return Outcome.SKIP
        return Outcome.FAIL if i >= first_bad else Outcome.PASS

    return run


@pytest.mark.parametrize("first_bad", range(1, 10))
def test_finds_first_bad(first_bad: int) -> None:
    calls: list[str] = []
    res = bisect(BUILDS, "b0", "b9", fake(first_bad, calls=calls), scenario="x")
    assert res.conclusive
    assert res.first_bad == f"b{first_bad}"
    assert res.last_good == f"b{first_bad - 1}"
    # binary search: the two ends plus at most ceil(log2(8)) + 1 middles
    assert len(calls) <= 2 + 4
    assert [s.build for s in res.steps] == calls


def test_ends_verified_good_fails() -> None:
    res = bisect(BUILDS, "b0", "b9", fake(0))
    assert not res.conclusive
    assert res.first_bad is None
    assert "good build b0 does not pass" in res.reason
    assert "inconclusive" in res.summary()


def test_ends_verified_bad_passes() -> None:
    res = bisect(BUILDS, "b0", "b9", fake(100))
    assert not res.conclusive
    assert "bad build b9 does not fail" in res.reason


def test_unverified_ends_are_trusted() -> None:
    calls: list[str] = []
    res = bisect(BUILDS, "b0", "b9", fake(4, calls=calls), verify_ends=False)
    assert res.first_bad == "b4"
    assert "b0" not in calls and "b9" not in calls


def test_sub_range_only() -> None:
    calls: list[str] = []
    res = bisect(BUILDS, "b2", "b6", fake(5, calls=calls))
    assert res.builds == ["b2", "b3", "b4", "b5", "b6"]
    assert res.first_bad == "b5"
    assert set(calls) <= {"b2", "b3", "b4", "b5", "b6"}


def test_reversed_order_finds_first_bad_from_good_side() -> None:
    # good listed after bad: search from good towards bad (e.g. which build broke a rollback)
    def run(label: str) -> Outcome:
        return Outcome.PASS if int(label[1:]) >= 6 else Outcome.FAIL

    res = bisect(BUILDS, "b9", "b0", run)
    assert res.first_bad == "b5"
    assert res.last_good == "b6"


def test_skips_are_stepped_around() -> None:
    # b4 (the first middle tried) cannot run the scenario; its neighbours decide
    res = bisect(BUILDS, "b0", "b9", fake(6, skip=frozenset({4, 7})))
    assert res.first_bad == "b6"
    assert res.last_good == "b5"
    assert [s.build for s in res.steps if s.outcome is Outcome.SKIP] == ["b4"]


def test_skip_next_to_the_boundary_is_ambiguous() -> None:
    # b3 passes, b4 cannot run, b5 fails: b4 or b5 may be the first bad one
    res = bisect(BUILDS, "b0", "b9", fake(5, skip=frozenset({4})))
    assert not res.conclusive
    assert res.candidates == ["b4", "b5"]


def test_only_skipped_builds_between_gives_candidates() -> None:
    res = bisect(BUILDS, "b0", "b9", fake(5, skip=frozenset({4, 5, 6})))
    assert not res.conclusive
    assert res.last_good == "b3"
    assert res.candidates == ["b4", "b5", "b6", "b7"]
    assert "one of b4, b5, b6, b7" in res.reason


def test_adjacent_good_bad() -> None:
    res = bisect(["a", "b"], "a", "b", lambda lbl: Outcome.PASS if lbl == "a" else Outcome.FAIL)
    assert res.first_bad == "b" and len(res.steps) == 2


@pytest.mark.parametrize(
    ("builds", "good", "bad", "msg"),
    [
        (BUILDS, "x", "b9", "good build 'x' is not in --builds"),
        (BUILDS, "b0", "y", "bad build 'y' is not in --builds"),
        (BUILDS, "b3", "b3", "same build"),
        (["a", "a", "b"], "a", "b", "twice"),
    ],
)
def test_bad_input(builds: list[str], good: str, bad: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        bisect(builds, good, bad, fake(1))


@given(n=st.integers(2, 40), data=st.data())
def test_property_first_bad_found(n: int, data: st.DataObject) -> None:
    builds = [f"b{i}" for i in range(n)]
    first_bad = data.draw(st.integers(1, n - 1))
    res = bisect(builds, "b0", f"b{n - 1}", fake(first_bad))
    assert res.first_bad == f"b{first_bad}"
    assert len(res.steps) <= 2 + (n - 1).bit_length() + 1


def test_tuple_outcome_detail_is_recorded() -> None:
    res = bisect(["a", "b"], "a", "b",
                 lambda lbl: (Outcome.PASS, "fine") if lbl == "a" else (Outcome.FAIL, "footer -5"))  # fmt: skip
    assert [s.detail for s in res.steps] == ["fine", "footer -5"]
    assert res.to_json()["steps"][1] == {"build": "b", "outcome": "fail", "detail": "footer -5",
                                         "seconds": res.to_json()["steps"][1]["seconds"]}  # fmt: skip


# --- scenario_runner maps scenario reports to outcomes ------------------------------------


@pytest.fixture
def fake_scenario(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, object]]]:
    """Register a scenario whose records per build come from a dict the test fills."""
    table: dict[str, list[dict[str, object]]] = {}
    seen: list[scenarios.ScenarioOptions] = []

    def fn(opts: scenarios.ScenarioOptions) -> scenarios.ScenarioReport:
        seen.append(opts)
        label = opts.qemu[0]
        if label == "raise-unsupported":
            raise UnsupportedError("migration mode cpr-transfer", "QEMU x")
        rep = scenarios.ScenarioReport("fake-bisect")
        for rec in table.get(label, []):
            rep.add(dict(rec))
        return rep

    scenarios._load()
    monkeypatch.setitem(scenarios._REGISTRY, "fake-bisect", fn)
    monkeypatch.setitem(scenarios._HELP, "fake-bisect", "test only")
    table["_seen"] = seen  # type: ignore[assignment]
    return table


def test_scenario_runner_outcomes(fake_scenario: dict[str, list[dict[str, object]]]) -> None:
    fake_scenario["good"] = [{"ok": True}, {"ok": True}]
    fake_scenario["xfail"] = [{"ok": False, "expected_failure": True}]
    fake_scenario["bad"] = [{"ok": True}, {"ok": False, "signature": "section-footer-eio",
                                          "error": "load failed"}]  # fmt: skip
    fake_scenario["unsupported"] = [{"ok": False, "status": "unsupported", "error": "lacks cpr"}]
    fake_scenario["empty"] = []
    run = bisect_mod.scenario_runner("fake-bisect", peers=["10.0.2"], cycles=3)
    assert run("good") == (Outcome.PASS, "2 records")
    assert run("xfail")[0] is Outcome.PASS
    assert run("bad") == (Outcome.FAIL, "section-footer-eio")
    assert run("unsupported") == (Outcome.SKIP, "lacks cpr")
    assert run("raise-unsupported")[0] is Outcome.SKIP
    assert run("empty")[0] is Outcome.FAIL  # a scenario with no records did not pass
    seen = fake_scenario["_seen"]
    assert seen[0].qemu == ["good", "10.0.2"] and seen[0].cycles == 3  # type: ignore[attr-defined]


def test_bisect_with_scenario_runner(fake_scenario: dict[str, list[dict[str, object]]]) -> None:
    order = ["r1", "r2", "r3", "r4", "r5"]
    for i, label in enumerate(order):
        fake_scenario[label] = [{"ok": i < 3, "signature": None if i < 3 else "footer"}]
    res = bisect(order, "r1", "r5", bisect_mod.scenario_runner("fake-bisect"), scenario="fake-bisect")
    assert res.first_bad == "r4"
    assert res.summary().startswith("fake-bisect: first bad build r4")


def test_unknown_scenario() -> None:
    with pytest.raises(ConfigError, match="unknown scenario"):
        bisect_mod.scenario_runner("no-such-scenario")
