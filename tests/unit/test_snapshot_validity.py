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
    meta: dict[str, object] = {"key": root.name, "machine": "pc-q35-10.0", "state_size": 100,
                               "format": snapshots.SNAPSHOT_FORMAT}
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
    older = make(top / "older-format", image=True)  # restored a minute ago, but no key reaches it
    meta = json.loads((older / snapshots.META).read_text())
    del meta["format"]  # formats before 3 did not record theirs
    (older / snapshots.META).write_text(json.dumps(meta))
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
    expected = {old, older, broken, crashed, stale_lock}
    assert set(snapshots.prune(14 * 86400, dry_run=True)) == expected
    assert all(p.exists() for p in expected)
    assert set(snapshots.prune(14 * 86400)) == expected
    assert not any(p.exists() for p in expected)
    assert recent.exists() and making.exists() and live_lock.exists()
    assert [e.key for e in snapshots.entries()] == ["recent"]


def test_open_connections_in_slirps_table() -> None:
    """`info usernet` lines (QEMU 7.2 and 10.0 print the same columns)."""
    head = "Hub -1 (net0):\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\n"
    listener = "  TCP[HOST_FORWARD]  13       127.0.0.1 34637       10.0.2.15    22     0     0\n"
    assert not snapshots._OPEN_TCP.search(head + listener)
    for state in ("ESTABLISHED", "FIN_WAIT_1", "FIN_WAIT_2", "CLOSE_WAIT", "LAST_ACK", "SYN_SENT"):
        line = f"  TCP[{state}]   25       127.0.0.1 50312       10.0.2.15    22     0     0\n"
        assert snapshots._OPEN_TCP.search(head + listener + line), state
    for state in ("TIME_WAIT", "CLOSED"):
        line = f"  TCP[{state}]   25       127.0.0.1 50312       10.0.2.15    22     0     0\n"
        assert not snapshots._OPEN_TCP.search(head + listener + line), state
    assert not snapshots._OPEN_TCP.search(head + "  UDP[236 sec]     16       10.0.2.15   68   10.0.2.2   67     0     0\n")
