"""Distro package validation with the provisioned packages passed as files.

The QEMU 7.2 packages (qemu-system-x86, -common, -data, seabios, ipxe-qemu .debs from the
provisioning cache) and the OVMF 2025.02 .deb are registered the way ``harness nightly
--qemu-deb ... --ovmf-deb ...`` registers them (:func:`harness.inventory.registry.register_from_options`),
then:

- the registered QEMU boots a UEFI guest and live-migrates to the reference 10.0.2 build
  and back, on the newest versioned machine type both offer (``pc-q35-7.2``), with guest
  state, the varstore file and ``BootOrder`` checked after each hop;
- the registered OVMF boots a varstore that OVMF 2022.11 instantiated from its template and
  the guest wrote (a variable, its own boot entry first in ``BootOrder``): the entry boots
  and everything the guest wrote is still there;
- a fresh interpreter given only ``$HARNESS_REGISTRY`` (what an xdist worker gets) finds both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import bootorder, matrix, state, survival, varstore
from harness.factory import MachineFactory
from harness.inventory import builds, firmware, registry
from harness.paths import cache_root
from harness.scenarios import ScenarioOptions
from harness.scenarios.cross_version import run_cross_version

pytestmark = pytest.mark.integration

DEBS = cache_root() / "debs"
QEMU_PKGS = ("qemu-system-x86_", "qemu-system-common_", "qemu-system-data_", "seabios_", "ipxe-qemu_")
REFERENCE = "10.0.2"
OLD_OVMF = "2022.11"


def _debs(key: str, prefixes: tuple[str, ...]) -> list[Path]:
    found = sorted(p for p in (DEBS / key).glob("*.deb") if p.name.startswith(prefixes))
    if len(found) != len(prefixes):
        pytest.skip(f"provisioned .debs missing under {DEBS / key} (run `make provision`)")
    return found


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry.Registration]:
    """The 7.2 QEMU debs and the 2025.02 OVMF deb registered for this module's run."""
    path = tmp_path_factory.mktemp("distro") / "registry.json"
    old_env = os.environ.pop(registry.ENV_VAR, None)
    args = argparse.Namespace(
        qemu_deb=_debs("qemu-7.2-x86_64", QEMU_PKGS),
        ovmf_deb=_debs("ovmf-2025.02-x86_64", ("ovmf_",)),
        qemu_dir=[],
    )
    reg = registry.register_from_options(args, path=path)
    try:
        yield reg
    finally:
        registry.forget(path)
        for label in reg.qemu:
            builds._REGISTERED.pop(label, None)
        if old_env is None:
            os.environ.pop(registry.ENV_VAR, None)
        else:
            os.environ[registry.ENV_VAR] = old_env


def test_registered_builds_are_what_the_packages_say(registered: registry.Registration) -> None:
    [qlabel] = registered.qemu
    [fver] = registered.firmware
    qb = builds.get_build(qlabel)
    assert qb.source.startswith("deb:1:7.2+dfsg")
    assert qb.capabilities.version.startswith("7.2.")  # probed from the binary itself
    assert "pc-q35-7.2" in qb.capabilities.machine_names()
    fw = firmware.get_firmware(fver)
    assert fw.debian_version.startswith("2025.02-") and fw.source.startswith("registered:")
    assert fw.select().vars_template.is_file()
    # an xdist worker has only the environment variable
    code = (f"from harness.inventory import builds, firmware\n"
            f"print(builds.get_build({qlabel!r}).capabilities.version)\n"
            f"print(firmware.get_firmware({fver!r}).version)\n")  # fmt: skip
    env = dict(os.environ, **{registry.ENV_VAR: str(registered.path)})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [qb.capabilities.version, fver]


def test_registered_qemu_migrates_to_and_from_the_reference(
    registered: registry.Registration, tmp_path: Path, harness_artifacts: Path
) -> None:
    [qlabel] = registered.qemu
    eps = matrix.endpoints([qlabel, REFERENCE])
    machine = matrix.newest_common_machine(eps)
    assert machine == "pc-q35-7.2"
    # one guest on the package's QEMU (restored from its saved boot): live to 10.0.2, then back
    name = f"distro {qlabel} <-> {REFERENCE}"
    hops = (matrix.Hop(qlabel, REFERENCE, "live", machine, name, 1),
            matrix.Hop(REFERENCE, qlabel, "live", machine, name, 2))  # fmt: skip
    plans = [matrix.Plan(name, "pair", qlabel, machine, hops)]
    report = run_cross_version(
        ScenarioOptions(qemu=[qlabel, REFERENCE], ovmf=[OLD_OVMF], workdir=tmp_path,
                        artifacts=harness_artifacts, extra={"fast": True}), plans=plans,
    )  # fmt: skip
    hops = [(r["source"], r["destination"]) for r in report.records]
    assert hops == [(qlabel, REFERENCE), (REFERENCE, qlabel)], report.records
    expected = [rec for rec in report.records if rec.get("expected_failure")]
    for rec in report.records:
        assert rec["machine"] == "pc-q35-7.2", rec
        if rec.get("expected_failure"):  # a finding the data names (an entry may name several)
            assert rec["signature"] in rec["expected_signatures"] and rec["reason"], rec
            continue
        assert rec["ok"], (
            f"{rec['source']} -> {rec['destination']}: {rec.get('status')} "
            f"{rec.get('error')} {rec.get('problems')}; artifacts: {report.artifacts}")
        assert rec["status"] == "completed" and rec["problems"] == []
        assert rec["downtime_ms"] is not None and rec["boot_order"]
    assert report.ok
    if expected:  # e.g. a source older than 9.0 losing dirty pages under TCG
        pytest.xfail("; ".join(f"{r['source']} -> {r['destination']}: {r['signature']} ({r['reason'][:120]})"
                               for r in expected))


def test_registered_ovmf_boots_an_older_firmwares_varstore(
    registered: registry.Registration, vm_factory: MachineFactory, tmp_path: Path
) -> None:
    [fver] = registered.firmware
    # a guest of OVMF 2022.11 (restored from its saved boot: its varstore is the template's
    # copy that OVMF 2022.11 wrote its boot entries into) writes to its varstore
    old = vm_factory(firmware=OLD_OVMF, name="distro-old-ovmf", fast=True)
    assert old.varstore_template == firmware.get_firmware(OLD_OVMF).select().vars_template
    planted = survival.plant(old)
    assert planted.boot_order and planted.boot_order[0] == bootorder.USER_ENTRY
    guest_vars = state.guest_variables(old)
    state.poweroff(old)
    path = tmp_path / "vars.fd"
    shutil.copyfile(old.varstore_path, path)
    survival.assert_no_problems(survival.view_problems(path, guest_vars),
                                f"varstore file after poweroff on OVMF {OLD_OVMF}")  # fmt: skip
    written = varstore.read_varstore(path)
    assert written.boot_order[: len(planted.boot_order)] == list(planted.boot_order)

    # the package's OVMF boots the same file: the guest's entry boots, its writes are there
    new = vm_factory(firmware=fver, varstore=path, name="distro-new-ovmf")
    assert new.varstore_path == path
    assert new.firmware_code == firmware.get_firmware(fver).select().code
    bootorder.assert_booted(new, bootorder.USER_ENTRY)
    survival.assert_persisted(new, planted, order_may_grow=True,
                              what=f"booting OVMF {fver} on a {OLD_OVMF} varstore")  # fmt: skip


# --- a newer suite's own packages (their C library resolved from their suite) ------------

TRIXIE_QEMU = "qemu-10.0.13-x86_64"  # the provisioned closure of trixie's QEMU, .debs as apt got them


def _nightly_of_trixies_debs(tmp_path: Path, *args: str) -> tuple[str, list[dict[str, Any]]]:
    """``harness nightly`` handed the five .debs apt downloaded for Debian 13's QEMU (on
    this Debian 12 host), with ``args``: the package's label and the run's records.  The
    registered build brings trixie's own C library and runs through its loader (the prefix
    the nightly unpacked is content-addressed: registering again reuses it)."""
    debs = _debs(TRIXIE_QEMU, QEMU_PKGS)
    pkgdir = tmp_path / "trixie-debs"
    pkgdir.mkdir()
    for d in debs:
        (pkgdir / d.name).write_bytes(d.read_bytes())
    label = f"deb:{registry_version(debs)}"
    root = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != registry.ENV_VAR}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("harness")), "nightly",
         *[a for d in sorted(pkgdir.glob("*.deb")) for a in ("--qemu-deb", str(d))],
         "--qemu", label, *args, "--results-root", str(root)],
        capture_output=True, text=True, timeout=1800, check=False, env=env,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert f"registered: QEMU {label}" in out
    [run_dir] = [d for d in root.iterdir() if d.is_dir()]
    records: list[dict[str, Any]] = json.loads((run_dir / "results.json").read_text())["records"]
    assert records and all(r["outcome"] == "passed" for r in records), [(r["id"], r["outcome"]) for r in records]
    build = registry.register_qemu_debs(sorted(pkgdir.glob("*.deb")))
    assert build.label == label and build.loader is not None
    assert build.loader.is_relative_to(build.prefix or Path("/nonexistent"))
    assert registry.needs_newer_libc(build.binary), "trixie's QEMU should need a newer glibc"
    return label, records


def test_nightly_boots_trixies_own_packages(tmp_path: Path) -> None:
    """What a distro validator does with Debian 13's QEMU: the nightly registers the .debs,
    resolves their closure from trixie and boots a UEFI guest on them (crossing them with
    the reference is the next test's, in the nightly's exhaustive row)."""
    label, records = _nightly_of_trixies_debs(tmp_path, "--ovmf", OLD_OVMF, "--scenario", "boot")
    [rec] = records
    assert tuple(rec["qemu"]) == (label,), rec
    [step] = rec["steps"]
    assert step["op"] == "boot" and step["source"] == label and step["ok"], step


@pytest.mark.exhaustive  # the crossing of another suite's package; the boot above runs in make test
def test_nightly_runs_trixies_own_packages_against_the_reference(tmp_path: Path) -> None:
    """The nightly crosses trixie's packages with the reference build, both ways."""
    label, records = _nightly_of_trixies_debs(tmp_path, "--qemu", REFERENCE, "--ovmf", OLD_OVMF,
                                              "--scenario", "cross-version", "--jobs", "2")  # fmt: skip
    pairs = {tuple(r["qemu"]) for r in records if r["scenario"] == "cross-version"}
    assert {(label, REFERENCE), (REFERENCE, label)} <= pairs, pairs
    hops = [s for r in records for s in r["steps"]]
    assert {(s["source"], s["destination"]) for s in hops} >= {(label, REFERENCE), (REFERENCE, label)}
    assert all(s["ok"] and s["status"] == "completed" for s in hops), hops


def registry_version(debs: list[Path]) -> str:
    from harness.inventory.provision import deb_field

    [qemu] = [d for d in debs if d.name.startswith("qemu-system-x86_")]
    return deb_field(qemu, "Version").split(":", 1)[-1]
