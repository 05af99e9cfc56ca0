"""The nightly matrix, one thin test per entry (scenario x build, x pair): run it through
the scenario library, attach its records for the report, fail on an unexpected failure,
xfail when every failure was an expected one (from data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.nightly import runner as nightly


def test_scenario(entry: nightly.Entry | None, nightly_record: object,
                  entry_artifacts: Path | None) -> None:
    if entry is None:
        pytest.skip(f"runs the nightly matrix: use `harness nightly` (it sets {nightly.MATRIX_ENV})")
    outcome = nightly.run_entry(entry, artifacts=entry_artifacts)
    nightly_record.attach(outcome)  # type: ignore[attr-defined]
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    if not outcome.ok:
        pytest.fail(outcome.failure_text(), pytrace=False)
    if outcome.expected_failures:
        pytest.xfail(f"{outcome.expected_failures} expected failure(s) from data; no unexpected one")
