"""A Secure Boot + SMM guest through every hop kind its build offers (see
:mod:`harness.secureboot` for what is checked after each).

``--qemu A [--qemu B]``: the guest (OVMF's Secure Boot build, snakeoil keys enrolled, its
UKI signed with that key) boots on A, owns an authenticated variable, and makes, on A, each
of live, save-restore, cpr-reboot, cpr-transfer and cpr-exec that A offers
(``--set ops=live,cpr-transfer`` chooses); then, with B, a live migration to B on the newest
q35 machine type both offer (cross-version).  ``--set arch=aarch64``: AAVMF's Secure Boot
build (no SMM there, so no SMRAM checks).  After every hop: SecureBoot/SetupMode, PK,
KEK, db and dbx in the guest's view and in the varstore file, the SMRAM lock (QEMU's memory
tree, HMP ``xp`` and the guest's ``/dev/mem``) as on the source before the hop, and the
authenticated variable (a write by its owner accepted and persisted, another signer
refused).  A hop that left problems is followed by a warm reboot (the firmware locks SMRAM
anew), so the next hop is judged on its own.  One record per hop, judged against ``expected-incompatibilities.toml`` with
scenario ``secure-boot``.
"""

from __future__ import annotations

import time
from typing import Any

from harness import builds, matrix, migration, secureboot, state
from harness.builds import QemuBuild
from harness.errors import ConfigError, HarnessError
from harness.factory import MachineFactory
from harness.scenarios import ScenarioOptions, ScenarioReport, record_error, scenario
from harness.scenarios.storm import KINDS, offered
from harness.spec import VmSpec


def hops(qbuilds: list[QemuBuild], wanted: tuple[str, ...]) -> list[tuple[str, QemuBuild]]:
    first = qbuilds[0]
    shared = all(b.capabilities.has_mode("cpr-transfer") for b in qbuilds)
    out = [(k, first) for k in offered(first, wanted, shared)]
    out += [("live", b) for b in qbuilds[1:]]
    return out


@scenario("secure-boot", "a Secure Boot + SMM guest through every hop kind: keys, SMRAM lock, authenticated writes")
def run_secure_boot(opts: ScenarioOptions) -> ScenarioReport:
    report = ScenarioReport("secure-boot")
    t0 = time.monotonic()
    arch = str(opts.extra.get("arch", "x86_64"))
    qbuilds = [builds.get_build(v, arch) for v in (opts.qemu or ["10.0.2"])]
    raw = opts.extra.get("ops", KINDS)
    wanted = (raw,) if isinstance(raw, str) else tuple(raw)
    bad = [k for k in wanted if k not in KINDS]
    if bad:
        raise ConfigError(f"ops={','.join(bad)}: unknown; the hop kinds are {', '.join(KINDS)}")
    family = "virt" if arch == "aarch64" else "pc-q35"
    machine = qbuilds[0].capabilities.resolve_machine("virt" if arch == "aarch64" else "q35")
    for other in qbuilds[1:]:
        machine = builds.newest_common_machine(qbuilds[0].capabilities, other.capabilities, family)
    shared = all(b.capabilities.has_mode("cpr-transfer") for b in qbuilds)
    fields: dict[str, Any] = dict(migration.spec_fields_for("cpr-transfer")) if shared else {}
    if arch == "aarch64":
        fields["cpu"] = str(opts.extra.get("cpu", "cortex-a57"))
    firmware = (opts.ovmf or ["2022.11"])[0]
    spec = VmSpec(qemu=qbuilds[0].label, firmware=firmware, machine=machine, arch=arch, secure_boot=True,
                  name="secure-boot", **fields)  # fmt: skip
    incompat = matrix.load_incompatibilities(opts.extra.get("incompatibilities", matrix.INCOMPATIBILITIES))
    failed = False
    with MachineFactory(spec, base=opts.workdir) as factory:
        try:
            vm = factory(fast=bool(opts.extra.get("fast")))
            before = secureboot.observe(vm)
            first = secureboot.auth_round(vm, "before the first hop")
            if arch == "x86_64" and not any("smbase-blackhole" in ln for ln in before.mtree):
                first.append("the firmware's SMBASE lock is not in QEMU's memory tree (with fast=1 the guest "
                             "was restored, itself a migration: boot it cold on a build that loses the lock)")
            if first or secureboot.problems(before, before, "at boot"):
                raise HarnessError("the Secure Boot guest is not as expected before any hop: "
                                   + "; ".join(first + secureboot.problems(before, before, "at boot")))
            for i, (op, dest) in enumerate(hops(qbuilds, wanted), 1):
                rec = _hop(vm, i, op, dest, before, incompat, machine, firmware, arch)
                report.add(rec, opts)
                if not rec["ok"] and not rec.get("expected_failure"):
                    failed = True
                if rec["status"] != "completed":
                    break
                if rec["problems"]:
                    # the next hop must not inherit this one's damage (a lost SMRAM lock
                    # cannot be lost again): a warm reboot, where the firmware locks anew
                    state.reboot(vm)
                before = secureboot.observe(vm)  # the next hop starts from here
            failed = failed or not report.ok
        except HarnessError as exc:
            record_error(report, "secure-boot", exc, opts)
            failed = True
        finally:
            if failed and opts.artifacts is not None:
                report.artifacts = str(factory.save_artifacts(opts.artifacts))
    report.duration_s = time.monotonic() - t0
    return report


def _hop(vm: Any, index: int, op: str, dest: QemuBuild, before: secureboot.SbView,
         incompat: matrix.Incompatibilities, machine: str, firmware: str, arch: str) -> dict[str, Any]:
    source = vm.build
    res = migration.operation(op)(vm, to=dest, check=False)
    problems = list(res.problems) if not res.ok else []
    if res.ok:
        try:
            after = secureboot.observe(vm)
            problems += secureboot.problems(before, after, f"after {op} {source.label} -> {dest.label}")
            problems += secureboot.auth_round(vm, f"after {op}")
        except HarnessError as exc:
            problems.append(f"checking after the hop: {exc}")
    signature = res.signature
    if problems and not signature:
        from harness import signatures

        sig = signatures.classify("\n".join(problems))
        signature = sig.name if sig is not None else None
    rec: dict[str, Any] = {
        "scenario": "secure-boot", "hop": index, "op": op, "source": source.label,
        "destination": dest.label, "machine": machine, "firmware": firmware,
        "arch": arch, "status": res.status, "problems": problems, "signature": signature,
        "error": res.error or "; ".join(problems)[:2000], "downtime_ms": res.to_json().get("downtime_ms"),
    }  # fmt: skip
    expected = incompat.lookup(source.version, dest.version, op, machine, arch=arch, scenario="secure-boot")
    verdict = matrix.judge(bool(problems) or not res.ok, signature, expected)
    rec["ok"], rec["expected_failure"] = verdict.ok, verdict.expected_failure
    if expected is not None:
        rec["expected_signature"], rec["reason"] = expected.signature, expected.reason
    if verdict.note:
        rec["note"] = verdict.note
    return rec
