"""Wiring of the nightly matrix into pytest: one ``test_scenario`` item per selected entry
of ``$HARNESS_NIGHTLY_MATRIX`` (written by ``harness nightly``), and a ``nightly_record``
fixture that appends each item's :class:`harness.nightly.results.RunRecord` to
``records/<worker>.jsonl`` beside the matrix, with pytest's own outcome."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from harness.factory import safe_name
from harness.nightly import runner as nightly
from harness.nightly.results import RunRecord, summarize_steps
from harness.terms import Outcome

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def _matrix(config: pytest.Config) -> tuple[nightly.Matrix, Path] | None:
    path = os.environ.get(nightly.MATRIX_ENV)
    if not path:
        return None
    p = Path(path)
    return nightly.Matrix.load(p), p.parent


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "entry" not in metafunc.fixturenames:
        return
    loaded = _matrix(metafunc.config)
    if loaded is None:
        metafunc.parametrize("entry", [None], ids=["no-matrix"])
        return
    chosen = loaded[0].chosen()
    scenario_entries = [e for e in chosen if e.runner != "pytest"]
    metafunc.parametrize("entry", scenario_entries, ids=[e.id for e in scenario_entries])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # a matrix with no scenario entries (a shard of pytest rows only): drop the empty item
    drop = [i for i in items if "[entry" in i.nodeid and i.nodeid.endswith("NOTSET]")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = [i for i in items if i not in drop]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep: pytest.TestReport = yield
    item.stash.setdefault(_REPORTS, {})[rep.when] = rep
    return rep


def outcome_of(reports: dict[str, pytest.TestReport]) -> tuple[str, str | None]:
    """pytest's outcome of setup + call as a results outcome, with its message."""
    setup, call = reports.get("setup"), reports.get("call")
    for rep, failed_as in ((setup, "error"), (call, "failed")):
        if rep is None:
            continue
        if rep.failed:
            return failed_as, rep.longreprtext.strip().splitlines()[-1] if rep.longreprtext else None
        if rep.skipped:
            if hasattr(rep, "wasxfail"):
                return "xfailed", str(rep.wasxfail)
            lr = rep.longrepr
            msg = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
            return "skipped", msg.removeprefix("Skipped: ")
    if call is not None and hasattr(call, "wasxfail"):
        return "passed", None  # xpass (non-strict)
    return ("passed", None) if call is not None else ("error", "the test did not run")


class RecordSink:
    """What a scenario test attaches; written as one JSONL line when the test is done."""

    def __init__(self) -> None:
        self.outcome: nightly.EntryOutcome | None = None

    def attach(self, outcome: nightly.EntryOutcome) -> None:
        self.outcome = outcome


@pytest.fixture
def nightly_record(request: pytest.FixtureRequest, entry: nightly.Entry | None) -> Iterator[RecordSink]:
    sink = RecordSink()
    started = time.time()
    t0 = time.monotonic()
    yield sink
    loaded = _matrix(request.config)
    if loaded is None or entry is None:
        return
    results_dir = loaded[1]
    outcome, message = outcome_of(request.node.stash.get(_REPORTS, {}))
    worker = str(getattr(request.config, "workerinput", {}).get("workerid", "main"))
    rec = RunRecord(id=request.node.nodeid, scenario=entry.scenario, outcome=Outcome(outcome),
                    kind=entry.runner, entry=entry.id, qemu=list(entry.qemu), ovmf=list(entry.ovmf),
                    firmware=entry.ovmf[0] if entry.ovmf else None, started=started,
                    duration_s=round(time.monotonic() - t0, 2), message=message, worker=worker)  # fmt: skip
    if sink.outcome is not None:
        rep = sink.outcome.report
        summarize_steps(rec, rep.records)
        rec.notes = list(rep.notes)
        if rep.artifacts:
            rec.artifacts = os.path.relpath(rep.artifacts, results_dir)
        boots = [s.get("boot_s") for s in rep.records if isinstance(s.get("boot_s"), int | float)]
        rec.boot_s = boots[0] if boots else None
    line = json.dumps(rec.to_json(), default=str)
    path = results_dir / nightly.RECORDS_DIR / f"{safe_name(worker)}.jsonl"
    with path.open("a") as fh:  # one worker per file; one line per record
        fh.write(line + "\n")


@pytest.fixture
def entry_artifacts(request: pytest.FixtureRequest) -> Path | None:
    """Where this entry keeps artifacts when it fails (inside the results directory)."""
    loaded = _matrix(request.config)
    if loaded is None:
        return None
    return loaded[1] / nightly.ARTIFACTS_DIR / safe_name(request.node.name)


