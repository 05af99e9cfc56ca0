"""`harness throttle` on this machine's real CPU controller: a CPU-bound command gets the
share it was given, sees it, its exit code comes back, and nothing of it (its group, a
stray child) is left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import HostError
from harness.guest import cpu_share

pytestmark = pytest.mark.integration

try:
    CONTROLLER = cpu_share.find_controller()
    MISSING = ""
except HostError as e:
    CONTROLLER, MISSING = None, str(e)

needs_controller = pytest.mark.skipif(CONTROLLER is None, reason=f"capability missing: {MISSING}")
HARNESS = [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())"]


def _groups() -> set[str]:
    assert CONTROLLER is not None
    return {p.name for p in CONTROLLER.root.glob(f"{cpu_share.PREFIX}*")}


@needs_controller
def test_a_busy_command_gets_its_share_and_sees_it(tmp_path: Path) -> None:
    before = _groups()
    out = tmp_path / "summary.json"
    spin = ("import time, sys\nfrom harness.guest import cpu_share\n"
            "print(cpu_share.current_share(), flush=True)\n"
            "t = time.monotonic()\nwhile time.monotonic() - t < 3: pass\nsys.exit(3)\n")  # fmt: skip
    proc = subprocess.run([*HARNESS, "throttle", "--cpu-share", "0.25", "--out", str(out), "--",
                           sys.executable, "-c", spin], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 3, proc.stderr  # the command's own exit code
    assert float(proc.stdout.split()[0]) == pytest.approx(0.25)
    summary = json.loads(out.read_text())
    # 3 s of wall on a quarter of the machine's CPUs: at most that much CPU time (one
    # period of slack), and the quota held the command back
    allowed = 0.25 * summary["cpus"] * summary["wall_s"]
    assert summary["cpu_s"] <= allowed + 0.2, summary
    assert summary["throttled_periods"] > 0, summary
    assert "exit 3" in proc.stderr and "share of 0.25" in proc.stderr
    assert _groups() == before


@needs_controller
def test_strays_are_killed_and_the_group_removed() -> None:
    before = _groups()
    # the command leaves a child behind in the group; closing the group kills it
    proc = subprocess.run([*HARNESS, "throttle", "--cpu-share", "0.5", "--", "/bin/sh", "-c",
                           "sleep 300 & echo $!"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stray = int(proc.stdout.split()[0])
    assert not Path(f"/proc/{stray}").exists() or "zombie" in Path(f"/proc/{stray}/status").read_text()
    assert _groups() == before


def test_no_command_is_a_usage_error() -> None:
    proc = subprocess.run([*HARNESS, "throttle", "--cpu-share", "0.5"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no command given" in proc.stderr
    proc = subprocess.run([*HARNESS, "throttle", "--cpu-share", "2", "--", "true"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "expected a fraction" in proc.stderr
