"""Nested virtualization: stream. (See :mod:`harness.nested`.)"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import (
    StateError,
)

if TYPE_CHECKING:
    from harness.machine import Machine
from harness.nested.common import KVM_NESTED_SECTIONS, TCG_GUEST_MODE_SECTIONS

log = logging.getLogger(__name__)


# --- what the stream carried ---------------------------------------------------------------

QEMU_VM_VMDESCRIPTION = 0x06
_TAIL = 16 << 20


def stream_sections(data: bytes) -> dict[str, list[str]]:
    """The vmstate sections of a saved precopy stream: ``{section: [subsection, ...]}``.

    Read from the JSON description QEMU appends after the end-of-stream marker (one
    ``0x06`` byte, a big-endian length, the JSON) to ``data`` (the tail of the stream is
    enough).  Raises :class:`StateError` when there is none (postcopy, or a machine with
    ``suppress-vmdesc``)."""
    end = len(data)
    i = data.rfind(b"{")
    while i >= 5:
        if data[i - 5] == QEMU_VM_VMDESCRIPTION and int.from_bytes(data[i - 4:i], "big") == end - i:
            try:
                desc = json.loads(data[i:end])
            except ValueError as exc:
                raise StateError(f"stream description at offset {i} is not JSON: {exc}") from exc
            if not isinstance(desc, dict) or "devices" not in desc:
                raise StateError(f"stream description at offset {i} has no devices: {str(desc)[:200]}")
            out: dict[str, list[str]] = {}
            for dev in desc["devices"]:
                name = str(dev.get("name"))
                subs = out.setdefault(name, [])
                subs += [s for s in _subsections(dev) if s not in subs]
            return out
        i = data.rfind(b"{", 0, i)
    raise StateError("no vmstate description at the end of the stream (postcopy or suppress-vmdesc?)")


def _subsections(node: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for sub in node.get("subsections", []) or []:
        names.append(str(sub.get("vmsd_name")))
        names += _subsections(sub)
    return names


def file_sections(path: Path) -> dict[str, list[str]]:
    """:func:`stream_sections` of a state file (only its tail is read)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        f.seek(max(0, size - _TAIL))
        return stream_sections(f.read())


@dataclass(frozen=True)
class NestedEvidence:
    """What a migration stream said about L1's vCPUs and L2."""

    source: str  # "state file" | "probe" | "none"
    kvm_nested_state: bool  # cpu/nested_state: KVM_GET_NESTED_STATE data (KVM L0)
    guest_mode: bool  # TCG's SVM guest-mode subsections: a vCPU was in L2 at the save
    cpu_subsections: tuple[str, ...]
    l0_accel: str
    l2_running: bool | None  # L2's QEMU reported status running (query-status in L1)
    verdict: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu_subsections"] = list(self.cpu_subsections)
        return data


def nested_evidence(sections: dict[str, list[str]] | None, *, source: str, l0_accel: str,
                    l2_running: bool | None) -> NestedEvidence:
    """Classify what a stream carried (``sections`` None: nothing could be read)."""
    subs = sorted({s for name, lst in (sections or {}).items() if name == "cpu" for s in lst})
    kvm = any(s in KVM_NESTED_SECTIONS for s in subs)
    guest = any(s in TCG_GUEST_MODE_SECTIONS for s in subs)
    if sections is None:
        verdict = "nested state: unknown (no stream description was read)"
    elif kvm:
        verdict = "nested state: present (cpu/nested_state, KVM L0): L2 survived with nested state"
    elif l0_accel == "tcg":
        if guest:
            verdict = ("nested state: absent (TCG L0); a vCPU was in L2 guest mode at the save "
                       "(TCG SVM subsections cpu/svn_npt or cpu/svm_guest carried it)")  # fmt: skip
        elif l2_running:
            verdict = ("nested state: absent (TCG L0); L2 running but the vCPU was in L1 at the "
                       "save: L2 survived without nested state")  # fmt: skip
        else:
            verdict = "nested state: absent (TCG L0); L2 was not running: L2 idle"
    elif l2_running:
        verdict = "nested state: absent although L2 ran on a KVM L0: L2 survived without nested state"
    else:
        verdict = "nested state: absent; L2 was not running: L2 idle"
    return NestedEvidence(source, kvm, guest, tuple(subs), l0_accel, l2_running, verdict)


def probe_sections(vm: Machine, path: Path | None = None) -> dict[str, list[str]]:
    """The vmstate sections of ``vm``'s stream now: a save that resumes the guest at once.

    The save asks for ``x-ignore-shared`` on shared guest RAM (switched off again
    afterwards): RAM in a shared file stays out of it, and the guest pauses for a fraction
    of a second.  QEMU 10.0.2 still writes memfd RAM whole (a 1 GiB guest's save: 146 MB
    in 1.1 s, 4.4 MB in 0.03 s with its RAM in a file; an L1 with an L2: 3.3 s)."""
    from harness import migration

    path = path or vm.workdir / f"probe-{time.monotonic_ns()}.state"
    shared = vm.spec.memory_backend != "plain" and vm.build.capabilities.has_capability("x-ignore-shared")
    caps = ["x-ignore-shared"] if shared else []
    try:
        migration.save(vm, path, capabilities=caps, resume=True, check=True)
        return file_sections(path)
    finally:
        if shared:
            migration.reset(vm.current.process, ["x-ignore-shared"], mode_param=False)
        with contextlib.suppress(OSError):
            path.unlink()


