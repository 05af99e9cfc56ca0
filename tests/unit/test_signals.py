"""Signal dispositions the orphan tests rely on (real child processes, no guests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import faults

SLEEP = [sys.executable, "-c", "import time; time.sleep(30)"]


def _ignoring_sigint() -> None:  # as bash does to a background job without job control
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_ignored_sigint_is_seen_in_the_childs_mask() -> None:
    with subprocess.Popen(SLEEP, preexec_fn=_ignoring_sigint) as proc:  # noqa: PLW1509
        try:
            assert faults.ignores_signal(proc.pid, signal.SIGINT)
            assert not faults.ignores_signal(proc.pid, signal.SIGTERM)
        finally:
            proc.kill()


def test_the_suites_children_do_not_ignore_sigint() -> None:
    # tests/conftest.py gives the suite a SIGINT handler even when it was started with
    # SIGINT ignored; a handler is reset by exec, so a child starts with the default
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    with subprocess.Popen(SLEEP) as proc:
        try:
            assert not faults.ignores_signal(proc.pid, signal.SIGINT)
        finally:
            proc.kill()


def test_a_suite_started_with_sigint_ignored_still_passes_ctrl_c_on(tmp_path: Path) -> None:
    # the whole chain: pytest started with SIGINT ignored runs a test whose child must
    # not ignore it (tests/conftest.py is what makes that true)
    test = tmp_path / "test_child.py"
    test.write_text(
        "import signal, subprocess, sys\n"
        "from harness import faults\n"
        "def test_child():\n"
        "    with subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']) as p:\n"
        "        try:\n"
        "            assert not faults.ignores_signal(p.pid, signal.SIGINT)\n"
        "        finally:\n"
        "            p.kill()\n"
    )
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-p", "tests.conftest", "-c", os.devnull, "--rootdir", str(tmp_path), str(test)],
        cwd=root, preexec_fn=_ignoring_sigint, capture_output=True, text=True, timeout=120,  # noqa: PLW1509
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def test_processes_are_found_by_an_inherited_environment_token() -> None:
    # a grandchild in a session of its own still carries the token
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(30)'], start_new_session=True); time.sleep(30)")
    env = {**os.environ, "HARNESS_TEST_TOKEN": "tok-found"}
    with subprocess.Popen([sys.executable, "-c", code], env=env) as proc:
        try:
            deadline = time.monotonic() + 20
            while len(found := faults.processes_with_env("HARNESS_TEST_TOKEN", "tok-found")) < 2:
                assert time.monotonic() < deadline, found
                time.sleep(0.1)
            assert proc.pid in found and faults.processes_with_env("HARNESS_TEST_TOKEN", "tok") == []
            assert all("time.sleep(30)" in line for line in faults.describe_pids(found))
        finally:
            faults.kill_pids(faults.processes_with_env("HARNESS_TEST_TOKEN", "tok-found"))
    assert faults.wait_gone(found, timeout=10) == []


def test_an_interrupt_while_qemu_starts_stays_an_interrupt_and_reaps_it(tmp_path: Path) -> None:
    """Ctrl-C while a QEMU's QMP connects (a cpr-reboot's new QEMU in `harness repro`):
    the KeyboardInterrupt reaches the caller at once and the process is reaped - not a
    30-s wait for a QEMU never told to quit and an AbnormalShutdown in its place (make
    test's SIGINT test caught `harness repro` exiting 70).  In a child process, as a
    user's Ctrl-C reaches one."""
    pidfile = tmp_path / "stub.pid"
    stub = tmp_path / "qemu-that-never-greets"
    stub.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    stub.chmod(0o755)
    script = (
        "import pathlib, sys\n"
        "from harness.guest.qemu_process import QemuProcess\n"
        "class Build:\n"
        "    label, binary, env = 'stub', pathlib.Path(sys.argv[1]), {}\n"
        "    def data_args(self): return []\n"
        "    def wrapper(self): return []\n"
        "proc = QemuProcess(Build(), [], workdir=pathlib.Path(sys.argv[2]), qmp_timeout=30.0)\n"
        "try:\n"
        "    proc.launch()\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted, reaped:', proc._vm._popen.poll() is not None, flush=True)\n"
        "    sys.exit(130)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(stub), str(tmp_path / "w")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert child.poll() is None and time.monotonic() < deadline, "the stub QEMU never started"
            time.sleep(0.05)
        time.sleep(0.3)  # the child is in QMP's connect now
        t0 = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=20)
        assert time.monotonic() - t0 < 10, out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130 and "interrupted, reaped: True" in out, out
    assert not Path(f"/proc/{pidfile.read_text().strip()}").exists()
