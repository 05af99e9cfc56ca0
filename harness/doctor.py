"""The facts ``harness doctor`` reports, gathered from the library (no printing here)."""

from __future__ import annotations

from typing import Any

from harness import builds, catalog, host
from harness.errors import HarnessError


def report(accel: str = "auto") -> dict[str, Any]:
    """Accelerator and why, KVM, every QEMU and firmware build, missing host tools."""
    info = host.probe(accel)
    data: dict[str, Any] = info.to_json()
    qemus: list[dict[str, Any]] = []
    for entry in catalog.default().qemu:
        try:
            qemus.append(builds.from_catalog(entry).describe())
        except HarnessError as exc:
            qemus.append({"label": entry.version, "version": entry.version, "error": str(exc)})
    data["qemu"] = qemus
    fws: list[dict[str, Any]] = []
    try:
        from harness import firmware

        for fw in firmware.all_firmware():
            d = fw.select()
            fws.append(
                {"version": fw.version, "arch": fw.arch, "package": fw.package,
                 "code": str(d.executable), "vars_template": str(d.nvram_template),
                 "flash_size": d.flash_size, "prefix": str(fw.prefix)}
            )  # fmt: skip
    except (HarnessError, ImportError, AttributeError) as exc:
        fws.append({"version": "?", "error": str(exc)})
    data["firmware"] = fws
    data["can_boot"] = any("error" not in q for q in qemus) and not info.missing_tools
    return data
