"""The soak's leak count looks in /dev/shm too: a guest-RAM directory orphaned while a
piece ran (its owner gone) is a leftover, one that was there before the piece is not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from harness.cli.commands import soak

SHM = Path("/dev/shm")


def _gone_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_leaks_count_guest_ram_dirs_orphaned_during_the_piece(tmp_path: Path) -> None:
    rundir = tmp_path / "run"
    rundir.mkdir()
    earlier = SHM / f"hv-ram-{_gone_pid()}-before"
    during = SHM / f"hv-ram-{_gone_pid()}-during"
    try:
        earlier.mkdir()
        before = soak._shm_orphans()
        during.mkdir()
        (during / "guest-ram").write_bytes(b"\0" * 4096)
        leaks = soak._leaks(rundir, before)
        assert str(during) in leaks["files"] and str(earlier) not in leaks["files"]
        assert leaks["file_count"] >= 1  # (another test may orphan one at the same moment)
    finally:
        shutil.rmtree(earlier, ignore_errors=True)
        shutil.rmtree(during, ignore_errors=True)
