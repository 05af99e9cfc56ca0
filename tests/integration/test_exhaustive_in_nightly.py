"""Every test `make test` deselects as ``exhaustive`` is run by the nightly: its node id is
named by a row of the default matrix (the "exhaustive" pytest row, or for a cross-version
pair the matrix's own row of that pair), so a variant moved out of the suite is never
dropped on the way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.nightly import runner

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PAIR_TEST = "tests/integration/test_cross_version.py::test_pair"


def _collected(marker_expr: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", marker_expr, "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode in (0, 5), proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line.strip() for line in proc.stdout.splitlines() if "::" in line]


def test_every_exhaustive_test_has_a_nightly_row() -> None:
    exhaustive = _collected("exhaustive")
    assert exhaustive, "no test is marked exhaustive: the marker or the collection is broken"
    rows = [t for k in runner.DEFAULT_KINDS if k.runner == "pytest" for t in k.tests]
    # a cross-version pair A-to-B is the nightly's own row cross-version-qemuA-to-qemuB
    # (the default matrix: neighbours in version order and pairs with the newest)
    matrix = runner.plan(runner.NightlyOptions(rotation=1))
    pairs = {f"{PAIR_TEST}[{a}-to-{b}]" for e in matrix.entries if e.part == "pairs" for a, b in [e.qemu]}
    orphans = [n for n in exhaustive if n not in pairs
               and not any(n == r or n.startswith((r + "::", r + "[")) for r in rows)]  # fmt: skip
    assert orphans == [], f"marked exhaustive but run by no nightly row: {orphans}"
    assert any(n.startswith(PAIR_TEST) for n in exhaustive), "no cross-version pair is exhaustive: this check is stale"
