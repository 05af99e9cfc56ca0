"""A Secure Boot + SMM guest through every hop kind its build offers (see
:mod:`harness.secureboot` for what is checked after each).

``--qemu A [--qemu B]``: the guest (OVMF's Secure Boot build, snakeoil keys enrolled, its
UKI signed with that key) boots on A, owns an authenticated variable, and makes, on A, each
of live, save-restore, cpr-reboot, cpr-transfer and cpr-exec that A offers
(``--set ops=live,cpr-transfer`` chooses); then, with B, a live migration to B on the newest
q35 machine type both offer (cross-version); with ``--ovmf A --ovmf B`` a firmware upgrade
(live migration to B's Secure Boot build, cold restart from the guest's varstore).  ``--set arch=aarch64``: AAVMF's Secure Boot
build (no SMM there, so no SMRAM checks).  The guest has a vTPM (:mod:`harness.tpm`): the
sha256 PCRs, the event log and an NV index the guest wrote must be as before each hop.  After every hop: SecureBoot/SetupMode, PK,
KEK, db and dbx in the guest's view and in the varstore file, the SMRAM lock (QEMU's memory
tree, HMP ``xp`` and the guest's ``/dev/mem``) as on the source before the hop, and the
authenticated variable (a write by its owner accepted and persisted, another signer
refused), and the vTPM (``--set tpm=0`` leaves it out).  At the end a restart in a new QEMU (power
off, boot with the same varstore and vTPM state; ``--set restart=0`` skips it) must show
the first boot's keys, lock and PCRs again.  A hop that left problems is followed by a warm reboot (the firmware locks SMRAM
anew), so the next hop is judged on its own.  One record per hop, judged against ``expected-incompatibilities.toml`` with
scenario ``secure-boot``.
"""

from __future__ import annotations

import time
from typing import Any

from harness import matrix, migration, secureboot, state, tpm
from harness.errors import HarnessError
from harness.factory import MachineFactory
from harness.inventory.builds import QemuBuild
from harness.scenarios import ScenarioOptions, ScenarioReport, keeping_artifacts, scenario
from harness.scenarios.storm import hop_setup, offered
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
    setup = hop_setup(opts)
    arch, qbuilds, wanted, machine = setup.arch, setup.qbuilds, setup.wanted, setup.machine
    fields, firmware = setup.fields, setup.firmware
    with_tpm = opts.flag("tpm", default=True)
    tpm_note = ""
    spec = VmSpec(qemu=qbuilds[0].label, firmware=firmware, machine=machine, arch=arch, secure_boot=True,
                  tpm=with_tpm, name="secure-boot", **fields)  # fmt: skip
    incompat = matrix.load_incompatibilities(opts.extra.get("incompatibilities", matrix.INCOMPATIBILITIES))
    with MachineFactory(spec, base=opts.workdir) as factory, keeping_artifacts(report, opts, factory, "secure-boot") as run:
        vm = factory(fast=opts.flag("fast"))
        before = secureboot.observe(vm)
        first = secureboot.auth_round(vm, "before the first hop")
        if with_tpm and arch != "x86_64":
            tpm_note = ("attached (tpm-tis-device) and migrated with the guest, not checked from inside: "
                        "Debian's arm64 kernels have no TIS driver (CONFIG_TCG_TIS unset in bookworm's "
                        "6.1 and trixie's 6.12), and QEMU's virt machine offers no other TPM interface")
        elif with_tpm:
            tpm_note = "checked: sha256 PCRs, event log, NV index"
            tpm.nv_write(vm, b"harness!")
            before.tpm = tpm.observe(vm)
            if not before.tpm.pcrs or before.tpm.nv != b"harness!".hex():
                first.append(f"the vTPM is not as expected before any hop: {before.tpm.to_json()}")
        if arch == "x86_64" and not any("smbase-blackhole" in ln for ln in before.mtree):
            first.append("the firmware's SMBASE lock is not in QEMU's memory tree (with fast=1 the guest "
                         "was restored, itself a migration: boot it cold on a build that loses the lock)")
        if first or secureboot.problems(before, before, "at boot"):
            raise HarnessError("the Secure Boot guest is not as expected before any hop: "
                               + "; ".join(first + secureboot.problems(before, before, "at boot")))
        initial = before
        booted_on = qbuilds[0]  # the build whose devices the guest initialized (data: boot=)
        plan = hops(qbuilds, wanted)
        last_status = "completed"
        for i, (op, dest) in enumerate(plan, 1):
            rec, after = _hop(vm, i, op, dest, before, incompat, machine, firmware, arch, booted_on)
            if tpm_note:
                rec["tpm"] = tpm_note
            report.add(rec, opts)
            if not rec["ok"] and not rec.get("expected_failure"):
                run.failed = True
            last_status = rec["status"]
            if rec["status"] != "completed":
                break
            if after is not None and not rec["problems"]:
                # the next hop starts from what this one's checks saw (the authenticated
                # round after them writes only its own variable: no key, lock or PCR)
                before = after
                continue
            if rec["problems"]:
                # the next hop must not inherit this one's damage (a lost SMRAM lock
                # cannot be lost again): a warm reboot, where the firmware locks anew
                state.reboot(vm)
                booted_on = vm.build
            before = secureboot.observe(vm)  # the next hop starts from here
            if with_tpm and arch == "x86_64":
                before.tpm = tpm.observe(vm)
        if last_status == "completed" and len(opts.ovmf or []) > 1:
            rec = _firmware_upgrade(vm, len(plan) + 1, (opts.ovmf or [])[1], initial, machine, firmware, arch)
            if tpm_note:
                rec["tpm"] = tpm_note
            report.add(rec, opts)
            last_status = rec["status"]
            plan.append(("firmware-upgrade", vm.build))
            if initial.tpm is not None and last_status == "completed":
                initial.tpm = tpm.observe(vm)  # the PCRs measure the new firmware from here
        if last_status == "completed" and opts.flag("restart", default=True):
            rec = _restart(vm, len(plan) + 1, initial, machine, firmware, arch)
            if tpm_note:
                rec["tpm"] = tpm_note
            report.add(rec, opts)
        run.failed = run.failed or not report.ok
    report.duration_s = time.monotonic() - t0
    return report


def _step_record(vm: Any, index: int, op: str, problems: list[str], **fields: Any) -> dict[str, Any]:
    """The record of a step on the guest's own build (no data entry covers those: any
    problem fails it), its problems named by a signature where one fits."""
    from harness import signatures

    sig = signatures.classify("\n".join(problems)) if problems else None
    return {"scenario": "secure-boot", "hop": index, "op": op, "source": vm.build.label,
            "destination": vm.build.label, **fields, "status": "completed" if not problems else "failed",
            "problems": problems, "signature": sig.name if sig else None,
            "error": "; ".join(problems)[:2000], "ok": not problems, "expected_failure": False}  # fmt: skip


def _firmware_upgrade(vm: Any, index: int, new_fw: str, initial: secureboot.SbView, machine: str,
                      firmware: str, arch: str) -> dict[str, Any]:
    """A host's OVMF package upgrade under a running Secure Boot guest: a live migration to
    a QEMU that has the new firmware's Secure Boot build, then a cold restart that boots it
    from the guest's own varstore (which keeps its enrolled keys: the image signed with
    the old snakeoil key must still boot).  Keys, SMRAM lock, authenticated variable and
    NV index as before; the PCRs measure the new firmware, so they are not compared."""
    where = f"after upgrading the firmware {firmware} -> {new_fw}"
    problems: list[str] = []
    try:
        before_keys = secureboot.observe(vm)
        vm.use_firmware(new_fw)
        res = migration.live(vm, check=False)
        if not res.ok:
            problems += [f"{where}: the live migration: {res.error or res.status}"] + res.problems
        else:
            vm.cold_restart()
            after = secureboot.observe(vm)
            problems += secureboot.problems(before_keys, after, where)
            problems += secureboot.auth_round(vm, where)
            if initial.tpm is not None:
                now = tpm.observe(vm)
                if now.nv != initial.tpm.nv:
                    problems.append(f"{where}: the TPM NV index reads {now.nv}, it held {initial.tpm.nv}")
    except HarnessError as exc:
        problems.append(f"{where}: {exc}")
    return _step_record(vm, index, "firmware-upgrade", problems, machine=machine, firmware=firmware,
                        dest_firmware=new_fw, arch=arch)  # fmt: skip


def _tpm_problems(vm: Any, before: tpm.TpmView, now: tpm.TpmView, where: str, *,
                  same_boot: bool = True) -> list[str]:
    """The vTPM's differences (:func:`tpm.problems`), and when the guest sees no TPM at all,
    what its kernel said about the device at boot."""
    out = tpm.problems(before, now, where, same_boot=same_boot)
    if out and not now.pcrs:
        out += tpm.driver_problems(vm, where)
    return out


def _restart(vm: Any, index: int, initial: secureboot.SbView, machine: str, firmware: str,
             arch: str) -> dict[str, Any]:
    """Power off and boot again in a new QEMU with the same varstore and vTPM state: the
    keys, the SMRAM lock, the authenticated variable, and (with a vTPM) the PCRs and event
    log of a fresh boot must be as at the first boot, the NV index as written."""
    where = f"after a restart on {vm.build.label}"
    problems: list[str] = []
    try:
        vm.cold_restart()
        after = secureboot.observe(vm)
        problems += secureboot.problems(initial, after, where)
        problems += secureboot.auth_round(vm, where)
        if initial.tpm is not None:
            problems += _tpm_problems(vm, initial.tpm, tpm.observe(vm), where, same_boot=False)
    except HarnessError as exc:
        problems.append(f"{where}: {exc}")
    return _step_record(vm, index, "restart", problems, machine=machine, firmware=firmware, arch=arch)


def _hop(vm: Any, index: int, op: str, dest: QemuBuild, before: secureboot.SbView,
         incompat: matrix.Incompatibilities, machine: str, firmware: str, arch: str,
         booted_on: QemuBuild) -> tuple[dict[str, Any], secureboot.SbView | None]:
    """One hop and its record, with what the checks after it observed (None when the hop
    or its checks did not get that far)."""
    source = vm.build
    res = migration.operation(op)(vm, to=dest, check=False)
    problems = list(res.problems) if not res.ok else []
    after = None
    if res.ok:
        try:
            after = secureboot.observe(vm)
            where = f"after {op} {source.label} -> {dest.label}"
            problems += secureboot.problems(before, after, where)
            if before.tpm is not None:
                after.tpm = tpm.observe(vm)
                problems += _tpm_problems(vm, before.tpm, after.tpm, where)
            problems += secureboot.auth_round(vm, f"after {op}")
        except HarnessError as exc:
            problems.append(f"checking after the hop: {exc}")
            after = None
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
    failed = bool(problems) or not res.ok
    expected = incompat.lookup(source.version, dest.version, op, machine, boot=booted_on.version, arch=arch,
                               scenario="secure-boot", signature=signature if failed else None)  # fmt: skip
    rec["booted_on"] = booted_on.label
    return matrix.record_verdict(rec, matrix.judge(failed, signature, expected), expected), after
