"""Capability requirements (``@pytest.mark.requires(...)``, scenario preconditions).

:func:`unmet` says, in words, which requirement a build or host does not meet, or None.
Capabilities come from the build's probed features and the host probe, never from a
version number unless the requirement is itself about the version.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from harness.errors import ConfigError
from harness.inventory.builds import QemuBuild
from harness.inventory.catalog import Version
from harness.inventory.host import HostInfo

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
    "==": operator.eq, "!=": operator.ne,
}  # fmt: skip

KNOWN = ("qemu", "mode", "modes", "capability", "file_uri", "accel", "nested", "arch", "kvm_host", "command")


def version_ok(have: Version, spec: str) -> bool:
    """``have`` satisfies ``spec`` (``">=8.2"``, ``"<10"``, ``"7.2"`` meaning ``==7.2.*``)."""
    m = re.match(r"^\s*(>=|<=|==|!=|>|<)?\s*(\d+(?:\.\d+)*)\s*$", spec)
    if not m:
        raise ConfigError(f"requires(qemu={spec!r}): expected e.g. '>=8.2' or '10.0'")
    op, ver = m.group(1), Version.parse(m.group(2))
    if op is None:
        return have.matches(ver)
    return _OPS[op](have, ver)


def unmet(build: QemuBuild | None, host: HostInfo, **req: Any) -> str | None:
    """The first requirement not met, in words naming the missing capability, else None."""
    unknown = sorted(set(req) - set(KNOWN))
    if unknown:
        raise ConfigError(f"requires(): unknown requirement(s) {unknown}; known: {list(KNOWN)}")
    if "accel" in req and host.accel.chosen != req["accel"]:
        return f"requires accel={req['accel']}; this host uses {host.accel.chosen}: {host.accel.reason}"
    if req.get("kvm_host") and not host.kvm.usable:
        return f"no VMX/SVM host: {host.kvm.reason}"
    if req.get("nested") and host.accel.chosen == "kvm" and not host.kvm.nested:
        return f"requires nested virtualization; kvm_{host.kvm.vendor} has nested=0"
    if build is None:
        return None
    caps = build.capabilities
    if "arch" in req and build.arch != req["arch"]:
        return f"requires arch {req['arch']}; QEMU {build.label} is {build.arch}"
    if "qemu" in req and not version_ok(Version.parse(caps.version), str(req["qemu"])):
        return f"requires QEMU {req['qemu']}; QEMU {build.label} is {caps.version}"
    modes = list(req.get("modes", ()))
    if "mode" in req:
        modes.append(req["mode"])
    for mode in modes:
        if not caps.has_mode(mode):
            return (f"QEMU {build.label} lacks migration mode {mode} "
                    f"(its schema offers {', '.join(caps.migration_modes)})")  # fmt: skip
    cap = req.get("capability")
    for c in [cap] if isinstance(cap, str) else list(cap or ()):
        if not caps.has_capability(c):
            return f"QEMU {build.label} lacks migration capability {c}"
    if req.get("file_uri") and not caps.file_uri:
        return f"QEMU {build.label} lacks file: migration URIs"
    if "command" in req and req["command"] not in caps.commands:
        return f"QEMU {build.label} lacks QMP command {req['command']}"
    return None


def describe(req: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in sorted(req.items()))
