"""One lock for a private apt state, taken by every apt call on it: two callers on a cold
cache (here two processes, as two xdist workers would be) never run apt at the same time
on one state.  apt itself is a stand-in on PATH that records when it runs; the real apt
under the same lock is tested in tests/integration/test_install.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FAKE_APT = """#!/bin/sh
# a stand-in apt-get/apt-cache: note when it ran, take a while, succeed
echo "start $(date +%s.%N) $$" >> "$APT_TRACE"
sleep 0.4
echo "end $(date +%s.%N) $$" >> "$APT_TRACE"
"""

CALLER = """
import sys
from pathlib import Path
from harness.inventory.provision import AptArchive
a = AptArchive(Path(sys.argv[1]), ("bookworm",), mirror="http://deb.debian.org/debian")
a.update()
a._run("apt-get", ["download", "hello"])
"""


def test_two_cold_callers_never_run_apt_at_once(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "apt-cache"):
        (bin_dir / tool).write_text(FAKE_APT)
        (bin_dir / tool).chmod(0o755)
    trace = tmp_path / "trace"
    root = tmp_path / "apt"  # cold: does not exist yet
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "APT_TRACE": str(trace)}
    procs = [subprocess.Popen([sys.executable, "-c", CALLER, str(root)], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    events = [line.split() for line in trace.read_text().splitlines()]
    # one `apt-get update` (the second caller, waiting on the lock, then finds the lists
    # fresh) and two downloads, each a start and an end
    assert len(events) == 6, events
    running = 0
    for kind, _, _ in sorted(events, key=lambda e: float(e[1])):
        running += 1 if kind == "start" else -1
        assert running <= 1, f"two apt calls ran at once on one state: {json.dumps(events)}"
    assert (root / ".apt.lock").exists()
