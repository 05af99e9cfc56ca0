"""Bisecting a scenario over an ordered list of builds.

Given builds in order (oldest first: releases, distro package revisions, source builds of
successive commits), a scenario that passes on a *good* one and fails on a *bad* one, find
the first bad build, running the scenario on as few builds as a binary search needs.

A run has three outcomes: pass, fail, or skip (the build cannot run the scenario: it lacks
the migration mode, it does not start).  Skipped builds are stepped around the way
``git bisect skip`` does; when only skipped builds separate the last good from the first
bad, the answer is the range.  The ends are verified first: a "good" build that fails (or a
"bad" one that passes) makes the bisection inconclusive instead of wrong.

The search is pure (:func:`bisect` takes any runner); :func:`scenario_runner` runs a
registered scenario from :mod:`harness.scenarios` on one build.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, HarnessError, UnsupportedError

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """What one scenario run says about one build."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Step:
    """One scenario run during a bisection."""

    build: str
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"build": self.build, "outcome": self.outcome.value, "detail": self.detail,
                "seconds": round(self.seconds, 2)}  # fmt: skip


@dataclass
class BisectResult:
    """The answer: the first bad build (or the candidates), with every run made."""

    scenario: str
    builds: list[str]
    good: str
    bad: str
    first_bad: str | None = None
    last_good: str | None = None
    candidates: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    reason: str = ""

    @property
    def conclusive(self) -> bool:
        return self.first_bad is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "builds": self.builds, "good": self.good, "bad": self.bad,
            "conclusive": self.conclusive, "first_bad": self.first_bad,
            "last_good": self.last_good, "candidates": self.candidates,
            "steps": [s.to_json() for s in self.steps], "reason": self.reason,
        }  # fmt: skip

    def summary(self) -> str:
        runs = f"{len(self.steps)} runs"
        if self.first_bad is not None:
            return (f"{self.scenario}: first bad build {self.first_bad} "
                    f"(last good {self.last_good}; {runs})")  # fmt: skip
        return f"{self.scenario}: inconclusive: {self.reason} ({runs})"


Runner = Callable[[str], "Outcome | tuple[Outcome, str]"]


def _order(builds: Sequence[str], good: str, bad: str) -> list[str]:
    """The builds from ``good`` to ``bad`` inclusive (reversed if ``bad`` comes first)."""
    listed = list(builds)
    if len(set(listed)) != len(listed):
        raise ConfigError(f"--builds lists a build twice: {listed}")
    for name, label in (("good", good), ("bad", bad)):
        if label not in listed:
            raise ConfigError(f"the {name} build {label!r} is not in --builds ({', '.join(listed)})")
    if good == bad:
        raise ConfigError(f"--good and --bad are the same build {good!r}")
    gi, bi = listed.index(good), listed.index(bad)
    return listed[gi:bi + 1] if gi < bi else listed[bi:gi + 1][::-1]


def _pick(lo: int, hi: int, skipped: set[int]) -> int | None:
    """The untested index strictly between ``lo`` and ``hi`` nearest their middle."""
    mid = (lo + hi) // 2
    for delta in range(hi - lo):
        for cand in (mid - delta, mid + delta):
            if lo < cand < hi and cand not in skipped:
                return cand
    return None


def bisect(builds: Sequence[str], good: str, bad: str, run: Runner, scenario: str = "",
           verify_ends: bool = True) -> BisectResult:  # fmt: skip
    """Find the first build between ``good`` and ``bad`` on which ``run`` fails."""
    order = _order(builds, good, bad)
    result = BisectResult(scenario, order, good, bad)

    def step(idx: int) -> Outcome:
        label = order[idx]
        t0 = time.monotonic()
        got = run(label)
        outcome, detail = got if isinstance(got, tuple) else (got, "")
        result.steps.append(Step(label, Outcome(outcome), detail, time.monotonic() - t0))
        log.info("bisect %s: %s %s %s", scenario, label, outcome.value, detail[:200])
        return Outcome(outcome)

    lo, hi = 0, len(order) - 1
    if verify_ends:
        got = step(lo)
        if got is not Outcome.PASS:
            result.reason = f"the good build {good} does not pass ({got.value})"
            return result
        got = step(hi)
        if got is not Outcome.FAIL:
            result.reason = f"the bad build {bad} does not fail ({got.value})"
            return result
    skipped: set[int] = set()
    while True:
        idx = _pick(lo, hi, skipped)
        if idx is None:
            break
        got = step(idx)
        if got is Outcome.PASS:
            lo = idx
        elif got is Outcome.FAIL:
            hi = idx
        else:
            skipped.add(idx)
    result.last_good = order[lo]
    if hi - lo == 1:
        result.first_bad = order[hi]
    else:
        result.candidates = order[lo + 1:hi + 1]
        result.reason = (f"only skipped builds between {order[lo]} and {order[hi]}: the first "
                         f"bad build is one of {', '.join(result.candidates)}")  # fmt: skip
    return result


def scenario_runner(
    name: str,
    *,
    peers: Sequence[str] = (),
    ovmf: Sequence[str] = (),
    cycles: int = 1,
    artifacts: Path | None = None,
) -> Runner:
    """A runner that runs scenario ``name`` with the build under test first in ``--qemu``.

    A record with status ``unsupported`` (or an :class:`UnsupportedError`) is a skip; any
    other failed record or harness error is a fail.
    """
    from harness import scenarios

    fn = scenarios.get(name)

    def run(label: str) -> tuple[Outcome, str]:
        opts = scenarios.ScenarioOptions(
            qemu=[label, *peers], ovmf=list(ovmf), cycles=cycles,
            artifacts=artifacts / label.replace("/", "_").replace(":", "_") if artifacts else None,
        )  # fmt: skip
        try:
            report = fn(opts)
        except UnsupportedError as exc:
            return Outcome.SKIP, str(exc)
        except HarnessError as exc:
            return Outcome.FAIL, str(exc).splitlines()[0]
        if report.ok:
            return Outcome.PASS, f"{len(report.records)} records"
        bad = [r for r in report.records if not (r.get("ok") or r.get("expected_failure"))]
        if bad and all(r.get("status") == "unsupported" for r in bad):
            return Outcome.SKIP, str(bad[0].get("error", "unsupported"))
        first = bad[0] if bad else {}
        text = str(first.get("signature") or first.get("error") or first.get("status") or "failed")
        return Outcome.FAIL, text.splitlines()[0] if text else "failed"

    return run
