"""Nested virtualization: plan. (See :mod:`harness.nested`.)"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from harness.errors import (
    ConfigError,
    HostError,
    UnsupportedError,
)
from harness.inventory.catalog import DEFAULT_QEMU
from harness.inventory.host import KvmInfo, probe_kvm
from harness.spec import VmSpec

if TYPE_CHECKING:
    from harness.inventory.builds import QemuBuild
from harness.nested.common import L1_IMAGE, L1_MEMORY_MB

log = logging.getLogger(__name__)


# --- L1 specs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class L1Plan:
    """How this host runs an L1 with virtualization extensions, and what to expect of it."""

    spec: VmSpec
    accel: str  # "kvm" | "tcg"
    vendor: str | None  # "intel" | "amd" on a KVM host, "amd" (emulated SVM) on TCG
    nested_state_expected: bool  # KVM L0: cpu/nested_state in the stream while L2 runs
    l2_irqchip: str  # "user" on a TCG L0 (see guests/README.md), "kernel" on KVM
    reason: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_json()
        return data


def l1_plan(
    kvm: KvmInfo | None = None,
    *,
    accel: str = "auto",
    qemu: str = DEFAULT_QEMU,
    machine: str = "q35",
    memory_mb: int = L1_MEMORY_MB,
    name: str = "l1",
    **fields: Any,
) -> L1Plan:
    """The L1 spec for this host (``kvm`` defaults to :func:`harness.inventory.host.probe_kvm`).

    ``accel='auto'`` uses KVM when it is usable and raises :class:`UnsupportedError` when
    its nested parameter is off (on a real host KVM must be used: load the module with
    ``nested=1``); without usable KVM it uses TCG.  ``fields`` are more spec fields
    (memory backend for CPR, firmware, ...)."""
    if accel not in ("auto", "kvm", "tcg"):
        raise HostError(f"L1 accel must be auto, kvm or tcg, not {accel!r}")
    kvm = kvm if kvm is not None else probe_kvm()
    base = {"image": L1_IMAGE, "qemu": qemu, "machine": machine, "memory_mb": memory_mb,
            "name": name, "nested": True, **fields}  # fmt: skip
    use_kvm = accel == "kvm" or (accel == "auto" and kvm.usable)
    if use_kvm:
        if not kvm.usable:
            raise UnsupportedError("usable KVM", "this host", kvm.reason)
        if not kvm.nested or kvm.vendor is None:
            raise UnsupportedError(
                "nested virtualization", f"this host's kvm_{kvm.vendor}",
                f"{kvm.reason}; reload it with nested=1 (modprobe kvm_{kvm.vendor} nested=1)",
            )  # fmt: skip
        flag = "vmx" if kvm.vendor == "intel" else "svm"
        spec = VmSpec(**{**base, "accel": "kvm", "cpu": f"host,+{flag}"})
        return L1Plan(spec, "kvm", kvm.vendor, True, "kernel",
                      f"KVM L0 ({flag.upper()}, nested=1): L1 runs -cpu host,+{flag}; "
                      "KVM nested state travels in cpu/nested_state")  # fmt: skip
    why = "asked for TCG" if accel == "tcg" else f"KVM unusable ({kvm.reason})"
    spec = VmSpec(**{**base, "accel": "tcg", "cpu": "max"})
    return L1Plan(spec, "tcg", "amd", False, "user",
                  f"TCG L0 ({why}): -cpu max emulates SVM, L1 loads kvm_amd nested=1; "
                  "no KVM nested state exists on a TCG L0")  # fmt: skip


def pair_fields(qemu_builds: Sequence[QemuBuild], ram: str = "memfd") -> dict[str, Any]:
    """Spec fields one L1 needs to go through every operation the builds share: shared
    RAM, plus ``aux_ram_share`` when every build offers cpr-transfer.  One set of fields
    for the modes means one saved pair serves them.

    ``ram`` ``memfd``: a live hop copies L1's RAM to the destination, as between hosts;
    a cpr-reboot copies all of it to its state file too (2 GiB: 6.5-9.7 s of pause here).
    ``file`` (a file in a private tmpfs directory): cpr-reboot keeps L1's RAM in place
    (``x-ignore-shared``, as QEMU's CPR documentation has it) and cpr-transfer hands the
    file over; a live hop copies no RAM (one host: source and destination map the same
    file).  save-restore writes all RAM either way."""
    if ram not in ("memfd", "file"):
        raise ConfigError(f"nested L1 RAM {ram!r}; expected 'memfd' or 'file'")
    if not all(b.capabilities.has_capability("x-ignore-shared") for b in qemu_builds):
        return {}  # plain RAM: no build here keeps shared RAM out of a stream
    fields: dict[str, Any] = {"memory_backend": ram}
    if all(b.capabilities.has_mode("cpr-transfer") for b in qemu_builds):
        fields["aux_ram_share"] = True
    return fields


def l1_spec(kvm: KvmInfo | None = None, **kw: Any) -> VmSpec:
    """Just the spec of :func:`l1_plan`."""
    return l1_plan(kvm, **kw).spec
