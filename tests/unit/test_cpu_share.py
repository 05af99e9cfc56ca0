"""The CPU share's pure parts on fake cgroup trees: which controller, the share a process
runs on, the sweep of a dead run's group; and the speed index read from a boot log.  The
real quota: tests/integration/test_cpu_share.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.errors import HostError
from harness.guest import cpu_share, speed

pytestmark = pytest.mark.unit


def _v1(root: Path) -> Path:
    cpu = root / "cpu"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    return cpu


def test_v2_is_found_when_it_has_the_cpu_controller(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert cpu_share.find_controller(tmp_path) == cpu_share.Controller(tmp_path, 2)


def test_v1_is_found_beside_a_v2_without_cpu(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    cpu = _v1(tmp_path)
    assert cpu_share.find_controller(tmp_path) == cpu_share.Controller(cpu, 1)


def test_no_controller_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=f"no CPU cgroup controller under {tmp_path}"):
        cpu_share.find_controller(tmp_path)


def test_share_must_be_a_fraction(tmp_path: Path) -> None:
    c = cpu_share.Controller(_v1(tmp_path), 1)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="expected a fraction"):
            cpu_share.CpuShare(bad, controller=c)
    assert cpu_share.CpuShare(0.5, cpus=2, controller=c).quota_us == 100_000
    assert cpu_share.CpuShare(0.5, cpus=4, controller=c).quota_us == 200_000


def test_current_share_v1_takes_the_tightest_quota_up_the_tree(tmp_path: Path) -> None:
    cpu = _v1(tmp_path)
    outer, inner = cpu / "ci", cpu / "ci" / "job"
    inner.mkdir(parents=True)
    for group, quota in ((outer, 150_000), (inner, -1)):
        (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (group / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/x\n1:cpu:/ci/job\n0::/\n")
    share = cpu_share.current_share(tmp_path, proc)
    assert share == pytest.approx(1.5 / (os.cpu_count() or 1))


def test_current_share_v2_reads_cpu_max(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu\n")
    group = tmp_path / "a"
    group.mkdir()
    (group / "cpu.max").write_text("50000 100000\n")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a\n")
    assert cpu_share.current_share(tmp_path, proc) == pytest.approx(0.5 / (os.cpu_count() or 1))
    proc.write_text("0::/\n")
    assert cpu_share.current_share(tmp_path, proc) == 1.0


def test_sweep_removes_only_dead_runs_groups(tmp_path: Path) -> None:
    c = cpu_share.Controller(_v1(tmp_path), 1)
    dead = c.root / f"{cpu_share.PREFIX}999999999-1"  # no such pid
    mine = c.root / f"{cpu_share.PREFIX}{os.getpid()}-1"
    other = c.root / "somebody-else"
    for d in (dead, mine, other):
        d.mkdir()
    assert cpu_share.sweep(c) == [dead]
    assert not dead.exists() and mine.exists() and other.exists()


def test_the_group_is_entered_by_the_shell_before_the_command(tmp_path: Path) -> None:
    c = cpu_share.Controller(_v1(tmp_path), 1)
    g = cpu_share.CpuShare(0.5, controller=c)
    argv = g.argv(["make", "test"])
    assert argv[:2] == ["/bin/sh", "-c"] and argv[-2:] == ["make", "test"]
    assert str(g.procs_file) in argv and "exec" in argv[2]


def test_speed_index_is_the_median_of_reference_boots(tmp_path: Path) -> None:
    log = tmp_path / "speed.jsonl"
    ref = dict(speed.REFERENCE, accel="tcg", qemu="10.0.2")
    lines = [dict(ref, seconds=s) for s in (12.0, 11.0, 30.0)]
    lines += [dict(ref, arch="aarch64", seconds=60.0), dict(ref, secure_boot=True, seconds=20.0)]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + "garbage\n")
    index = speed.read_index(log)
    assert index is not None and index.boots == 3 and index.median_s == 12.0
    assert "12.0 s over 3 boots" in str(index)
    assert speed.read_index(tmp_path / "absent") is None


def test_boots_are_noted_only_when_the_run_keeps_a_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(speed.ENV_VAR, raising=False)
    speed.note_boot(dict(speed.REFERENCE), 1.0)  # nowhere to note it: nothing happens
    log = tmp_path / "speed.jsonl"
    monkeypatch.setenv(speed.ENV_VAR, str(log))
    speed.note_boot(dict(speed.REFERENCE), 1.25)
    speed.note_boot(dict(speed.REFERENCE), 2.5)
    assert speed.read_index(log) == speed.SpeedIndex(1.875, 2)


def test_cold_boots_are_summed_per_test_the_costliest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "speed.jsonl"
    monkeypatch.setenv(speed.ENV_VAR, str(log))
    for test, seconds in (("t.py::a", 10.0), ("t.py::b[x]", 4.0), ("t.py::a", 5.5), (None, 99.0)):
        if test is None:
            monkeypatch.delenv("PYTEST_CURRENT_TEST")  # a boot outside any test: not a row
        else:
            monkeypatch.setenv("PYTEST_CURRENT_TEST", f"{test} (call)")
        speed.note_boot(dict(speed.REFERENCE, arch="aarch64"), seconds)
    assert speed.cold_boots_by_test(log) == [speed.ColdBoots("t.py::a", 2, 15.5), speed.ColdBoots("t.py::b[x]", 1, 4.0)]
    assert speed.cold_boots_by_test(tmp_path / "absent") == []
