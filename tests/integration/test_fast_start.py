"""Issue 10: a booted guest saved once and restored per test: a fraction of a cold boot,
its own varstore copy, a fresh identity (instance id, clock, RNG), invalidated by inputs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import migration, snapshots, state
from harness.machine import Machine
from harness.spec import VmSpec

pytestmark = pytest.mark.integration


def test_snapshot_key_changes_with_every_input(tmp_path: Path) -> None:
    base = VmSpec(name="k1")
    key = snapshots.snapshot_key(Machine(base, tmp_path / "a"))
    assert snapshots.snapshot_key(Machine(base.replace(name="other"), tmp_path / "b")) == key
    for change in ({"qemu": "7.2"}, {"firmware": "2025.02"}, {"memory_mb": 768},
                   {"guest_mem_mb": 8}, {"memory_backend": "file"}, {"seed": "x"}):
        other = snapshots.snapshot_key(Machine(base.replace(**change), tmp_path / f"c{len(change)}{id(change)}"))
        assert other != key, change


Fresh = Callable[[VmSpec, str], Machine]


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Fresh]:
    """Unstarted machines in the test's directory, every one stopped at the end."""
    made: list[Machine] = []

    def make(spec: VmSpec, tag: str) -> Machine:
        m = Machine(spec, tmp_path / tag)
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in made:
            m.stop()


def test_restored_guests_are_fast_independent_and_fresh(fresh: Fresh) -> None:
    spec = VmSpec(name="fast")
    a = snapshots.start_fast(fresh(spec, "a"), make_template=lambda: fresh(spec, "tmpl"))
    t0 = time.monotonic()
    b = snapshots.start_fast(fresh(spec, "b"), make_template=lambda: fresh(spec, "tmpl2"))
    restore_s = time.monotonic() - t0
    assert a.ready and b.ready and a.ready.info["restored_from"] == b.ready.info["restored_from"]
    assert a.ready.info["instance_id"] != b.ready.info["instance_id"]
    # its own varstore copy, never the snapshot's file
    assert a.varstore_path != b.varstore_path
    assert a.varstore_path.parent == a.workdir
    snap = snapshots.valid(snapshots.snapshots_dir() / b.ready.info["restored_from"])
    assert snap is not None and snap.varstore is not None
    assert a.varstore_path.stat().st_size == snap.varstore.stat().st_size
    # a variable written in one restored guest is not in the other
    state.write_efivar(a, "FastOnlyA", b"a")
    assert state.read_efivar(b, "FastOnlyA") is None
    # the RAM is a copy-on-write map of the snapshot's RAM image: the state holds the
    # devices only, what one guest writes to RAM is not in the other nor in the image
    assert snap.ram is not None and snap.state.stat().st_size < 32 << 20
    a.ssh.run("echo only-a > /run/fast-only-a", check=True)
    assert b.ssh.run("test -e /run/fast-only-a").rc == 1
    assert snapshots.valid(snap.root) is not None  # size and mtime as sealed
    assert snap.ram.stat().st_mode & 0o222 == 0
    # fresh identity: the wall clock is the host's, the RNG differs
    for vm in (a, b):
        guest_now = float(vm.ssh.run("date +%s").stdout)
        assert abs(guest_now - time.time()) < 30
    # the console refresh refuses a bad clock, and answers the next line again
    a.console.mark()
    a.console.write("harness-refresh not-a-time 00 badnonce\n")
    a.console.wait_for("HARNESS-REFRESH-FAILED badnonce", 30, poll=0.01)
    snapshots.await_refresh(a, snapshots.request_refresh(a))
    assert abs(float(a.ssh.run("date +%s").stdout) - time.time()) < 30
    # the template's last SSH session ended before the save: a restored guest runs
    # dropbear's listener and the harness's one session, nothing of the template's
    ps = a.ssh.run("ps -o pid,ppid,comm").stdout.splitlines()
    dropbears = [line.split() for line in ps if line.split()[-1:] == ["dropbear"]]
    listeners = [d for d in dropbears if d[1] == "1"]
    assert len(listeners) == 1 and len(dropbears) == 2, ps
    # what a restored guest runs before its first login is cold code: the template was
    # saved quiet, the guest has no IPv6 to configure again, and QEMU's self-announce
    # was skipped for the load but is back for the hops that follow
    assert snap.meta["quiet"] is True, snap.meta
    assert a.ssh.run("cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6").stdout.strip() == "1"
    assert a.qmp("query-migrate-parameters")["announce-rounds"] > 0
    rnd_a = a.ssh.run("head -c 16 /dev/urandom | od -An -tx1").stdout
    rnd_b = b.ssh.run("head -c 16 /dev/urandom | od -An -tx1").stdout
    assert rnd_a != rnd_b
    # a restored guest migrates like any other
    assert migration.live(b).ok
    assert restore_s < 60


@pytest.mark.requires(mode="cpr-transfer")
def test_a_shared_ram_snapshot_is_a_mapped_ram_stream(fresh: Fresh) -> None:
    """A guest whose RAM is shared (memfd) has no RAM image: its snapshot's state holds
    the RAM, as a mapped-ram stream where the build offers it, and a restore reads only the
    pages that are not zero - the restored guest holds a fraction of its RAM."""
    spec = VmSpec(name="mapped", **migration.spec_fields_for("cpr-transfer"))
    vm = snapshots.start_fast(fresh(spec, "a"), make_template=lambda: fresh(spec, "tmpl"))
    assert vm.ready is not None
    snap = snapshots.valid(snapshots.snapshots_dir() / vm.ready.info["restored_from"])
    assert snap is not None and snap.ram is None
    assert snap.meta["stream_caps"] == ["mapped-ram"] == snapshots.stream_caps(vm), snap.meta
    st = snap.state.stat()
    assert st.st_size > spec.memory_mb << 20 > 2 * st.st_blocks * 512, st  # RAM at its offsets, sparse
    shmem_kb = next(int(line.split()[1]) for line in Path(f"/proc/{vm.process.pid}/status").read_text().splitlines()
                    if line.startswith("RssShmem:"))  # fmt: skip
    assert shmem_kb * 1024 < (spec.memory_mb << 20) // 2, f"the restored guest holds {shmem_kb} kB of shared RAM"
    after = state.snapshot(vm)  # the region the template wrote is whole
    assert after.mem_expected is not None and after.mem_checksum == after.mem_expected, after
    assert vm.qmp("query-migrate-capabilities") and not any(
        c["state"] for c in vm.qmp("query-migrate-capabilities") if c["capability"] == "mapped-ram")
    assert migration.cpr_transfer(vm).ok  # and it goes on like any other guest
