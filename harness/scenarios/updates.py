"""Back-to-back live updates and migrations of one guest: live, save-restore, cpr-reboot,
cpr-transfer, cpr-exec (the seed bug: a second consecutive update from one QEMU failing
with ``check_section_footer: Read section footer failed: -5``)."""

from __future__ import annotations

import logging
import time
from typing import Any

from harness import matrix, migration
from harness.errors import ConfigError
from harness.factory import MachineFactory
from harness.inventory import builds
from harness.inventory.catalog import DEFAULT_FIRMWARE, DEFAULT_QEMU
from harness.scenarios import ScenarioOptions, ScenarioReport, keeping_artifacts, scenario
from harness.spec import VmSpec

log = logging.getLogger(__name__)
UNTIL_FAIL_CAP = 1000


def run_updates(op: str, opts: ScenarioOptions) -> ScenarioReport:
    """Boot one UEFI guest on the first ``--qemu`` build and update it ``cycles`` times,
    alternating destination builds over all ``--qemu`` values (10.0 -> 10.0 ... by default).
    Each cycle is judged against the expected incompatibilities (an intermittent entry
    for the builds makes its signature an expected failure).  ``--set verify_ram=1``
    (live, save-restore): every hop also compares the guests' RAM before the new QEMU runs
    the guest.  ``--set fast=1`` restores the guest from a saved boot of the same inputs
    (:mod:`harness.snapshots`) instead of booting it cold."""
    report = ScenarioReport(op)
    incompat = matrix.load_incompatibilities(opts.extra.get("incompatibilities", matrix.INCOMPATIBILITIES))
    verify_ram = opts.flag("verify_ram")
    if verify_ram and op not in ("live", "save-restore"):
        raise ConfigError(f"--set verify_ram=1: the live and save-restore scenarios compare the guests' "
                          f"RAM, not {op}")  # fmt: skip
    t0 = time.monotonic()
    versions = opts.qemu or [DEFAULT_QEMU]
    qbuilds = [builds.get_build(v) for v in versions]
    cycles = opts.cycles if not opts.until_fail or opts.cycles > 1 else UNTIL_FAIL_CAP
    spec = VmSpec(qemu=qbuilds[0].label, firmware=(opts.ovmf or [DEFAULT_FIRMWARE])[0],
                  name=op.replace("-", ""), **migration.spec_fields_for(op))  # fmt: skip
    # a pinned versioned machine type, so every destination build creates the same machine
    caps = [b.capabilities for b in qbuilds]
    common = caps[0]
    machine = caps[0].resolve_machine("q35")
    for other in caps[1:]:
        machine = builds.newest_common_machine(common, other)
    spec = spec.replace(machine=machine)
    dests = qbuilds[1:] + qbuilds[:1] if len(qbuilds) > 1 else []
    with MachineFactory(spec, base=opts.workdir) as factory, keeping_artifacts(report, opts, factory, op) as run:
        vm = factory(fast=opts.flag("fast"))
        restored = vm.ready.info.get("restored_from") if vm.ready else None
        report.notes.append(f"guest ready in {vm.ready.seconds if vm.ready else 0:.1f} s on QEMU {qbuilds[0].label}"
                            + (f", restored from saved boot {restored}" if restored else ", booted cold"))  # fmt: skip

        def record(res: migration.MigrationResult) -> None:
            data: dict[str, Any] = res.to_json()
            verdict, expected = matrix.judge_result(res, incompat, scenario=op)
            report.add(matrix.record_verdict(data, verdict, expected), opts)

        results = migration.back_to_back(vm, op, cycles, builds=dests, on_cycle=record,
                                          until_fail=opts.until_fail, verify_ram=verify_ram)  # fmt: skip
        run.failed = any(not r.ok for r in results)  # an expected failure keeps its artifacts too
    report.duration_s = time.monotonic() - t0
    return report


@scenario("live", "back-to-back live migrations (unix socket precopy)")
def live(opts: ScenarioOptions) -> ScenarioReport:
    return run_updates("live", opts)


@scenario("save-restore", "back-to-back save to a state file and restore into a new QEMU")
def save_restore(opts: ScenarioOptions) -> ScenarioReport:
    return run_updates("save-restore", opts)


@scenario("cpr-reboot", "back-to-back cpr-reboot live updates (shared file RAM, x-ignore-shared)")
def cpr_reboot(opts: ScenarioOptions) -> ScenarioReport:
    return run_updates("cpr-reboot", opts)


@scenario("cpr-transfer", "back-to-back cpr-transfer live updates (memfd RAM over the cpr channel)")
def cpr_transfer(opts: ScenarioOptions) -> ScenarioReport:
    return run_updates("cpr-transfer", opts)


@scenario("cpr-exec", "back-to-back cpr-exec live updates (where a build's schema offers it)")
def cpr_exec(opts: ScenarioOptions) -> ScenarioReport:
    report = ScenarioReport("cpr-exec")
    for v in opts.qemu or [DEFAULT_QEMU]:
        b = builds.get_build(v)
        if not b.capabilities.has_mode("cpr-exec"):
            report.add({"op": "cpr-exec", "status": "unsupported", "ok": False,
                        "source": b.label, "destination": b.label,
                        "error": f"QEMU {b.label} lacks migration mode cpr-exec (its schema offers "
                                 f"{', '.join(b.capabilities.migration_modes)})"}, opts)  # fmt: skip
    if report.records:
        return report
    return run_updates("cpr-exec", opts)
