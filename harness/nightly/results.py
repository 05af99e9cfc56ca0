"""The nightly record schema: one :class:`RunRecord` per scenario run (one test item).

A results directory (``results/<timestamp>/``) holds:

- ``matrix.json``: the matrix this run was asked to cover (:mod:`harness.nightly.runner`);
- ``records/<worker>.jsonl``: what each pytest worker wrote as its scenario tests finished;
- ``junit.xml``: pytest's own view of every test item;
- ``results.json``: the joined view (:func:`harness.nightly.report.build_results`), schema below;
- ``report.html``: the page people read in the morning;
- ``artifacts/<test>/``: logs, QMP transcripts and varstores of failed runs.

``results.json``::

    {"schema": 1,
     "run": {"id", "started", "finished", "duration_s", "host", "argv", "jobs", "shard",
             "cycles", "qemu": [...], "ovmf": [...], "pytest_rc", "matrix": [entry ids],
             "selected": [entry ids], "not_applicable": [...], "merged_from": [...]},
     "summary": {"passed": n, "failed": n, "error": n, "xfailed": n, "skipped": n, "total": n},
     "records": [RunRecord.to_json(), ...],
     "comparison": {...} | null}

A record's ``steps`` are the scenario library's own records (one per cycle or hop:
``MigrationResult.to_json()`` plus scenario fields such as ``expected_failure``); the
record's ``downtime_ms``/``pause_s`` are the worst step's, so a table row shows the outlier.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from harness.errors import ConfigError
from harness.terms import Outcome

SCHEMA = 1
OUTCOMES: tuple[Outcome, ...] = tuple(Outcome)
# outcomes that make a nightly run fail; "xfailed" (expected failures from data) does not
FAILING = frozenset({Outcome.FAILED, Outcome.ERROR})


@dataclass
class RunRecord:
    """One scenario run: which builds, what happened, how long, where the logs are."""

    id: str  # pytest node id
    scenario: str  # report group: "live", "cross-version", "boot-order", ...
    outcome: Outcome  # text from a record is checked into the closed set (__post_init__)
    kind: str = "scenario"  # matrix runner: scenario | boot | pytest | inject
    entry: str | None = None  # matrix entry id
    qemu: list[str] = field(default_factory=list)  # builds involved, source first
    ovmf: list[str] = field(default_factory=list)
    source: str | None = None
    destination: str | None = None
    firmware: str | None = None
    machine: str | None = None
    started: float | None = None
    duration_s: float = 0.0
    boot_s: float | None = None
    downtime_ms: float | None = None  # worst step
    pause_s: float | None = None  # worst step
    signature: str | None = None  # first failing step's
    error: str | None = None  # first line of the first failure
    message: str | None = None  # pytest's failure/skip message
    artifacts: str | None = None  # relative to the results directory
    expected_failures: int = 0
    worker: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.outcome = Outcome(self.outcome)

    @property
    def failing(self) -> bool:
        return self.outcome in FAILING

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """A record from JSON; unknown keys are ignored (newer writers), missing required
        ones or an unknown outcome raise :class:`ConfigError` naming the record."""
        for key in ("id", "scenario", "outcome"):
            if not isinstance(data.get(key), str):
                raise ConfigError(f"result record {data.get('id', '?')!r}: missing or non-string field {key!r}")
        if data["outcome"] not in OUTCOMES:
            raise ConfigError(f"result record {data['id']!r}: outcome {data['outcome']!r} is not one of "
                              f"{', '.join(OUTCOMES)}")  # fmt: skip
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def summarize_steps(record: RunRecord, steps: Sequence[Mapping[str, Any]]) -> RunRecord:
    """Fill the record's builds, machine, worst downtime/pause and first failure from the
    scenario's per-cycle/hop ``steps``."""
    record.steps = [dict(s) for s in steps]
    downs = [float(s["downtime_ms"]) for s in steps if isinstance(s.get("downtime_ms"), int | float)]
    pauses = [float(s["pause_s"]) for s in steps if isinstance(s.get("pause_s"), int | float)]
    record.downtime_ms = max(downs) if downs else record.downtime_ms
    record.pause_s = max(pauses) if pauses else record.pause_s
    record.expected_failures = sum(1 for s in steps if s.get("expected_failure"))
    builds: list[str] = list(record.qemu)
    for s in steps:
        for key in ("source", "destination"):
            v = s.get(key)
            if isinstance(v, str) and v and v not in builds:
                builds.append(v)
    record.qemu = builds
    if steps:
        first = steps[0]
        record.source = record.source or _str(first.get("source"))
        record.destination = record.destination or _str(first.get("destination"))
        record.machine = record.machine or _str(first.get("machine"))
        record.firmware = record.firmware or _str(first.get("firmware"))
    for s in steps:
        if not s.get("ok") and not s.get("expected_failure"):
            record.signature = record.signature or _str(s.get("signature"))
            record.error = record.error or first_line(step_error(s))
            break
    return record


def step_error(step: Mapping[str, Any]) -> str:
    """A failed step's error text: its error, else its problems, else its status."""
    err = str(step.get("error") or "").strip()
    if err:
        return err
    problems = step.get("problems") or []
    if problems:
        return "; ".join(str(p) for p in problems)
    return str(step.get("status") or "failed")


def first_line(text: str | None, limit: int = 300) -> str | None:
    if not text:
        return None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:limit] if lines else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


# --- test ids --------------------------------------------------------------------------------

_PARAM_QEMU = re.compile(r"(?:^|[-\[])qemu(\d+(?:\.\d+)+)")
_PARAM_OVMF = re.compile(r"(?:^|[-\[])ovmf(\d{4}\.\d+)")


def junit_key(nodeid: str) -> str:
    """The key pytest's JUnit XML gives a test: ``classname::name`` (``tests/a/test_b.py::
    C::test_d[x]`` -> ``tests.a.test_b.C::test_d[x]``)."""
    parts = nodeid.split("::")
    path = parts[0]
    if path.endswith(".py"):
        path = path[:-3]
    classname = ".".join([path.replace("/", "."), *parts[1:-1]])
    return f"{classname}::{parts[-1]}"


def nodeid_from_junit(classname: str, name: str) -> str:
    """The node id back from JUnit's ``classname``/``name`` (exact for module-level tests)."""
    return f"{classname.replace('.', '/')}.py::{name}"


def builds_from_id(nodeid: str) -> tuple[list[str], list[str]]:
    """QEMU and OVMF versions named in a test id's parameters (the plugin's ``qemu10.0.2`` /
    ``ovmf2022.11`` ids), for tests that wrote no record of their own."""
    params = nodeid.partition("[")[2]
    return _PARAM_QEMU.findall("[" + params), _PARAM_OVMF.findall("[" + params)


def count(records: Iterable[RunRecord]) -> dict[str, int]:
    out: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
    n = 0
    for r in records:
        out[r.outcome] = out.get(r.outcome, 0) + 1
        n += 1
    out["total"] = n
    return out
