"""Running a command on a share of the machine's CPUs: measuring as a slower machine would.

:class:`CpuShare` owns one cgroup whose CPU quota is ``share`` of the machine's CPUs (a
share of 0.5 on a 2-CPU machine: one CPU's worth of time per period, spread over both).
The command runs inside it with everything it starts (QEMU, swtpm, pytest workers: a
cgroup is inherited), so a suite or a benchmark sees half the CPU time, as on a machine
half as fast, while keeping the same number of CPUs.  cgroup v2 (``cpu.max``) and v1
(``cpu.cfs_quota_us``) are both handled; without a writable CPU controller the error says
so.  The group is ``hv-share-<pid>`` under the controller's root; it is removed when the
command ends, and a group left by a killed run is removed by the next one (see
:func:`sweep`).

The command enters the group through ``/bin/sh`` writing its own pid into the group's
``cgroup.procs`` before it execs the command: no Python between fork and exec.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HostError

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
PREFIX = "hv-share-"


@dataclass(frozen=True)
class Controller:
    """Where CPU groups are made, and how their quota is written."""

    root: Path
    version: int  # 1 or 2


def find_controller(cgroup_root: Path = CGROUP_ROOT) -> Controller:
    """The writable CPU controller: cgroup v2 with ``cpu`` enabled, or v1's ``cpu``."""
    v2 = cgroup_root / "cgroup.controllers"
    if v2.is_file() and "cpu" in v2.read_text().split():
        return Controller(cgroup_root, 2)
    for name in ("cpu", "cpu,cpuacct"):
        v1 = cgroup_root / name
        if (v1 / "cpu.cfs_quota_us").is_file():
            return Controller(v1, 1)
    raise HostError(
        f"no CPU cgroup controller under {cgroup_root} (neither a cgroup v2 hierarchy with the cpu "
        "controller nor cgroup v1's cpu hierarchy): cannot cap a command's CPU share here"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(controller: Controller | None = None) -> list[Path]:
    """Remove the empty groups of runs whose process is gone; returns what was removed."""
    try:
        c = controller or find_controller()
    except HostError:
        return []
    removed = []
    for group in c.root.glob(f"{PREFIX}*"):
        pid = group.name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):  # still holding processes: leave it
                group.rmdir()
                removed.append(group)
    return removed


@dataclass
class Usage:
    """What the group's processes used, read from the controller."""

    cpu_s: float
    throttled_periods: int
    throttled_s: float


class CpuShare:
    """One cgroup capping its processes at ``share`` of ``cpus`` CPUs; a context manager."""

    def __init__(self, share: float, *, cpus: int | None = None, controller: Controller | None = None) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"--cpu-share {share}: expected a fraction in (0, 1]")
        self.share = share
        self.cpus = cpus or os.cpu_count() or 1
        self.controller = controller or find_controller()
        self.quota_us = max(1000, round(PERIOD_US * self.cpus * share))
        self.path = self.controller.root / f"{PREFIX}{os.getpid()}-{time.monotonic_ns() % 10**6}"

    def __enter__(self) -> CpuShare:
        sweep(self.controller)
        try:
            self.path.mkdir(mode=0o755)
            if self.controller.version == 2:
                (self.path / "cpu.max").write_text(f"{self.quota_us} {PERIOD_US}\n")
            else:
                (self.path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
                (self.path / "cpu.cfs_quota_us").write_text(f"{self.quota_us}\n")
        except OSError as e:
            self._remove()
            raise HostError(f"cannot make the CPU group {self.path}: {e.strerror or e}") from e
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` wrapped so that it enters the group before it runs."""
        script = 'echo $$ > "$1" || exit 125; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "cpu-share", str(self.procs_file), *command]

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in self.procs_file.read_text().split()]
        except OSError:
            return []

    def usage(self) -> Usage:
        """CPU time used by the group's processes so far, and how often the quota held them."""
        stat = self._stat()
        if self.controller.version == 2:
            cpu_s = stat.get("usage_usec", 0) / 1e6
            return Usage(cpu_s, stat.get("nr_throttled", 0), stat.get("throttled_usec", 0) / 1e6)
        try:  # cgroup v1 counts CPU time in cpuacct, mounted with cpu or apart (then: nan)
            cpu_s = int((self.path / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            cpu_s = float("nan")
        return Usage(cpu_s, stat.get("nr_throttled", 0), stat.get("throttled_time", 0) / 1e9)

    def _stat(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    out[key] = int(value)
        return out

    def close(self, grace: float = 10.0) -> None:
        """Kill what is still in the group (the command's strays) and remove it."""
        deadline = time.monotonic() + grace
        while self.pids() and time.monotonic() < deadline:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self._remove()

    def _remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError as e:
                    if e.errno != 16:  # EBUSY: the last process is still exiting
                        raise
                    time.sleep(0.05)


def run(command: Sequence[str], share: float, *, env: dict[str, str] | None = None) -> tuple[int, Usage, float]:
    """Run ``command`` inside a fresh group at ``share``; returns its exit code (the
    negated signal number when killed by one), what it used and its wall time."""
    from harness.guest.qemu_process import die_with_parent

    with CpuShare(share) as group:
        before = _children_cpu_s()
        t0 = time.monotonic()
        argv, child_env = die_with_parent(group.argv(command), dict(os.environ if env is None else env))
        proc = subprocess.Popen(argv, env=child_env)
        try:
            rc = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        wall = time.monotonic() - t0
        usage = group.usage()
        if math.isnan(usage.cpu_s):  # reaped descendants' CPU time: the same when all are waited for
            usage.cpu_s = _children_cpu_s() - before
        return rc, usage, wall


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def current_share(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float:
    """The CPU share this process runs on: the tightest quota of its cgroup and the groups
    above it, as a fraction of the machine's CPUs (1.0 without a quota)."""
    cpus = os.cpu_count() or 1
    share = 1.0
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return share
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "" and (cgroup_root / "cgroup.controllers").is_file():
            base, files = cgroup_root, ("cpu.max",)
        elif "cpu" in controllers.split(","):
            base, files = cgroup_root / controllers, ("cpu.cfs_quota_us",)
        else:
            continue
        group = base / rel.lstrip("/")
        while True:
            share = min(share, _quota_share(group, files[0], cpus))
            if group == base or base not in group.parents:
                break
            group = group.parent
    return share


def _quota_share(group: Path, name: str, cpus: int) -> float:
    try:
        text = (group / name).read_text().split()
        if name == "cpu.max":
            quota, period = text[0], text[1]
        else:
            quota, period = text[0], (group / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1"):
            return 1.0
        return int(quota) / int(period) / cpus
    except (OSError, ValueError, IndexError):
        return 1.0
