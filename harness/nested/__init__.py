"""Nested virtualization: L1 specs, and reaching, checking and moving an L2 inside an L1.

An **L1** is a guest of the ``nested-l1`` image that runs hardware-assisted KVM inside.
:func:`l1_plan` decides how this host gives L1 virtualization extensions:

- a host whose KVM is usable and whose ``kvm_intel``/``kvm_amd`` has ``nested=1``:
  ``accel=kvm`` and ``-cpu host,+vmx`` (or ``+svm``).  KVM saves the L1 vCPU's nested
  state (``KVM_GET_NESTED_STATE``) into the migration stream's ``cpu/nested_state``
  subsection while L2 runs;
- everywhere else (this machine's PVM KVM, or ``accel='tcg'``): TCG with ``-cpu max``,
  which emulates SVM, so L1 loads ``kvm_amd nested=1``.  TCG has no KVM nested state: the
  SVM state of a vCPU caught in guest mode travels in TCG's own subsections
  (``cpu/svn_npt`` [sic], ``cpu/svm_guest``), or not at all when L1 was in host mode.

An **L2** (:class:`L2`) is started by L1's agent (``agent l2 start``: QEMU 7.2 inside L1,
split pflash OVMF with its varstore at ``/run/l2/vars.fd``, user networking forwarding
127.0.0.1:2222 inside L1 to L2's sshd).  The harness reaches L2's sshd through a
``direct-tcpip`` channel of L1's SSH session (same pinned host key and client key: the
images share them) and L2's QMP socket through a tiny helper it builds and copies into L1
(:func:`ensure_l1_helper`: L1's busybox has no client for unix sockets).

:func:`migrate_l2` is migration one level down: L1's QEMU live-migrates L2 to a second
QEMU inside L1.  :func:`run_cycles` moves L1 (live, save-restore, cpr-reboot,
cpr-transfer, or a cross-version live migration) and after every cycle checks L1 and L2:
same boot, heartbeat advanced, memory checksum intact, an EFI variable read back in the
guest and in the varstore file its firmware writes, and L2's observed pause.

Whether nested state was in the stream is read from the stream itself: the JSON
description QEMU appends to every precopy stream (:func:`stream_sections`), from the
cycle's state file when there is one, else from a device-state probe saved just before
the cycle (:func:`probe_sections`).

The parts:

- :mod:`harness.nested.plan`: L1 specs: how this host gives L1 virtualization extensions (l1_plan, l1_spec, pair_fields)
- :mod:`harness.nested.l1`: reaching QEMU inside L1: a unix-socket client built on the host and copied in (unixcat.c), L1Qmp
- :mod:`harness.nested.l2`: L2: starting it, reaching it, migrating it inside L1 (migrate_l2, through harness.migration's phases)
- :mod:`harness.nested.stream`: what a migration stream carried (its JSON description): nested state or not
- :mod:`harness.nested.cycles`: moving L1 and checking both levels after every cycle (run_cycles)
- :mod:`harness.nested.pair`: an L1 with its L2, owned; fast start from a saved pair (nested_pair)
- :mod:`harness.nested.common`: the names every part shares (paths inside L1, ports, variables)
"""

from __future__ import annotations

from harness.nested.common import (
    HELPER_PATH,
    KVM_NESTED_SECTIONS,
    L1_CYCLE_VAR,
    L1_IMAGE,
    L1_MEMORY_MB,
    L2_CYCLE_VAR,
    L2_DATA,
    L2_MODULE_DIR,
    L2_PORT,
    L2_RUN,
    L2_VARS_TEMPLATE,
    TCG_GUEST_MODE_SECTIONS,
)
from harness.nested.cycles import (
    GUEST_MODE_EXPLANATION,
    GUEST_MODE_LOAD_ERROR,
    QUIESCE_EXPLANATION,
    Attempts,
    NestedCycle,
    guest_mode_limitation,
    run_cycles,
)
from harness.nested.l1 import (
    L1Qmp,
    ensure_l1_helper,
    helper_binary,
)
from harness.nested.l2 import (
    L2,
    L2Start,
    dest_l2_argv,
    l2_running,
    l2_varstore_problem,
    migrate_l2,
    set_l2_running,
)
from harness.nested.pair import (
    PAIR_FORMAT,
    NestedTimings,
    ensure_pair_snapshot,
    nested_pair,
    pair_snapshot_key,
    restore_pair,
)
from harness.nested.plan import (
    L1Plan,
    l1_plan,
    l1_spec,
    pair_fields,
)
from harness.nested.stream import (
    _TAIL,
    QEMU_VM_VMDESCRIPTION,
    NestedEvidence,
    file_sections,
    nested_evidence,
    probe_sections,
    stream_sections,
)

__all__ = [
    "Attempts",
    "GUEST_MODE_EXPLANATION",
    "GUEST_MODE_LOAD_ERROR",
    "HELPER_PATH",
    "KVM_NESTED_SECTIONS",
    "L1Plan",
    "L1Qmp",
    "L1_CYCLE_VAR",
    "L1_IMAGE",
    "L1_MEMORY_MB",
    "L2",
    "L2Start",
    "L2_CYCLE_VAR",
    "L2_DATA",
    "L2_MODULE_DIR",
    "L2_PORT",
    "L2_RUN",
    "L2_VARS_TEMPLATE",
    "NestedCycle",
    "NestedEvidence",
    "NestedTimings",
    "PAIR_FORMAT",
    "QEMU_VM_VMDESCRIPTION",
    "QUIESCE_EXPLANATION",
    "TCG_GUEST_MODE_SECTIONS",
    "_TAIL",
    "dest_l2_argv",
    "ensure_l1_helper",
    "ensure_pair_snapshot",
    "file_sections",
    "guest_mode_limitation",
    "helper_binary",
    "l1_plan",
    "l1_spec",
    "l2_running",
    "l2_varstore_problem",
    "migrate_l2",
    "nested_evidence",
    "nested_pair",
    "pair_fields",
    "pair_snapshot_key",
    "probe_sections",
    "restore_pair",
    "run_cycles",
    "set_l2_running",
    "stream_sections",
]
