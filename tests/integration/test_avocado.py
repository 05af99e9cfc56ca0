"""The avocado wrappers run under ``avocado run`` and produce avocado's own results.

One cheap scenario (cpr-reboot, 1 cycle on 10.0.2, its guest restored from a saved boot) must come out PASS in avocado's
``results.json``; the same test pointed at a build that does not exist must not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
AVOCADO = Path(sys.executable).parent / "avocado"
TEST = REPO / "tests/avocado/test_scenarios.py"


def run_avocado(ref: str, results: Path, *params: str, timeout: float = 900) -> dict[str, Any]:
    """``avocado run REF -p ...`` with its results under ``results``; its results.json."""
    if not AVOCADO.exists():
        pytest.skip(f"{AVOCADO} missing (pip install '.[avocado]')")
    cmd = [str(AVOCADO), "run", f"{TEST}:{ref}", "--job-results-dir", str(results),
           "--max-parallel-tasks", "1"]  # fmt: skip
    for p in params:
        cmd += ["-p", p]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=dict(os.environ))  # fmt: skip
    found = sorted(results.glob("job-*/results.json"))
    assert found, f"avocado wrote no results.json (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    data: dict[str, Any] = json.loads(found[-1].read_text())
    data["_exit"] = proc.returncode
    data["_output"] = proc.stdout + proc.stderr
    return data


def test_cpr_reboot_passes_under_avocado(tmp_path: Path) -> None:
    # the guest restored from a saved boot: what is checked is avocado's run, not a boot
    data = run_avocado("Scenarios.test_cpr_reboot", tmp_path, "qemu=10.0.2", "cycles=1", "fast=1")
    [test] = data["tests"]
    assert test["status"] == "PASS", f"{test.get('fail_reason')}\n{data['_output'][-2000:]}"
    assert test["id"].endswith("Scenarios.test_cpr_reboot")
    assert data["pass"] == 1 and data["failures"] == 0 and data["errors"] == 0
    assert data["_exit"] == 0
    # the scenario's records are in the test's whiteboard, as the library produced them
    logdir = Path(test["logdir"])
    report = json.loads((logdir / "whiteboard").read_text())
    assert report["scenario"] == "cpr-reboot" and report["ok"] is True
    assert [r["ok"] for r in report["records"]] == [True]
    assert (logdir / "debug.log").is_file()


def test_a_failing_scenario_is_not_pass_under_avocado(tmp_path: Path) -> None:
    data = run_avocado("Scenarios.test_cpr_reboot", tmp_path, "qemu=9.9.9", "cycles=1",
                       timeout=300)  # fmt: skip
    [test] = data["tests"]
    assert test["status"] in ("FAIL", "ERROR"), test
    assert "9.9.9" in (test.get("fail_reason") or ""), test
    assert data["pass"] == 0 and data["_exit"] != 0
