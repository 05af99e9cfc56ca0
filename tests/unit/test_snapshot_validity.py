"""The snapshot cache's files: what makes a snapshot valid, and what prune removes (on
files made here)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import snapshots


def make(root: Path, *, image: bool) -> Path:
    root.mkdir()
    (root / snapshots.STATE).write_bytes(b"s" * 100)
    meta: dict[str, object] = {"key": root.name, "machine": "pc-q35-10.0", "state_size": 100}
    if image:
        ram = root / snapshots.RAM
        with ram.open("wb") as f:
            f.truncate(1 << 20)
        meta["ram_image"] = snapshots._seal(ram)
    (root / snapshots.META).write_text(json.dumps(meta))
    return root


def test_a_snapshot_with_a_ram_image(tmp_path: Path) -> None:
    snap = snapshots.valid(make(tmp_path / "k", image=True))
    assert snap is not None and snap.ram == tmp_path / "k" / snapshots.RAM
    assert snap.ram.stat().st_mode & 0o777 == 0o400  # sealed read-only


def test_a_snapshot_without_one_has_its_ram_in_the_state(tmp_path: Path) -> None:
    snap = snapshots.valid(make(tmp_path / "k", image=False))
    assert snap is not None and snap.ram is None


def test_a_ram_image_changed_since_it_was_sealed_invalidates_the_snapshot(tmp_path: Path) -> None:
    root = make(tmp_path / "k", image=True)
    ram = root / snapshots.RAM
    st = ram.stat()
    os.utime(ram, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # written since
    assert snapshots.valid(root) is None
    os.utime(ram, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert snapshots.valid(root) is not None
    os.chmod(ram, 0o600)
    with ram.open("r+b") as f:
        f.truncate(1 << 19)
    assert snapshots.valid(root) is None


def test_a_missing_ram_image_or_state_invalidates_it(tmp_path: Path) -> None:
    root = make(tmp_path / "a", image=True)
    (root / snapshots.RAM).unlink()
    assert snapshots.valid(root) is None
    root = make(tmp_path / "b", image=False)
    (root / snapshots.STATE).write_bytes(b"short")
    assert snapshots.valid(root) is None


def test_prune_removes_the_unused_the_invalid_and_what_crashed_runs_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    top = snapshots.snapshots_dir()
    recent = make(top / "recent", image=True)
    old = make(top / "old", image=True)
    month = 30 * 86400
    os.utime(old / snapshots.META, (time.time() - month, time.time() - month))
    broken = make(top / "broken", image=False)
    (broken / snapshots.STATE).write_bytes(b"cut short")
    dead = subprocess.Popen(["true"])
    dead.wait()
    crashed = top / f".k1.partial-{dead.pid}"
    crashed.mkdir()
    making = top / f".k2.partial-{os.getpid()}"  # its maker is alive: left alone
    making.mkdir()
    stale_lock = top / ".gone.lock"
    stale_lock.touch()
    os.utime(stale_lock, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    live_lock = top / ".recent.lock"
    live_lock.touch()
    os.utime(live_lock, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    expected = {old, broken, crashed, stale_lock}
    assert set(snapshots.prune(14 * 86400, dry_run=True)) == expected
    assert all(p.exists() for p in expected)
    assert set(snapshots.prune(14 * 86400)) == expected
    assert not any(p.exists() for p in expected)
    assert recent.exists() and making.exists() and live_lock.exists()
    assert [e.key for e in snapshots.entries()] == ["recent"]
