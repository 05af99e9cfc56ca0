"""The plugin with real guests: four boots under ``-n 2``, no QEMU left behind when a test
raises mid-boot, on Ctrl-C (SIGINT to pytest) during a boot, or when the pytest process or
an xdist worker is SIGKILLed (QEMU runs with a parent-death signal).

Every inner run gets its own short ``HARNESS_RUNDIR`` (fixture ``harness_rundir``); every
QEMU it starts has that directory in its command line, which is how these tests find
exactly their own QEMU processes on a machine shared with other runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import faults

pytestmark = pytest.mark.integration

FindQemu = Callable[[str], list[int]]

# an inner conftest: at the very end of the inner session (after every fixture teardown
# and the plugin's own reaping) record which QEMU processes of this run are still alive
INNER_CONFTEST = """
import json, os
from pathlib import Path

def _alive(marker):
    out = []
    for e in Path("/proc").iterdir():
        if not e.name.isdigit():
            continue
        try:
            argv = (e / "cmdline").read_bytes().split(b"\\0")
            st = (e / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if st != "Z" and argv and b"qemu-system" in argv[0] and any(marker.encode() in a for a in argv):
            out.append(int(e.name))
    return out

def pytest_unconfigure(config):
    if hasattr(config, "workerinput"):  # an xdist worker: the controller reports
        return
    path = os.environ.get("HARNESS_TEST_LEFTOVERS")
    if path:
        Path(path).write_text(json.dumps(_alive(os.environ["HARNESS_RUNDIR"])))
"""


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _wait_for(what: str, cond: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes],
              log: Path, *, proc_exits: bool = False) -> None:
    """Poll ``cond``; an inner pytest that exits first fails the wait unless the caller
    expects it to (``proc_exits``: it was killed, and QEMU dies after it, not before)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                 f"inner output:\n{log.read_text(errors='replace')[-3000:]}")
        if not proc_exits and proc.poll() is not None:
            raise AssertionError(f"inner pytest exited ({proc.returncode}) before {what}:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


@contextmanager
def inner_pytest(tmp_path: Path, source: str, *args: str,
                 conftest_extra: str = "") -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``pytest`` on an inner test file in a subprocess; always reaped."""
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST + conftest_extra)
    (tmp_path / "test_inner.py").write_text(source)
    log = tmp_path / "inner.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(HARNESS_TEST_LEFTOVERS=str(tmp_path / "leftovers.json"), PYTHONUNBUFFERED="1")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "test_inner.py", *args],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


BOOT_ONE = """
def test_boot(vm):
    assert vm.ssh.run("true").rc == 0
"""


def test_four_guests_under_xdist(pytester: pytest.Pytester, harness_rundir: Path,
                                 tmp_path: Path, find_qemu: FindQemu) -> None:
    record = tmp_path / "record.jsonl"
    pytester.makepyfile(test_four=f"""
        import json, os
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_boot(vm, n):
            res = vm.ssh.run("cat /proc/sys/kernel/random/boot_id")
            assert res.rc == 0 and res.stdout.strip()
            rec = {{"n": n, "worker": os.environ.get("PYTEST_XDIST_WORKER"),
                    "workdir": str(vm.workdir), "instance": vm.ready.info["instance_id"],
                    "varstore": str(vm.varstore_path), "ssh_port": vm.ssh_port}}
            with open({str(record)!r}, "a") as fh:
                fh.write(json.dumps(rec) + "\\n")
    """)
    t0 = time.monotonic()
    # restored guests (each its own QEMU, work dir, varstore copy and instance id): what is
    # checked is the workers' isolation, not the boot
    res = pytester.runpytest("-n", "2", "-v", "--fast-start")
    elapsed = time.monotonic() - t0
    res.assert_outcomes(passed=4)
    recs = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(r["n"] for r in recs) == [0, 1, 2, 3]
    workers = {r["worker"] for r in recs}
    assert workers == {"gw0", "gw1"}, recs
    for key in ("workdir", "instance", "varstore"):
        assert len({r[key] for r in recs}) == 4, (key, recs)
    for r in recs:  # each worker works under its own private base, named after it
        base = Path(r["workdir"]).relative_to(harness_rundir).parts[0]
        assert re.match(rf"hv-\d+-{r['worker']}-", base), r  # hv-<owner pid>-<worker>-
        assert Path(r["varstore"]).is_relative_to(harness_rundir / base)
    assert len({Path(r["workdir"]).relative_to(harness_rundir).parts[0] for r in recs}) == 2
    assert list(harness_rundir.iterdir()) == []
    assert find_qemu(str(harness_rundir)) == []
    print(f"four guests under -n 2: {elapsed:.1f} s")


def test_raise_mid_boot_leaves_no_qemu(pytester: pytest.Pytester, harness_rundir: Path,
                                       tmp_path: Path, find_qemu: FindQemu) -> None:
    seen = tmp_path / "seen.jsonl"
    pytester.makepyfile(test_mid=f"""
        import json, time
        import pytest
        from harness.guest.console import Console
        from harness.guest.qemu_process import live_processes

        def _note(where):
            pids = [p.pid for p in live_processes() if p.running]
            with open({str(seen)!r}, "a") as fh:
                fh.write(json.dumps({{"where": where, "pids": pids}}) + "\\n")

        @pytest.fixture
        def boom(monkeypatch):
            def wait_for(self, *args, **kw):
                _note("wait_for")
                time.sleep(2)  # QEMU is busy in OVMF by now
                raise RuntimeError("injected mid-boot failure")
            monkeypatch.setattr(Console, "wait_for", wait_for)

        def test_raise_in_fixture(boom, vm):
            raise AssertionError("not reached")

        def test_timeout_in_test(vm_factory):
            m = vm_factory(start=False)
            try:
                m.start(timeout=4)
            finally:
                _note("timeout")
    """)
    res = pytester.runpytest("-v")
    res.assert_outcomes(errors=1, failed=1)
    res.stdout.fnmatch_lines_random(["*RuntimeError: injected mid-boot failure*",
                                     "*GuestTimeout*"])  # fmt: skip
    notes = [json.loads(line) for line in seen.read_text().splitlines()]
    assert [n["where"] for n in notes] == ["wait_for", "timeout"]
    pids = notes[0]["pids"]
    assert pids, "QEMU was not running when the boot failed"
    assert find_qemu(str(harness_rundir)) == []  # this process is alive: no parent-death help
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _ppid(pid) != os.getpid()


def test_sigint_during_boot_leaves_no_qemu(harness_rundir: Path, tmp_path: Path,
                                           find_qemu: FindQemu) -> None:
    marker = str(harness_rundir)
    with inner_pytest(tmp_path, BOOT_ONE) as (proc, log):
        _wait_for("QEMU to start", lambda: bool(find_qemu(marker)), 180, proc, log)
        qemu = find_qemu(marker)
        assert [_ppid(p) for p in qemu] == [proc.pid]
        time.sleep(3)  # well inside OVMF's boot, long before SSH is up
        assert proc.poll() is None
        assert not faults.ignores_signal(proc.pid, signal.SIGINT), "inner pytest ignores SIGINT"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    out = log.read_text(errors="replace")
    assert "KeyboardInterrupt" in out, out[-3000:]
    # the harness reaped QEMU itself before pytest exited (not the parent-death signal)
    assert json.loads((tmp_path / "leftovers.json").read_text()) == [], out[-3000:]
    assert find_qemu(marker) == []


def test_sigkill_of_pytest_leaves_no_orphan(harness_rundir: Path, tmp_path: Path,
                                            find_qemu: FindQemu) -> None:
    marker = str(harness_rundir)
    with inner_pytest(tmp_path, BOOT_ONE) as (proc, log):
        _wait_for("QEMU to start", lambda: bool(find_qemu(marker)), 180, proc, log)
        assert [_ppid(p) for p in find_qemu(marker)] == [proc.pid]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        _wait_for("QEMU to die with its parent", lambda: not find_qemu(marker), 15, proc, log,
                  proc_exits=True)


def test_control_without_parent_death_signal_qemu_is_orphaned(
    harness_rundir: Path, tmp_path: Path, find_qemu: FindQemu
) -> None:
    """The failing case of the test above: the same run with the parent-death signal
    disabled leaves an orphaned QEMU (which the ``harness_rundir`` fixture then kills)."""
    marker = str(harness_rundir)
    no_pdeathsig = ("\nimport harness.guest.qemu_process\n"
                    "harness.guest.qemu_process.die_with_parent = lambda argv, env: (list(argv), dict(env))\n")
    with inner_pytest(tmp_path, BOOT_ONE, conftest_extra=no_pdeathsig) as (proc, log):
        _wait_for("QEMU to start", lambda: bool(find_qemu(marker)), 180, proc, log)
        [qemu] = find_qemu(marker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(3)
        assert find_qemu(marker) == [qemu], "QEMU died without the parent-death signal"
        assert _ppid(qemu) != proc.pid  # reparented: an orphan


def test_sigkill_of_xdist_worker_leaves_no_orphan(harness_rundir: Path, tmp_path: Path,
                                                  find_qemu: FindQemu) -> None:
    marker = str(harness_rundir)
    with inner_pytest(tmp_path, BOOT_ONE, "-n", "1") as (proc, log):
        _wait_for("QEMU to start", lambda: bool(find_qemu(marker)), 180, proc, log)
        [qemu] = find_qemu(marker)
        worker = _ppid(qemu)
        assert worker != proc.pid and _ppid(worker) == proc.pid  # QEMU's parent is gw0
        os.kill(worker, signal.SIGKILL)
        _wait_for("QEMU to die with its worker", lambda: not find_qemu(marker), 15, proc, log,
                  proc_exits=True)
        proc.wait(timeout=120)  # the controller reports the crash and finishes
    out = log.read_text(errors="replace")
    assert "crashed" in out, out[-3000:]
    assert find_qemu(marker) == []
