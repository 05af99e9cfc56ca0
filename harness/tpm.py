"""A vTPM per QEMU process: one ``swtpm`` owned like a QEMU, and what must survive a hop.

Each QEMU process of a guest with ``VmSpec(tpm=True)`` gets its own :class:`Swtpm` (state
directory in the guest's work directory, control socket in its private socket directory),
started before QEMU and reaped with it on every path (its parent-death signal is set like
QEMU's; ``--terminate`` also ends it when QEMU drops the connection).  A migration's
destination gets a fresh swtpm and state directory: QEMU carries the TPM's state in the
stream.  A restart of the guest in a new QEMU (power off, start) keeps the state directory.

Observed from the guest (:func:`observe`): the sha256 PCR bank (sysfs), a digest of the
firmware's measured-boot event log (securityfs), and the value of an NV index the harness
defines and writes through raw TPM2 commands on ``/dev/tpmrm0`` (the agent's ``tpm``
subcommand; the image has no tpm2-tools).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.machine import Machine

PCRS = tuple(range(24))
NV_INDEX = 0x01500016
# what the guest's kernel prints when its TPM driver gives up on the device at boot (the
# chip then has no /dev/tpm*): a command the vTPM answered later than the kernel waits
DRIVER_FAILURE_RE = re.compile(r"\]\s+(tpm\w* \S+: (?:Operation Timed out|A TPM error \(\d+\) occurred[^\n]*|"
                               r"[^\n]*(?:failed|timed out)[^\n]*))")  # fmt: skip


# --- the guest's view ---------------------------------------------------------------------


@dataclass
class TpmView:
    pcrs: dict[int, str] = field(default_factory=dict)  # sha256 bank
    event_log: str = ""  # sha256 of binary_bios_measurements, or why it is absent
    nv: str = ""  # hex of the NV index's data, or the error

    def to_json(self) -> dict[str, Any]:
        return {"pcrs": {str(k): v for k, v in self.pcrs.items()}, "event_log": self.event_log, "nv": self.nv}


def observe(vm: Machine) -> TpmView:
    data = vm.agent("tpm", "show", timeout=60)
    pcrs = {int(k): str(v) for k, v in dict(data.get("pcrs") or {}).items()}
    return TpmView(pcrs, str(data.get("event_log", "")), str(data.get("nv", "")))


def nv_write(vm: Machine, value: bytes) -> None:
    """Define the harness's NV index (8 bytes, owner/auth read-write; defining it again is
    fine) and write ``value`` (8 bytes) to it from inside the guest."""
    if len(value) != 8:
        raise ValueError("the harness's NV index holds exactly 8 bytes")
    vm.agent("tpm", "nvwrite", value.hex(), timeout=60)


def problems(before: TpmView, after: TpmView, where: str = "after the hop", *, same_boot: bool = True) -> list[str]:
    """What differs.  Across a hop (``same_boot``) the event log must be byte-identical;
    across a new boot only the PCRs and the NV index are compared: the log's
    EV_EFI_BOOT_SERVICES_APPLICATION events carry the image's load address, which differs
    from boot to boot while the measured digests (hence the PCRs) do not."""
    out = []
    if not before.pcrs:
        out.append(f"{where}: the guest saw no TPM PCRs before the hop")
    changed = [i for i in sorted(set(before.pcrs) | set(after.pcrs)) if before.pcrs.get(i) != after.pcrs.get(i)]
    if changed:
        i = changed[0]
        out.append(f"{where}: sha256 PCR(s) {', '.join(map(str, changed))} changed (PCR {i}: "
                   f"{before.pcrs.get(i)} -> {after.pcrs.get(i)})")  # fmt: skip
    if same_boot and before.event_log != after.event_log:
        out.append(f"{where}: the measured-boot event log changed ({before.event_log} -> {after.event_log})")
    if before.nv != after.nv:
        out.append(f"{where}: the TPM NV index {NV_INDEX:#x} reads {after.nv or '(nothing)'}, "
                   f"it held {before.nv or '(nothing)'}")  # fmt: skip
    return out


def driver_failures(console: Path) -> list[str]:
    """The TPM driver's failure lines on one console (``tpm tpm0: Operation Timed out``)."""
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return []
    return [m.group(1).strip()[:200] for m in DRIVER_FAILURE_RE.finditer(text)]


def driver_problems(vm: Machine, where: str) -> list[str]:
    """When the guest sees no TPM: why, from the console of the process running it (the
    kernel's TPM driver gave up during boot), as problems naming that console."""
    console = vm.current.resolved.serial_log
    if console is None:
        return []
    return [f"{where}: the guest's TPM driver failed at boot ({console.name}: {line}), so the guest "
            "has no TPM device" for line in driver_failures(console)]  # fmt: skip
