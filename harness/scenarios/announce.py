"""QEMU's self-announce switched off for a load, then the guest reset.

After an incoming migration QEMU announces the guest's MAC address (``announce-rounds``
rounds: a RARP of its own, and a virtio-net guest that negotiated GUEST_ANNOUNCE asked to
send gratuitous ARPs).  With ``announce-rounds`` 0, virtio-net's post-load frees its
announce timer instead of arming it, and the device's reset later deletes that freed
timer: QEMU dies with SIGSEGV on the guest's next reset or reboot (found 2026-12-01 while
making restores skip the announce, see docs/performance.md; every build here has it).

``--qemu A [--qemu B ...]``: per build, a guest (restored from a saved boot; ``--set
fast=0`` boots it cold) is saved to a file, loaded into a new QEMU with ``announce-rounds``
``--set rounds=N`` (default 0), reset (QMP ``system_reset``) and must boot to its ready
line and SSH again.  One record per build, judged against ``expected-incompatibilities.toml``
with scenario ``announce-reset``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from harness import matrix, migration, signatures
from harness.errors import ConfigError, HarnessError
from harness.factory import MachineFactory
from harness.inventory import builds
from harness.inventory.catalog import DEFAULT_FIRMWARE, DEFAULT_QEMU
from harness.machine import Machine
from harness.scenarios import ScenarioOptions, ScenarioReport, keeping_artifacts, scenario
from harness.spec import VmSpec

NAME = "announce-reset"


def _rounds(opts: ScenarioOptions) -> int:
    raw = str(opts.extra.get("rounds", "0"))
    if not raw.isdigit() or int(raw) > 1000:
        raise ConfigError(f"--set rounds={raw}: expected a whole number of announce rounds (0 to 1000)")
    return int(raw)


@scenario(NAME, "a guest loaded with announce-rounds 0 (QEMU's self-announce off), then reset: QEMU must live on")
def run_announce_reset(opts: ScenarioOptions) -> ScenarioReport:
    report = ScenarioReport(NAME)
    t0 = time.monotonic()
    rounds = _rounds(opts)
    incompat = matrix.load_incompatibilities(opts.extra.get("incompatibilities", matrix.INCOMPATIBILITIES))
    for version in opts.qemu or [DEFAULT_QEMU]:
        build = builds.get_build(version)
        if "announce-rounds" not in build.capabilities.migration_parameters:
            report.add({"scenario": NAME, "op": "save-restore", "status": "unsupported", "ok": False,
                        "source": build.label, "destination": build.label,
                        "error": f"QEMU {build.label} has no migration parameter announce-rounds"}, opts)  # fmt: skip
            continue
        spec = VmSpec(qemu=build.label, firmware=(opts.ovmf or [DEFAULT_FIRMWARE])[0], name="announce")
        with MachineFactory(spec, base=opts.workdir) as factory, keeping_artifacts(report, opts, factory, NAME) as run:
            vm = factory(fast=opts.flag("fast", default=True))
            rec = load_and_reset(vm, rounds, incompat)
            report.add(rec, opts)
            run.failed = not rec["ok"] or bool(rec.get("expected_failure"))
    report.duration_s = time.monotonic() - t0
    return report


def load_and_reset(vm: Machine, rounds: int, incompat: matrix.Incompatibilities) -> dict[str, Any]:
    """Save ``vm``, load it into a new QEMU with ``announce-rounds`` = ``rounds``, reset the
    guest and wait for it to boot again; the record, judged."""
    build = vm.build
    problems: list[str] = []
    path = vm.workdir / "announce-state.bin"
    res = migration.save(vm, path, check=False)
    if res.ok:
        res = migration.restore(vm, path, params={"announce-rounds": rounds}, check=False)
    if not res.ok:
        problems.append(f"the save and load before the reset: {res.error or res.status}")
    else:
        mark = vm.console.mark()
        try:
            vm.qmp("system_reset")
            vm.wait_ready(since=mark)
            vm.ssh.connect(timeout=60)
        except HarnessError as exc:
            code = None
            with contextlib.suppress(HarnessError):  # QMP can notice before the process is gone
                code = vm.process.wait_exit(5.0)
            if code is not None and code < 0:
                problems.append(f"QEMU {build.label} died (signal {-code}) resetting the guest after a "
                                f"load with announce-rounds {rounds}")  # fmt: skip
            else:
                problems.append(f"the guest did not come back from its reset after a load with "
                                f"announce-rounds {rounds}: {exc}")  # fmt: skip
    sig = signatures.classify("\n".join(problems)) if problems else None
    machine = migration.machine_type(vm) if vm.process.running else vm.spec.machine
    rec: dict[str, Any] = {
        "scenario": NAME, "op": "save-restore", "source": build.label, "destination": build.label,
        "machine": machine, "arch": vm.spec.arch, "announce_rounds": rounds,
        "status": "completed" if not problems else "failed", "problems": problems,
        "signature": sig.name if sig else None, "error": "; ".join(problems)[:2000],
    }  # fmt: skip
    failed = bool(problems)
    expected = incompat.lookup(build.version, build.version, "save-restore", machine, arch=vm.spec.arch,
                               scenario=NAME, signature=rec["signature"] if failed else None)  # fmt: skip
    if expected is not None and rounds != 0:
        expected = None  # the entries are about announce-rounds 0
    return matrix.record_verdict(rec, matrix.judge(failed, rec["signature"], expected), expected)
