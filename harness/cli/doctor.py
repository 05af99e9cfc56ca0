"""The facts ``harness doctor`` reports, gathered from the library (no printing here).

Doctor looks and never fetches: a build that is not provisioned, a missing ``qemu.machine``
or a missing host tool each become one line in ``missing`` naming the command that
provides it."""

from __future__ import annotations

from typing import Any

from harness.errors import HarnessError
from harness.guest.qemu_process import qemu_machine_missing
from harness.inventory import builds, catalog, host
from harness.inventory.provision import NotProvisioned, no_provisioning


def report(accel: str = "auto") -> dict[str, Any]:
    """Accelerator and why, KVM, every QEMU and firmware build, what is missing."""
    info = host.probe(accel)
    data: dict[str, Any] = info.to_json()
    missing: list[str] = []
    no_qmp = qemu_machine_missing()
    if no_qmp:
        missing.append(no_qmp)
    qemus: list[dict[str, Any]] = []
    with no_provisioning():
        for entry in catalog.default().qemu:
            label = {"label": entry.version, "version": entry.version, "arch": entry.arch}
            try:
                build = builds.from_catalog(entry)
                qemus.append(build.describe() if no_qmp is None
                             else {**label, "path": str(build.binary), "probed": False})
            except NotProvisioned as exc:
                qemus.append({**label, "not_provisioned": str(exc)})
            except HarnessError as exc:
                qemus.append({**label, "error": str(exc)})
        fws = _firmware()
    for tool, package in sorted(info.missing_tools.items()):
        missing.append(f"host tool {tool} is missing: `make host-packages` (or apt install "
                       f"{package}) installs it")  # fmt: skip
    usable_qemu = [q for q in qemus if "error" not in q and "not_provisioned" not in q]
    usable_fw = [f for f in fws if "error" not in f and "not_provisioned" not in f]
    if not usable_qemu:
        missing.append("no QEMU build is provisioned: `harness provision` fetches the catalogue's")
    if not usable_fw:
        missing.append("no firmware build is provisioned: `harness provision` fetches the catalogue's")
    data.update(qemu=qemus, firmware=fws, missing=missing, can_boot=not missing)
    return data


def _firmware() -> list[dict[str, Any]]:
    from harness.inventory import firmware

    out: list[dict[str, Any]] = []
    for entry in catalog.default().firmware:
        label = {"version": entry.version, "arch": entry.arch, "package": entry.package}
        try:
            fw = firmware.get_firmware(entry.version, entry.arch)
            d = fw.select()
            out.append({**label, "code": str(d.executable), "vars_template": str(d.nvram_template),
                        "flash_size": d.flash_size, "prefix": str(fw.prefix)})  # fmt: skip
        except NotProvisioned as exc:
            out.append({**label, "not_provisioned": str(exc)})
        except HarnessError as exc:
            out.append({**label, "error": str(exc)})
    return out
