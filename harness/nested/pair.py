"""Nested virtualization: pair. (See :mod:`harness.nested`.)"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from harness.errors import StateError

if TYPE_CHECKING:
    from harness.factory import MachineFactory
    from harness.machine import Machine
    from harness.snapshots import Snapshot
    from harness.spec import RamImage
from harness.nested.l2 import L2, L2Start, set_l2_running
from harness.nested.plan import L1Plan

log = logging.getLogger(__name__)


# --- an L1 with its L2, owned; fast start from a saved pair ------------------------------------

PAIR_FORMAT = 2  # 2: L2's vCPUs paused for the save, continued after the restore


@dataclass
class NestedTimings:
    """How long the pair took to come up (a restored pair also carries the cold timings
    measured when its snapshot was made)."""

    l1_boot_s: float | None = None
    l2_start_s: float | None = None
    l2_ready_s: float | None = None
    restored_s: float | None = None
    snapshot: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pair_snapshot_key(l1: Machine, l2_opts: dict[str, Any]) -> str:
    """The key of a saved L1-with-running-L2: the L1 snapshot key plus L2's options."""
    from harness import snapshots

    text = json.dumps({"format": PAIR_FORMAT, "l1": snapshots.snapshot_key(l1), "l2": l2_opts},
                      sort_keys=True)  # fmt: skip
    return "nested-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def _cold_pair(l1: Machine, plan: L1Plan, l2_opts: dict[str, Any],
               ram_image: RamImage | None = None) -> tuple[L2, NestedTimings]:
    t0 = time.monotonic()
    l1.start(ram_image=ram_image)
    timings = NestedTimings(l1_boot_s=l1.ready.seconds if l1.ready else time.monotonic() - t0)
    l2 = L2(l1)
    started = l2.start(**l2_opts)
    timings.l2_start_s, timings.l2_ready_s = round(started.wall_s, 2), started.ready_s
    return l2, timings


def ensure_pair_snapshot(template: Machine, plan: L1Plan, l2_opts: dict[str, Any]) -> Snapshot:
    """The saved pair for ``template``'s inputs (a :class:`harness.snapshots.Snapshot`
    whose meta also holds L2's start record and the cold timings), made if missing: the
    unstarted ``template`` boots, starts L2, is saved with L2's vCPUs paused (continued by
    :func:`restore_pair`), and is stopped."""
    from harness import snapshots

    def boot(image: RamImage | None) -> dict[str, Any]:
        l2, timings = _cold_pair(template, plan, l2_opts, image)
        assert l2.started is not None
        # L2's vCPUs paused for the cut: with none inside KVM_RUN, L1's vCPU cannot be
        # in L2 guest mode, which a TCG L0's stream cannot carry (a snapshot cut there
        # never restores: GUEST_MODE_LOAD_ERROR, seen on a fresh cache)
        set_l2_running(l2, False)
        l2.close()
        return {"boot_s": timings.l1_boot_s, "l2": asdict(l2.started), "l2_opts": l2_opts,
                "timings": timings.to_json(), "l2_paused": True}  # fmt: skip

    return snapshots.create(pair_snapshot_key(template, l2_opts), template, boot, lock_timeout=7200)


def restore_pair(l1: Machine, snap: Snapshot, *, timeout: float = 300.0) -> tuple[L2, NestedTimings]:
    """Start the unstarted ``l1`` from a saved pair and check that its L2 still answers
    (same L2 boot, heartbeat ticking)."""
    from harness import snapshots

    t0 = time.monotonic()
    snapshots.restore_machine(l1, snap, timeout=timeout)
    l2 = L2(l1)
    meta = snap.meta
    l2.started = L2Start(**meta["l2"])
    try:
        if meta.get("l2_paused"):
            set_l2_running(l2, True)  # paused for the save (see ensure_pair_snapshot)
        l2.ssh.connect(timeout=timeout)
        # one command for the boot id and the first heartbeat: an L2 pays about a second
        # for any command (its fork and exec, many exits to L1's KVM)
        status = l2.agent("status")
        if status.get("boot_id") != l2.started.boot_id:
            raise StateError(f"restored L2 has boot id {status.get('boot_id')}, the saved L2 had "
                             f"{l2.started.boot_id}")  # fmt: skip
        first = status.get("heartbeat")
        if not isinstance(first, dict) or "count" not in first:
            raise StateError(f"restored L2 reports no heartbeat: {status}")
        deadline = time.monotonic() + 60
        while int(l2.agent("heartbeat")["count"]) <= int(first["count"]):
            if time.monotonic() > deadline:
                raise StateError(f"restored L2's heartbeat stands still at {first['count']}")
            time.sleep(0.3)
    except BaseException:
        l2.close()
        raise
    cold = meta.get("timings") or {}
    timings = NestedTimings(cold.get("l1_boot_s"), cold.get("l2_start_s"), cold.get("l2_ready_s"),
                            round(time.monotonic() - t0, 2), snap.key)  # fmt: skip
    return l2, timings


@contextlib.contextmanager
def nested_pair(factory: MachineFactory, plan: L1Plan, *, fast: bool = True, l2_mem_mb: int = 512,
                l2_timeout: float = 3000.0) -> Iterator[tuple[Machine, L2, NestedTimings]]:
    """An L1 from ``plan`` made by ``factory`` (a :class:`~harness.factory.MachineFactory`,
    which owns and reaps L1) with its L2 running; L2 is stopped on exit.

    ``fast`` restores the pair from a saved L1 whose L2 was running (made once, cold, per
    set of inputs; a UEFI L2 under a TCG L0 takes many minutes to boot) instead of booting
    both."""
    l2_opts = {"accel": "kvm", "irqchip": plan.l2_irqchip, "boot": "uefi", "mem_mb": l2_mem_mb,
               "timeout": l2_timeout}  # fmt: skip
    fields = plan.spec.to_json()
    l1 = factory(start=False, **fields)
    if fast:
        snap = ensure_pair_snapshot(factory(start=False, **{**fields, "name": "l1tmpl"}), plan, l2_opts)
        l2, timings = restore_pair(l1, snap)
    else:
        l2, timings = _cold_pair(l1, plan, l2_opts)
    try:
        yield l1, l2, timings
    finally:
        l2.stop()
