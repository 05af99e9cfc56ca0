"""What makes a snapshot directory valid (harness.snapshots.valid), on files made here."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
