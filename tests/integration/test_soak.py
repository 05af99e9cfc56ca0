"""``harness soak`` (issue 11): its counts come from real pieces, and a QEMU or any other
process a suite run leaves behind is found, counted, killed and fails the soak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import faults
from harness.inventory import builds

pytestmark = pytest.mark.integration

CLI = (sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())")

# a real guest per suite run, restored from its saved boot (the soak counts runs and leaks,
# it does not check the boot)
BOOTING_SUITE = '''
def test_boots(vm_factory):
    vm = vm_factory(fast=True)
    assert vm.ssh.run("cat /proc/sys/kernel/random/boot_id").rc == 0
'''

# a suite whose test starts a QEMU of its own in a new session and never reaps it
LEAKY_SUITE = '''
import os, subprocess

def test_leaves_a_qemu_behind():
    rundir = os.environ["HARNESS_RUNDIR"]
    subprocess.Popen([{binary!r}, "-machine", "none", "-nodefaults", "-display", "none", "-S",
                      "-name", "leak-in-" + rundir], env={env!r}, start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
'''


def soak(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "soak"
    proc = subprocess.run([*CLI, "soak", "--out", str(out), "--jobs", "1", "--json", *args],
                          capture_output=True, text=True, timeout=900)
    assert (out / "soak.json").is_file(), proc.stderr[-2000:]
    return proc.returncode, json.loads((out / "soak.json").read_text())


def test_soak_counts_cycles_and_suite_runs_of_real_guests(tmp_path: Path) -> None:
    suite = tmp_path / "test_booting_suite.py"
    suite.write_text(BOOTING_SUITE)
    rc, summary = soak(tmp_path, "--cycles", "2", "--op", "cpr-transfer", "--suite-runs", "1",
                       "--suite", str(suite), "--fast")  # fmt: skip
    assert rc == 0, summary
    cpr, run = summary["pieces"]
    assert cpr["piece"] == "cpr-transfer" and cpr["cycles_done"] == 2 and cpr["failures"] == 0
    assert 0 <= cpr["longest_pause_s"] < 30
    assert run["piece"] == "suite-1" and run["tests"] == 1 and run["failures"] == run["errors"] == 0
    assert summary["cycles"] == 2 and summary["failures"] == 0
    assert summary["leaked_processes"] == 0 and summary["leaked_files"] == 0


def test_a_leaked_qemu_is_counted_killed_and_fails_the_soak(tmp_path: Path) -> None:
    build = builds.get_build("10.0.2")
    suite = tmp_path / "test_leaky_suite.py"
    suite.write_text(LEAKY_SUITE.format(binary=str(build.binary), env=build.env))
    rc, summary = soak(tmp_path, "--cycles", "0", "--suite-runs", "1", "--suite", str(suite))
    assert rc == 1
    (run,) = summary["pieces"]
    assert run["tests"] == 1 and run["failures"] == 0 and run["exit_code"] == 0
    assert run["leaked_processes"] == summary["leaked_processes"] == 1
    (pid,) = run["leaks"]["processes"]
    assert faults.wait_gone([pid], timeout=10) == []  # the soak killed it
    assert not faults.find_qemu("leak-in-")


# a suite whose test leaves a plain process (not QEMU) running in a session of its own
STRAY_SUITE = '''
import subprocess, sys

def test_leaves_a_helper_behind():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
'''


def test_any_process_a_suite_run_leaves_is_a_leak(tmp_path: Path) -> None:
    suite = tmp_path / "test_stray_suite.py"
    suite.write_text(STRAY_SUITE)
    rc, summary = soak(tmp_path, "--cycles", "0", "--suite-runs", "1", "--suite", str(suite))
    assert rc == 1, summary
    (run,) = summary["pieces"]
    assert run["tests"] == 1 and run["failures"] == 0 and run["exit_code"] == 0
    assert run["leaked_processes"] == 1, run["leaks"]
    (pid,) = run["leaks"]["processes"]
    assert "time.sleep(600)" in run["leaks"]["commands"][0]
    assert faults.wait_gone([pid], timeout=10) == []  # the soak killed it


def test_soak_refuses_nothing_to_do(tmp_path: Path) -> None:
    proc = subprocess.run([*CLI, "soak", "--cycles", "0", "--suite-runs", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--suite-runs" in proc.stderr and "Traceback" not in proc.stderr
