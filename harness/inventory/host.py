"""What this host can do: the accelerator (decided by evidence, with the reason), nested
virtualization, and the host tools the harness runs.

``/dev/kvm`` existing proves nothing: on a PVM host (``kvm_pvm`` loaded, no vmx/svm in
``/proc/cpuinfo``) KVM only runs specially built guest kernels, and an ordinary guest dies
with ``KVM internal error. Suberror: 1``.  So KVM is chosen only when the CPU exposes VMX
or SVM, the matching KVM module is loaded, and ``/dev/kvm`` opens read-write.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from harness.errors import HostError

Accel = Literal["kvm", "tcg"]

# tool -> Debian package that provides it (doctor names the package when one is missing)
HOST_TOOLS: dict[str, str] = {
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "tar": "tar",
    "xz": "xz-utils",
    "zstd": "zstd",
    "cpio": "cpio",
    "objcopy": "binutils",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mke2fs": "e2fsprogs",
    "cc": "gcc",  # a small static QMP client copied into nested L1 guests (harness.nested)
    "sbsign": "sbsigntool",  # Secure Boot: signed images
    "sbvarsign": "sbsigntool",  # Secure Boot: signed authenticated variable writes
    # the x86 kernel's boot wrapper rebuilt around an LZ4 payload (harness.images.kernel)
    "make": "make",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "lz4": "lz4",
}


@dataclass(frozen=True)
class KvmInfo:
    """KVM on this host: present, usable for ordinary guests, nested-capable, and why."""

    present: bool
    usable: bool
    nested: bool
    vendor: str | None
    pvm: bool
    reason: str


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator the harness will use and why."""

    chosen: Accel
    reason: str


@dataclass(frozen=True)
class HostInfo:
    """Everything ``doctor`` reports about the host itself."""

    kvm: KvmInfo
    accel: AccelChoice
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    missing_tools: dict[str, str] = field(default_factory=dict)
    ncpus: int = 1

    def to_json(self) -> dict[str, object]:
        return {
            "accel": asdict(self.accel),
            "kvm": asdict(self.kvm),
            "ncpus": self.ncpus,
            "missing_tools": [
                {"tool": t, "package": p} for t, p in sorted(self.missing_tools.items())
            ],
        }


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first CPU in ``/proc/cpuinfo`` text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def probe_kvm(
    sysfs: Path = Path("/sys"),
    proc: Path = Path("/proc"),
    dev: Path = Path("/dev/kvm"),
) -> KvmInfo:
    """Decide from evidence whether KVM can run ordinary guests here."""
    flags = cpu_flags(_read(proc / "cpuinfo") or "")
    modules = sysfs / "module"
    pvm = (modules / "kvm_pvm").exists()
    vendor = "intel" if "vmx" in flags else "amd" if "svm" in flags else None
    present = dev.exists()
    nested = False
    if vendor is not None:
        param = _read(modules / f"kvm_{vendor}" / "parameters" / "nested")
        nested = param is not None and param.strip() in ("1", "Y", "y")
    if not present:
        return KvmInfo(False, False, False, vendor, pvm, f"{dev} does not exist")
    if vendor is None:
        why = "no vmx/svm in /proc/cpuinfo"
        if pvm:
            why = (
                "KVM here is PVM (kvm_pvm loaded, " + why + "): it runs only PVM guest "
                "kernels; ordinary guests fail with 'KVM internal error'"
            )
        return KvmInfo(True, False, False, None, pvm, why)
    if not (modules / f"kvm_{vendor}").exists():
        return KvmInfo(True, False, False, vendor, pvm, f"module kvm_{vendor} is not loaded")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmInfo(True, False, nested, vendor, pvm, f"{dev} is not readable and writable")
    why = f"{'VMX' if vendor == 'intel' else 'SVM'} with kvm_{vendor} loaded"
    why += f"; nested={'on' if nested else 'off'}"
    return KvmInfo(True, True, nested, vendor, pvm, why)


def choose_accel(kvm: KvmInfo, wanted: str = "auto") -> AccelChoice:
    """The accelerator for ``--accel wanted`` (auto, kvm, tcg)."""
    if wanted not in ("auto", "kvm", "tcg"):
        raise HostError(f"--accel must be auto, kvm or tcg, not {wanted!r}")
    if wanted == "tcg":
        return AccelChoice("tcg", "asked for TCG")
    if kvm.usable:
        return AccelChoice("kvm", f"KVM usable: {kvm.reason}")
    if wanted == "kvm":
        raise HostError(f"--accel kvm asked for, but KVM is unusable: {kvm.reason}")
    return AccelChoice("tcg", f"KVM unusable ({kvm.reason}); falling back to TCG")


def missing_tools() -> dict[str, str]:
    """Host tools not on PATH, with the Debian package that provides each."""
    return {tool: pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None}


def probe(wanted_accel: str = "auto") -> HostInfo:
    """Probe the host."""
    kvm = probe_kvm()
    return HostInfo(
        kvm=kvm,
        accel=choose_accel(kvm, wanted_accel),
        cpu_flags=cpu_flags(_read(Path("/proc/cpuinfo")) or ""),
        missing_tools=missing_tools(),
        ncpus=os.cpu_count() or 1,
    )


_ACCEL_OVERRIDE: str = os.environ.get("HARNESS_ACCEL", "auto")


def default_accel() -> Accel:
    """The accelerator for guests started without an explicit one (``HARNESS_ACCEL``)."""
    return choose_accel(probe_kvm(), os.environ.get("HARNESS_ACCEL", _ACCEL_OVERRIDE)).chosen
