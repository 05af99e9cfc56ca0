"""Migrate and live-update an L1 while its L2 keeps running (``harness repro nested``).

``--mode`` picks what moves: ``live``, ``save-restore``, ``cpr-reboot`` or ``cpr-transfer``
of L1 (destinations alternate over ``--qemu``: ``--qemu 7.2 --qemu 10.0.2`` is a
cross-version L1 migration on the newest machine type both builds share), or
``nested-live``: L1's QEMU live-migrates L2 inside L1.  Every cycle records L2's observed
pause, its heartbeat, its EFI variable (in L2 and in its varstore file inside L1), L1's
own checks, and what the stream said about nested state.
"""

from __future__ import annotations

import os
import time
from typing import Any

from harness import migration, nested
from harness.errors import ConfigError, UnsupportedError
from harness.factory import MachineFactory
from harness.inventory import builds
from harness.inventory.catalog import DEFAULT_QEMU
from harness.scenarios import ScenarioOptions, ScenarioReport, keeping_artifacts, scenario

MODES = ("live", "save-restore", "cpr-reboot", "cpr-transfer", "nested-live")


def run_nested(opts: ScenarioOptions) -> ScenarioReport:
    """Boot an L1 (this host's :func:`~harness.nested.l1_plan`), start its L2, run the
    cycles, and report one record per cycle."""
    mode = opts.mode or "live"
    if mode not in MODES:
        raise ConfigError(f"nested: --mode {mode!r}; expected one of {', '.join(MODES)}")
    report = ScenarioReport("nested")
    t0 = time.monotonic()
    versions = opts.qemu or [DEFAULT_QEMU]
    qbuilds = [builds.get_build(v) for v in versions]
    # one build: the unversioned machine (the same L1 spec, and saved pair, as the tests);
    # several: the newest machine type they all offer
    machine = "q35"
    for other in qbuilds[1:]:
        machine = builds.newest_common_machine(qbuilds[0].capabilities, other.capabilities)
    dests = qbuilds[1:] + qbuilds[:1] if len(qbuilds) > 1 else []
    # a live hop copies L1's RAM (memfd); the other modes keep it in a file, in place
    fields: dict[str, Any] = nested.pair_fields(qbuilds, "memfd" if mode == "live" else "file")
    if mode in ("cpr-reboot", "cpr-transfer") and not all(b.capabilities.has_mode(mode) for b in qbuilds):
        raise UnsupportedError(f"migration mode {mode}", "QEMU " + ", ".join(b.label for b in qbuilds))
    if opts.ovmf:
        fields["firmware"] = opts.ovmf[0]
    plan = nested.l1_plan(qemu=qbuilds[0].label, machine=machine, name=f"l1{mode.replace('-', '')}", **fields)
    report.notes.append(plan.reason)
    # fast start restores L1 with L2 running from a saved pair (HARNESS_NESTED_COLD=1 or
    # extra["cold"] boots both instead)
    fast = not (opts.flag("cold") or os.environ.get("HARNESS_NESTED_COLD") == "1")
    with (MachineFactory(plan.spec, base=opts.workdir) as factory,
          keeping_artifacts(report, opts, factory, mode) as run,
          nested.nested_pair(factory, plan, fast=fast) as (l1, l2, timings)):
        report.notes.append(
            f"L1 boot {timings.l1_boot_s or 0:.1f} s on QEMU {qbuilds[0].label} ({machine}); "
            f"L2 start {timings.l2_start_s or 0:.1f} s (L2 ready after {timings.l2_ready_s or 0:.1f} s "
            "by L1's clock)"
            + (f"; this run restored both from snapshot {timings.snapshot} in "
               f"{timings.restored_s:.1f} s (the boot timings are the snapshot's cold ones)"
               if timings.snapshot else "")
        )  # fmt: skip
        boot = timings.to_json()

        def record(res: migration.MigrationResult) -> None:
            data: dict[str, Any] = res.to_json()
            data["l2_pause_s"] = res.extra.get("l2", {}).get("pause_s")
            data["nested_verdict"] = res.extra.get("nested_state", {}).get("verdict")
            data["boot_timings"] = boot
            if res.extra.get("expected_failure"):
                data["expected_failure"] = True
                data["explanation"] = res.extra.get("known_limitation")
            elif res.extra.get("l2_quiesced"):
                data["explanation"] = res.extra["l2_quiesced"]
            report.add(data, opts)

        results = nested.run_cycles(l1, l2, mode, opts.cycles, builds=dests, on_cycle=record)
        run.failed = any(not r.ok and not r.extra.get("expected_failure") for r in results)
        pauses = [r.extra.get("l2", {}).get("pause_s") for r in results]
        report.notes.append("L2 observed pause per cycle (s): "
                            + ", ".join("?" if p is None else f"{p:.3f}" for p in pauses))  # fmt: skip
        verdicts = sorted({str(r.extra.get("nested_state", {}).get("verdict")) for r in results})
        report.notes += verdicts
    report.duration_s = time.monotonic() - t0
    return report


@scenario("nested", "migrate / live-update an L1 while its L2 runs (--mode live|save-restore|"
                    "cpr-reboot|cpr-transfer|nested-live); L2 checked after every cycle")
def nested_scenario(opts: ScenarioOptions) -> ScenarioReport:
    return run_nested(opts)
