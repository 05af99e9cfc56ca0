"""No orphan QEMU: SIGINT, SIGTERM and SIGKILL to a running ``harness repro`` / ``boot`` /
``nightly`` / ``soak`` and a SIGKILLed xdist worker leave no QEMU (nor pytest) behind.  QEMU
runs in its own session (a terminal's Ctrl-C does not reach it) with a parent-death signal
(SIGKILL, set by setpriv: it dies with the process that started it); the CLI reaps its
guests on KeyboardInterrupt, which SIGTERM and SIGHUP become.

Every child runs with its own ``HARNESS_RUNDIR``, so its QEMUs are found by path."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import faults
from harness.guest import speed
from harness.machine import Machine, sweep_orphan_dirs, sweep_orphan_ram_dirs
from harness.spec import VmSpec

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())")
BOOT_WAIT = 420.0
SHM = Path("/dev/shm")  # a cold TCG boot on a loaded 2-core machine


class Child:
    """A child process in its own session, with its output in a file; on exit, whatever
    happened, killed with every process that inherited its environment token (a soak's
    pieces run in sessions of their own, out of reach of the child's group)."""

    def __init__(self, cmd: list[str], rundir: Path, out: Path, env: dict[str, str] | None = None) -> None:
        self.out = out
        self._fh = out.open("w")
        # unique across xdist workers too (each numbers its tmp_path names from 0)
        self.token = f"{out.parent.name}-{out.stem}-{secrets.token_hex(4)}"
        self.proc = subprocess.Popen(
            cmd, stdout=self._fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "HARNESS_RUNDIR": str(rundir), "PYTHONUNBUFFERED": "1",
                 "HARNESS_TEST_CHILD": self.token, **(env or {})},
        )  # fmt: skip

    def assert_interruptible(self) -> None:
        """SIGINT will reach the child as Ctrl-C would (see tests/conftest.py)."""
        assert not faults.ignores_signal(self.proc.pid, signal.SIGINT), "the child ignores SIGINT"

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        faults.kill_pids(faults.processes_with_env("HARNESS_TEST_CHILD", self.token))
        self._fh.close()


@pytest.fixture
def rundir(harness_rundir: Path) -> Path:
    return harness_rundir


def _wait_for(pred: object, timeout: float, what: str, child: Child) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        if child.proc.poll() is not None:
            pytest.fail(f"{what}: the child exited ({child.proc.returncode}) first:\n{child.text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s:\n{child.text()[-3000:]}")


@pytest.fixture
def child_factory(tmp_path: Path, rundir: Path) -> Iterator[list[Child]]:
    children: list[Child] = []
    yield children
    for c in children:
        c.close()


def _running_cycles(child: Child) -> bool:
    return "cycle   2" in child.text()


@pytest.mark.requires(mode="cpr-reboot")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["sigint", "sigterm", "sigkill"])  # fmt: skip
def test_signal_to_harness_repro_leaves_no_qemu(
    rundir: Path, tmp_path: Path, child_factory: list[Child], sig: signal.Signals,
) -> None:
    # a guest restored from a saved boot (--set fast=1): what is tested is the signal, not a boot
    child = Child([*CLI, "repro", "cpr-reboot", "--cycles", "50", "--set", "fast=1"], rundir, tmp_path / "repro.out")
    child_factory.append(child)
    # Seen once is the precondition: sampling again races the cycles themselves (a
    # cpr-reboot has no QEMU of the run for 27-39 ms between the old one's exit and the
    # new one's start, measured over 8 cycles; a signal landing there must leave none too)
    seen: list[int] = []

    def second_cycle_qemu() -> bool:
        seen[:] = faults.find_qemu(rundir) if _running_cycles(child) else []
        return bool(seen)

    _wait_for(second_cycle_qemu, BOOT_WAIT, "repro running its second cycle with a QEMU", child)
    child.assert_interruptible()
    os.kill(child.proc.pid, sig)  # the harness only, as a job runner would
    rc = child.wait(120)
    assert rc is not None, "the harness did not exit within 120 s of the signal"
    if sig != signal.SIGKILL:
        assert rc == 130, child.text()[-2000:]
        assert "interrupted" in child.text()
    left = faults.wait_gone(faults.find_qemu(rundir), timeout=15)
    assert left == [], f"orphan QEMU {left} after {sig.name} to harness repro"
    ram_dirs = list(SHM.glob(f"hv-ram-{child.proc.pid}-*"))
    if sig != signal.SIGKILL:  # an orderly exit also removes the guests' work and RAM dirs
        assert [p for p in rundir.rglob("*") if p.is_file()] == []
        assert ram_dirs == []
    else:  # a SIGKILLed run cannot clean up: its file-backed guest RAM is swept by the next
        assert ram_dirs, "expected the killed run's guest-RAM directory"
        removed = sweep_orphan_ram_dirs(SHM)
        assert set(ram_dirs) <= set(removed) and not any(d.exists() for d in ram_dirs)


def test_sweep_removes_only_dead_owners_ram_dirs(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    mine = tmp_path / f"hv-ram-{os.getpid()}-aaaa"
    other_live = tmp_path / f"hv-ram-{os.getppid()}-bbbb"
    orphan = tmp_path / f"hv-ram-{gone.pid}-cccc"
    legacy = tmp_path / "hv-ram-dddd"
    for d in (mine, other_live, orphan, legacy):
        d.mkdir()
        (d / "guest-ram").write_bytes(b"x")
    assert sweep_orphan_ram_dirs(tmp_path) == [orphan]
    assert mine.exists() and other_live.exists() and legacy.exists() and not orphan.exists()
    sockets = tmp_path / f"hvk-{gone.pid}-eeee"
    sockets.mkdir()
    assert sweep_orphan_dirs(tmp_path, "hvk") == [sockets]


def test_socket_dirs_are_private_named_by_owner_and_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rundir = Path(tempfile.mkdtemp(prefix="hvr-"))  # short: socket paths stay < 107 bytes
    try:
        monkeypatch.setenv("HARNESS_RUNDIR", str(rundir))
        gone = subprocess.Popen(["true"])
        gone.wait()
        (rundir / f"hvk-{gone.pid}-zzzz").mkdir()  # left by a SIGKILLed run
        vm = Machine(VmSpec(name="socks"), tmp_path / "vm")
        d = vm.sock_dir
        assert d.parent == rundir and d.name.startswith(f"hvk-{os.getpid()}-")
        assert d.stat().st_mode & 0o777 == 0o700
        assert [p.name for p in rundir.iterdir()] == [d.name]  # the dead owner's is gone
        vm.stop()
        assert not d.exists()
        monkeypatch.setenv("HARNESS_RUNDIR", str(tmp_path / ("x" * 60)))
        long_root = Machine(VmSpec(name="socks2"), tmp_path / "vm2").sock_dir
        assert long_root.parent == Path(tempfile.gettempdir())
        long_root.rmdir()
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _nightly_exists() -> bool:
    res = subprocess.run([*CLI, "nightly", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=False)  # fmt: skip
    return res.returncode == 0


@pytest.mark.requires(mode="cpr-reboot")
def test_sigint_to_harness_nightly_leaves_no_qemu(
    rundir: Path, tmp_path: Path, child_factory: list[Child],
) -> None:
    if not _nightly_exists():
        pytest.skip("harness nightly is not available in this checkout")
    cmd = [*CLI, "nightly", "--scenario", "cpr-reboot", "--qemu", "10.0.2", "--ovmf", "2022.11",
           "--cycles", "50", "--jobs", "1", "--results", str(tmp_path / "results"), "--set", "fast=1"]  # fmt: skip
    child = Child(cmd, rundir, tmp_path / "nightly.out")
    child_factory.append(child)
    _wait_for(lambda: bool(faults.find_qemu(rundir)), BOOT_WAIT, "a nightly guest started", child)
    time.sleep(5)
    child.assert_interruptible()
    os.kill(child.proc.pid, signal.SIGINT)
    rc = child.wait(180)
    assert rc is not None, "harness nightly did not exit within 180 s of SIGINT"
    assert rc == 130, f"harness nightly exited {rc} after SIGINT (not interrupted):\n{child.text()[-2000:]}"
    left = faults.wait_gone(faults.find_qemu(rundir), timeout=30)
    assert left == [], f"orphan QEMU {left} after SIGINT to harness nightly:\n{child.text()[-2000:]}"


INNER = """
import os, tempfile, time
from pathlib import Path
from harness import snapshots
from harness.machine import Machine

def test_sleeps_with_a_guest(vm_factory, tmp_path):
    vm = vm_factory(start=False, name="orphan")
    short = Path(tempfile.mkdtemp(prefix="t", dir=os.environ["HARNESS_RUNDIR"]))  # socket paths
    snapshots.start_fast(vm, make_template=lambda: Machine(vm.spec, short / "t"))
    print("GUEST-UP", flush=True)
    time.sleep(900)
"""


def _pytest_with_a_sleeping_guest(rundir: Path, tmp_path: Path, child_factory: list[Child],
                                  env: dict[str, str] | None = None) -> Child:
    """``pytest -n 1`` of INNER, returned once its worker's guest runs and the test sleeps."""
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(INNER)
    cmd = [sys.executable, "-m", "pytest", "-n", "1", "-p", "no:cacheprovider", "-s",
           "--rootdir", str(inner), str(inner / "test_inner.py")]  # fmt: skip
    child = Child(cmd, rundir, tmp_path / "inner.out", env=env)
    child_factory.append(child)
    # the restored guest, not the snapshot's template boot (its work dir is "<n>-orphan")
    _wait_for(lambda: bool(_guests_in(rundir)), BOOT_WAIT, "the worker's guest", child)
    time.sleep(3)  # the restore has finished and the test sleeps
    return child


def test_killed_xdist_worker_leaves_no_qemu(rundir: Path, tmp_path: Path,
                                            child_factory: list[Child]) -> None:
    child = _pytest_with_a_sleeping_guest(rundir, tmp_path, child_factory)
    (qemu,) = _guests_in(rundir)
    assert faults.find_qemu(rundir) == [qemu]
    worker = int(Path(f"/proc/{qemu}/stat").read_text().rsplit(")", 1)[1].split()[1])
    controller = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert worker != child.proc.pid and controller == child.proc.pid, \
        "QEMU's parent should be an xdist worker of the controller"
    os.kill(worker, signal.SIGKILL)
    left = faults.wait_gone([qemu], timeout=10)
    assert left == [], f"QEMU {qemu} outlived its killed xdist worker {worker}"
    rc = child.wait(180)
    assert rc is not None and rc != 0, "the controller should report the crashed worker"
    assert faults.find_qemu(rundir) == []


def test_sigterm_to_a_pytest_run_tears_its_workers_guests_down(rundir: Path, tmp_path: Path,
                                                               child_factory: list[Child]) -> None:
    # a job runner stopping `make test` sends SIGTERM to the whole process group: the
    # controller and its worker must stop as on Ctrl-C, reaping the guest and removing the
    # worker's and the guest's directories and the session's speed log
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    child = _pytest_with_a_sleeping_guest(rundir, tmp_path, child_factory,
                                          env={"TMPDIR": str(tmp), speed.ENV_VAR: ""})  # its own log
    ours = sorted(p.name for p in rundir.iterdir() if p.name.startswith(("hv-", "hvk-")))
    assert any(n.startswith("hv-") for n in ours) and any(n.startswith("hvk-") for n in ours), ours
    assert list(tmp.glob("hv-speed-*")), "the session's speed log should exist while it runs"
    os.killpg(child.proc.pid, signal.SIGTERM)
    rc = child.wait(120)
    assert rc is not None and rc != 0, f"pytest exited {rc} after SIGTERM:\n{child.text()[-2000:]}"
    assert "KeyboardInterrupt" in child.text(), child.text()[-2000:]
    assert faults.wait_gone(faults.find_qemu(rundir), timeout=15) == []
    assert _tree_gone(child, rundir, 30) == []
    left = sorted(p.name for p in rundir.iterdir() if p.name.startswith(("hv-", "hvk-")))
    assert left == [], f"left behind after SIGTERM: {left}"
    assert list(tmp.glob("hv-speed-*")) == [], "the speed log was left behind"


def _guests_in(rundir: Path) -> list[int]:
    return [p for p in faults.find_qemu(rundir)
            if b"-orphan/" in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip


def test_sigint_to_harness_soak_stops_its_running_piece(rundir: Path, tmp_path: Path,
                                                        child_factory: list[Child]) -> None:
    # SIGINT to the soak's own pid only (as `kill -INT` does, not a terminal's Ctrl-C to the
    # whole group): the suite run it started, and that run's guest, must stop with it
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(INNER)
    out = tmp_path / "soak"
    cmd = [*CLI, "soak", "--cycles", "0", "--suite-runs", "2", "--jobs", "1",
           "--suite", str(inner / "test_inner.py"), "--out", str(out)]  # fmt: skip
    child = Child(cmd, rundir, tmp_path / "soak.out")
    child_factory.append(child)
    _wait_for(lambda: bool(_guests_in(rundir)), BOOT_WAIT, "the suite run's guest", child)
    time.sleep(3)
    child.assert_interruptible()
    os.kill(child.proc.pid, signal.SIGINT)
    rc = child.wait(120)
    assert rc == 130, f"harness soak exited {rc} after SIGINT:\n{child.text()[-2000:]}"
    left = faults.wait_gone(faults.find_qemu(rundir), timeout=30)
    assert left == [], f"orphan QEMU {left} after SIGINT to harness soak:\n{child.text()[-2000:]}"
    summary = json.loads((out / "soak.json").read_text())
    assert summary["interrupted"] and summary["suite_runs"] == 0 and summary["suite_runs_asked"] == 2


def test_sigterm_to_harness_boot_removes_its_directories(rundir: Path, tmp_path: Path,
                                                          child_factory: list[Child]) -> None:
    child = Child([*CLI, "boot", "--json", "--", "sleep", "600"], rundir, tmp_path / "boot.out")
    child_factory.append(child)
    _wait_for(lambda: bool(faults.find_qemu(rundir)), BOOT_WAIT, "the guest's QEMU", child)
    time.sleep(2)
    os.kill(child.proc.pid, signal.SIGTERM)  # as a job runner stopping the job would
    rc = child.wait(120)
    assert rc == 130, f"harness boot exited {rc} after SIGTERM:\n{child.text()[-2000:]}"
    assert faults.wait_gone(faults.find_qemu(rundir), timeout=15) == []
    assert list(rundir.iterdir()) == [], f"left behind: {sorted(rundir.rglob('*'))}"
    assert list(SHM.glob(f"hv-ram-{child.proc.pid}-*")) == []


def _gone_pid() -> int:
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


def test_the_next_run_sweeps_what_a_killed_run_left(rundir: Path) -> None:
    from harness.factory import private_base

    dead, live = _gone_pid(), os.getppid()
    left = [rundir / f"hv-{dead}-gw0-abcd", rundir / f"hv-{dead}-efgh", rundir / f"hvk-{dead}-ijkl",
            SHM / f"hv-ram-{dead}-mnop"]  # fmt: skip
    kept = [rundir / f"hv-{live}-gw1-qrst", rundir / "hv-install-uvwx", SHM / f"hv-ram-{live}-yzab"]
    try:
        for d in left + kept:
            d.mkdir()
            (d / "file").write_bytes(b"x")
        base = private_base(tag="-main")
        assert base.name.startswith(f"hv-{os.getpid()}-main-")
        assert [d for d in left if d.exists()] == [], "a dead run's directories must be swept"
        assert all(d.exists() for d in kept), "a live run's (or a foreign) directory was removed"
        base.rmdir()
    finally:
        for d in left + kept:
            shutil.rmtree(d, ignore_errors=True)


def _tree_gone(child: Child, rundir: Path, timeout: float) -> list[int]:
    """What of the killed child's tree is still alive after ``timeout``: the processes that
    carry its environment token (pytest, its workers) and its QEMUs."""
    deadline = time.monotonic() + timeout
    while True:
        alive = faults.processes_with_env("HARNESS_TEST_CHILD", child.token) + faults.find_qemu(rundir)
        if not alive or time.monotonic() > deadline:
            return sorted(set(alive))
        time.sleep(0.5)


@pytest.mark.requires(mode="cpr-reboot")
def test_sigkill_to_harness_nightly_takes_pytest_its_workers_and_guests(
    rundir: Path, tmp_path: Path, child_factory: list[Child],
) -> None:
    cmd = [*CLI, "nightly", "--scenario", "cpr-reboot", "--qemu", "10.0.2", "--ovmf", "2022.11",
           "--cycles", "50", "--jobs", "1", "--results", str(tmp_path / "results"), "--set", "fast=1"]  # fmt: skip
    child = Child(cmd, rundir, tmp_path / "nightly.out")
    child_factory.append(child)
    _wait_for(lambda: bool(faults.find_qemu(rundir)), BOOT_WAIT, "a nightly guest started", child)
    time.sleep(3)
    assert len(faults.processes_with_env("HARNESS_TEST_CHILD", child.token)) >= 3  # CLI, pytest, worker
    os.kill(child.proc.pid, signal.SIGKILL)  # the CLI only: no handler runs
    assert child.wait(30) is not None
    left = _tree_gone(child, rundir, timeout=30)
    assert left == [], f"still running 30 s after SIGKILL of harness nightly: {faults.describe_pids(left)}"


def test_sigkill_to_harness_soak_takes_its_suite_run_and_guest(
    rundir: Path, tmp_path: Path, child_factory: list[Child],
) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "test_inner.py").write_text(INNER)
    cmd = [*CLI, "soak", "--cycles", "0", "--suite-runs", "1", "--jobs", "1",
           "--suite", str(inner / "test_inner.py"), "--out", str(tmp_path / "soak")]  # fmt: skip
    child = Child(cmd, rundir, tmp_path / "soak.out")
    child_factory.append(child)
    _wait_for(lambda: bool(_guests_in(rundir)), BOOT_WAIT, "the suite run's guest", child)
    time.sleep(3)
    os.kill(child.proc.pid, signal.SIGKILL)
    assert child.wait(30) is not None
    left = _tree_gone(child, rundir, timeout=30)
    assert left == [], f"still running 30 s after SIGKILL of harness soak: {faults.describe_pids(left)}"
