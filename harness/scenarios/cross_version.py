"""Cross-version migration matrix: every ordered pair of QEMU builds (forward and
backward), a fleet upgrade chain and a rollback, and firmware upgrade pairs, with guest
state, varstore and boot order checked after every hop.

The plans come from :mod:`harness.matrix` (catalogue + registered + ``--qemu`` builds);
each plan's guest (UEFI, split pflash) walks its hops, and a hop whose source build the
guest does not run on (the plan's start, or after a failed hop) gets a freshly booted
guest, so every hop appears in the results.  Before each hop the guest writes a fresh EFI
variable; after it, on the destination:

- guest state survived (same boot, heartbeat advanced, memory checksum intact);
- the variable reads back in the guest and in the destination's host-side varstore file,
  and the destination's varstore file is byte-identical to the source's;
- ``BootOrder`` in the guest is unchanged and equals the one in the host varstore file.

Firmware plans migrate to a destination started with another OVMF build's CODE (same flash
layout) and then check which firmware image is in the guest's flash (``pmemsave`` of the
pflash0 window against each CODE file): still the source's after the migration and after a
warm reboot (the flash contents are RAM that came with the migration), the destination's
after a cold restart (a new QEMU process on the destination) that boots with the migrated
varstore, variable and ``BootOrder`` intact.

A hop that fails is judged against ``firmware/expected-incompatibilities.toml``
(:func:`harness.matrix.judge`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import matrix, migration, state, varstore
from harness.errors import HarnessError
from harness.factory import MachineFactory
from harness.inventory import builds
from harness.inventory.catalog import DEFAULT_FIRMWARE, Version
from harness.machine import Machine
from harness.matrix import Hop, Incompatibilities, Plan
from harness.scenarios import ScenarioOptions, ScenarioReport, scenario
from harness.spec import VmSpec

log = logging.getLogger(__name__)

XV_VAR = "HarnessCrossVersion"
# A named CPU model, not "max": "max" exposes whatever the build's accelerator can do
# (TCG gained AVX/AVX2 in 7.2), so a guest that started on a newer build and picked such
# code paths dies with "Illegal instruction" after moving to an older one.  QEMU promises
# migration only for versioned machine types with named CPU models.
DEFAULT_CPU = "qemu64"
PARTS = ("pairs", "chains", "firmware")
FLASH_TOP = 1 << 32  # q35 maps pflash0 just below 4 GiB, pflash1 below it


# --- what is checked around a hop ------------------------------------------------------------


@dataclass
class Before:
    """What the guest looked like just before a hop."""

    state: state.GuestState
    value: bytes
    boot_order: list[int]
    varstore: Path
    crashes: list[str] = field(default_factory=list)  # kernel crash lines seen before the hop


def _guest_boot_order(vm: Machine) -> list[int]:
    data = state.read_efivar(vm, "BootOrder", state.EFI_GLOBAL)
    return varstore.decode_boot_order(data) if data is not None else []


def before_hop(vm: Machine, tag: str) -> Before:
    """Write a fresh EFI variable from inside the guest and record what must survive."""
    value = f"{tag}-{time.time_ns()}".encode()
    state.write_efivar(vm, XV_VAR, value)
    return Before(state.snapshot(vm, memory=False), value, _guest_boot_order(vm), vm.varstore_path,
                  state.kernel_crashes(vm))


def varstore_problems(vm: Machine, value: bytes, source_file: Path | None,
                      boot_order: list[int], timeout: float = 10.0) -> list[str]:
    """The variable in the host varstore file, that file equal to the source's, and its
    BootOrder equal to ``boot_order``.  QEMU writes the migrated flash to the file when the
    destination starts running, so this polls briefly before calling it a problem."""
    deadline = time.monotonic() + timeout
    while True:
        problems: list[str] = []
        path = vm.varstore_path
        try:
            model = varstore.read_varstore(path)
        except HarnessError as exc:
            problems.append(f"host varstore unreadable: {exc}")
        else:
            var = model.variables.get((XV_VAR, state.HARNESS_GUID))
            if var is None or var.data != value:
                found = "nothing" if var is None else var.data.decode(errors="replace")
                problems.append(f"host varstore {path}: {XV_VAR} expected {value.decode()}, found {found}")
            if model.boot_order != boot_order:
                problems.append(f"host varstore {path}: BootOrder {_fmt(model.boot_order)}, "
                                f"guest had {_fmt(boot_order)}")  # fmt: skip
        if source_file is not None and source_file != path:
            a, b = _digest(source_file), _digest(path)
            if a != b:
                problems.append(f"destination varstore {path.name} (sha256 {b[:16]}) differs from the "
                                f"source's {source_file.name} (sha256 {a[:16]})")  # fmt: skip
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.25)


def _fmt(order: Sequence[int]) -> str:
    return ",".join(f"{n:04X}" for n in order) or "(none)"


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


def guest_problems(vm: Machine, before: Before, settle_s: float = 10.0) -> list[str]:
    """Everything that did not survive the hop, checked in the guest and on the host (the
    host's varstore file given ``settle_s`` to show the migrated flash)."""
    after = state.snapshot(vm)
    problems = state.survival_problems(before.state, after)
    got = state.read_efivar(vm, XV_VAR)
    if got != before.value:
        problems.append(f"EFI variable {XV_VAR} in the guest: expected {before.value.decode()}, "
                        f"found {got.decode(errors='replace') if got else 'nothing'}")  # fmt: skip
    order = _guest_boot_order(vm)
    if order != before.boot_order:
        problems.append(f"BootOrder in the guest changed: {_fmt(before.boot_order)} -> {_fmt(order)}")
    problems += varstore_problems(vm, before.value, before.varstore, before.boot_order, timeout=settle_s)
    # a guest that crashed and rebooted shows a new boot id above; its console says why
    problems += state.kernel_crash_problems(vm, before.crashes)
    return problems


# --- which firmware is in the flash --------------------------------------------------------


def flash_code_digest(vm: Machine, size: int) -> str:
    """sha256 of the pflash0 window as the guest sees it (``pmemsave`` of the top ``size``
    bytes below 4 GiB): the firmware image the guest runs, whatever file QEMU was given."""
    dump = vm.workdir / f"flash0-{time.monotonic_ns()}.bin"
    try:
        vm.qmp("pmemsave", val=FLASH_TOP - size, size=size, filename=str(dump))
        return _digest(dump)
    finally:
        dump.unlink(missing_ok=True)


def which_firmware(vm: Machine, images: dict[str, Path]) -> str:
    """The firmware version whose CODE file the guest's flash holds, or ``unknown <sha>``."""
    sizes = {p.stat().st_size for p in images.values()}
    if len(sizes) != 1:
        return "unknown (firmware images of different sizes)"
    digest = flash_code_digest(vm, sizes.pop())
    for version, path in images.items():
        if _digest(path) == digest:
            return version
    return f"unknown {digest[:16]}"


# --- running plans -----------------------------------------------------------------------------


@dataclass
class Runner:
    """Walks plans with as few boots as possible and records one result per hop."""

    factory: MachineFactory
    spec: VmSpec
    incompat: Incompatibilities
    versions: dict[str, Version]
    on_record: Callable[[dict[str, Any]], None]
    records: list[dict[str, Any]] = field(default_factory=list)
    boots: list[float] = field(default_factory=list)
    _vm: Machine | None = None
    _vm_plan: str | None = None
    _vm_machine: str | None = None
    _vm_boot: str | None = None  # the build the carried guest booted on

    def _drop(self) -> None:
        if self._vm is not None:
            self._vm.stop()
        self._vm, self._vm_plan, self._vm_machine = None, None, None

    def _guest_on(self, label: str, plan: Plan) -> tuple[Machine, float | None]:
        """A guest running on ``label`` with the plan's machine type: the carried one, or a
        fresh boot (whose boot time is returned)."""
        vm = self._vm
        carried = (
            vm is not None and vm.running and vm.build.label == label
            and self._vm_machine == plan.machine
            and self._vm_plan in (plan.name, plan.follows)
        )  # fmt: skip
        if carried and vm is not None:
            self._vm_plan = plan.name
            return vm, None
        self._drop()
        t0 = time.monotonic()
        vm = self.factory(qemu=label, machine=plan.machine, cpu=self.spec.cpu,
                          firmware=plan.firmware or self.spec.firmware,
                          name=f"xv{len(self.boots) + 1}")  # fmt: skip
        boot = time.monotonic() - t0
        self.boots.append(boot)
        self._vm, self._vm_plan, self._vm_machine = vm, plan.name, plan.machine
        self._vm_boot = label
        return vm, boot

    def _base_record(self, plan: Plan, hop: Hop) -> dict[str, Any]:
        return {
            "scenario": "cross-version", "kind": plan.kind, "plan": plan.name, "hop": hop.index,
            "op": hop.op, "source": hop.source, "destination": hop.destination,
            "source_version": str(self.versions[hop.source]),
            "destination_version": str(self.versions[hop.destination]),
            "direction": _direction(self.versions[hop.source], self.versions[hop.destination]),
            "machine": hop.machine, "firmware": hop.firmware or plan.firmware or self.spec.firmware,
            "dest_firmware": hop.dest_firmware or hop.firmware or plan.firmware or self.spec.firmware,
        }  # fmt: skip

    def _finish(self, rec: dict[str, Any], hop: Hop) -> dict[str, Any]:
        failed = not rec.get("ok_raw", False)
        booted = rec.get("booted_on")
        expected = self.incompat.lookup(self.versions[hop.source], self.versions[hop.destination],
                                        hop.op, hop.machine, _fw_version(rec.get("firmware")),
                                        _fw_version(rec.get("dest_firmware")),
                                        self.versions.get(booted) if booted else None,
                                        signature=rec.get("signature") if failed else None)  # fmt: skip
        rec.pop("ok_raw", None)
        matrix.record_verdict(rec, matrix.judge(failed, rec.get("signature"), expected), expected)
        self.records.append(rec)
        self.on_record(rec)
        return rec

    def run(self, plan: Plan) -> None:
        for hop in plan.hops:
            rec = self._base_record(plan, hop)
            try:
                vm, boot = self._guest_on(hop.source, plan)
            except HarnessError as exc:
                self._drop()
                rec.update(status="error", ok_raw=False, error=f"boot on QEMU {hop.source} failed: {exc}")
                self._finish(rec, hop)
                continue
            if boot is not None:
                rec["boot_s"] = round(boot, 1)
            rec["booted_on"] = self._vm_boot
            ok = self._hop(vm, plan, hop, rec)
            self._finish(rec, hop)
            if not ok:
                self._drop()  # the guest cannot be trusted for the next hop

    def _hop(self, vm: Machine, plan: Plan, hop: Hop, rec: dict[str, Any]) -> bool:
        dest = builds.get_build(hop.destination)
        images: dict[str, Path] = {}
        try:
            before = before_hop(vm, f"{plan.kind}-{hop.index}")
            rec["boot_order"] = _fmt(before.boot_order)
            if hop.dest_firmware and hop.dest_firmware != (hop.firmware or plan.firmware):
                images = _firmware_images(vm, [hop.firmware or plan.firmware or "", hop.dest_firmware])
                vm.use_firmware(hop.dest_firmware)
            res = migration.operation(hop.op)(vm, to=dest, check=False)
        except HarnessError as exc:
            rec.update(status="error", ok_raw=False, error=f"before the hop: {exc}")
            return False
        rec.update(status=res.status, downtime_ms=res.downtime_ms, total_time_ms=res.total_time_ms,
                   wall_s=round(res.wall_s, 3), signature=res.signature, error=res.error,
                   source_running=res.source_running,
                   state_file_size=res.state_file_size)  # fmt: skip
        if not res.ok:
            rec["problems"] = list(res.problems)
            rec["ok_raw"] = False
            return False
        try:
            problems = self._machine_problems(vm, hop, rec)
            problems += guest_problems(vm, before)
            rec["pause_s"] = round(state.guest_pause(before.state, state.snapshot(vm, memory=False)), 3)
            if plan.reboot_checks and hop.dest_firmware:
                problems += self._firmware_checks(vm, hop, before, images, rec)
        except HarnessError as exc:
            rec["diagnosis"], problems = state.failed_check_problems(vm, exc, before.crashes)
        rec["problems"] = problems
        if problems and not rec.get("signature"):
            from harness import signatures

            sig = signatures.classify("\n".join(problems))
            if sig is not None:  # a finding of the checks, named like a QEMU error
                rec["signature"], rec["signature_explanation"] = sig.name, sig.explanation
        rec["ok_raw"] = not problems
        return not problems

    def _machine_problems(self, vm: Machine, hop: Hop, rec: dict[str, Any]) -> list[str]:
        """The destination's machine-type deprecation warnings against the data file."""
        problems, entry = self.incompat.machine_problems(
            self.versions[hop.destination], hop.destination, hop.machine, vm.process.output())
        if entry is not None:
            rec["machine_deprecated"] = {"text": entry.text, "reason": entry.reason,
                                         "where": entry.where}  # fmt: skip
        return problems

    def _firmware_checks(self, vm: Machine, hop: Hop, before: Before,
                         images: dict[str, Path], rec: dict[str, Any]) -> list[str]:
        """Which firmware runs after the migration, a warm reboot and a cold restart."""
        src_fw, dst_fw = hop.firmware or "", hop.dest_firmware or ""
        problems: list[str] = []
        seen: dict[str, str] = {"after_migration": which_firmware(vm, images)}
        bios: dict[str, dict[str, str]] = {"after_migration": _bios_info(vm)}
        if seen["after_migration"] != src_fw:
            problems.append(f"after migration the guest's flash holds {seen['after_migration']}, "
                            f"not the source's firmware {src_fw}")  # fmt: skip
        # warm reboot: same QEMU process; the flash RAM (the source's image) stays
        state.reboot(vm)
        seen["after_warm_reboot"] = which_firmware(vm, images)
        bios["after_warm_reboot"] = _bios_info(vm)
        problems += _after_boot(vm, before, "warm reboot")
        # cold restart: the guest powers off (QEMU exits, the varstore file is complete),
        # then a new QEMU process on the destination boots with its firmware
        vm.cold_restart()
        seen["after_cold_restart"] = which_firmware(vm, images)
        bios["after_cold_restart"] = _bios_info(vm)
        if seen["after_cold_restart"] != dst_fw:
            problems.append(f"after a cold restart the guest's flash holds "
                            f"{seen['after_cold_restart']}, not the destination's firmware {dst_fw}")  # fmt: skip
        problems += _after_boot(vm, before, "cold restart", pruned=rec)
        rec["firmware_seen"] = seen
        rec["bios_seen"] = bios  # SMBIOS type 0 as the guest sees it, for the record
        return problems


#: edk2's marker (optional data) of the load options its BDS creates for devices it finds.
AUTO_CREATED = bytes.fromhex("4eac0881119f594d850ee21a522c59b2")


def _fw_version(label: object) -> Version | None:
    """A firmware label's numeric version (``2025.02``; a registered ``2025.02-8+deb13u1``)."""
    try:
        return Version.parse(str(label)) if label else None
    except ValueError:
        return None


def _after_boot(vm: Machine, before: Before, what: str,
                pruned: dict[str, Any] | None = None) -> list[str]:
    """The guest-written variable and BootOrder after a reboot.  With ``pruned`` (another
    firmware build booted), options the firmware auto-created and the new build no longer
    enumerates may go (recorded in ``pruned["boot_order_pruned"]``); every other option
    must stay, in the same order."""
    problems = []
    got = state.read_efivar(vm, XV_VAR)
    if got != before.value:
        problems.append(f"after the {what} the guest-written variable {XV_VAR} is "
                        f"{got.decode(errors='replace') if got else 'missing'}")  # fmt: skip
    order = _guest_boot_order(vm)
    expected = before.boot_order
    if pruned is not None and order != expected:
        auto = {n for n, e in varstore.read_varstore(before.varstore).boot_entries.items()
                if e.optional_data.startswith(AUTO_CREATED)}  # fmt: skip
        gone = [n for n in expected if n not in order]
        if all(n in auto for n in gone):
            pruned["boot_order_pruned"] = _fmt(gone)
            expected = [n for n in expected if n in order]
        pruned["boot_order_after"] = _fmt(order)
    # another firmware may append options for what it finds; the same firmware must not
    kept = order[: len(expected)] if pruned is not None else order
    if kept != expected:
        moved = _apps_moved(vm, before, expected, order) if pruned is not None else None
        if moved is not None:
            problems.append(f"after the {what} the firmware moved its application entries "
                            f"(load-option category APP) after the boot devices in BootOrder: "
                            f"{_fmt(before.boot_order)} -> {_fmt(order)} ({moved}); the devices "
                            "and the guest's own entries kept their order")  # fmt: skip
        else:
            problems.append(f"after the {what} BootOrder changed: {_fmt(before.boot_order)} -> {_fmt(order)}")
    return problems


#: UEFI load option attributes: the category field and its APP value (UEFI 3.1.3).
_CATEGORY_MASK, _CATEGORY_APP = 0x1F00, 0x100


def _apps_moved(vm: Machine, before: Before, expected: list[int], order: list[int]) -> str | None:
    """When the only change is that the firmware reordered (or added) application entries
    (UiApp, the Shell, BootManagerMenuApp: what BDS skips when booting) while every other
    entry kept its relative order, say which; else None (another change)."""
    entries = dict(varstore.read_varstore(before.varstore).boot_entries)
    with contextlib.suppress(HarnessError):  # the firmware's new entries, if readable
        entries.update(varstore.read_varstore(vm.varstore_path).boot_entries)

    def is_app(n: int) -> bool:
        e = entries.get(n)
        return e is not None and (e.attributes & _CATEGORY_MASK) == _CATEGORY_APP

    def titled(ns: Sequence[int]) -> str:
        return ", ".join(f"{n:04X} {entries[n].title!r}" if n in entries else f"{n:04X}" for n in ns)

    added = [n for n in order if n not in expected]
    if [n for n in order if not is_app(n)] != [n for n in expected if not is_app(n)]:
        return None
    if not all(is_app(n) for n in added):
        return None
    apps = [n for n in expected if is_app(n)]
    return f"application entries {titled(apps)}" + (f"; added {titled(added)}" if added else "")


def _bios_info(vm: Machine) -> dict[str, str]:
    """What the running firmware tells the guest about itself (SMBIOS type 0)."""
    out = vm.ssh.run("cat /sys/class/dmi/id/bios_vendor /sys/class/dmi/id/bios_version "
                     "/sys/class/dmi/id/bios_date", timeout=30, check=False).stdout.splitlines()  # fmt: skip
    keys = ("vendor", "version", "date")
    return {k: v.strip() for k, v in zip(keys, out, strict=False)}


def _firmware_images(vm: Machine, versions: Sequence[str]) -> dict[str, Path]:
    from harness.inventory import firmware

    out = {}
    for v in versions:
        fw = firmware.get_firmware(v, vm.spec.arch)
        desc = fw.variant(vm.spec.flash) if vm.spec.flash != "4m" else fw.select()
        out[v] = desc.code
    return out


def _direction(a: Version, b: Version) -> str:
    return "forward" if b > a else "backward" if b < a else "same"


# --- the scenario ------------------------------------------------------------------------------


def build_plans(opts: ScenarioOptions) -> tuple[list[Plan], dict[str, Version]]:
    """The plans a run covers: pairs, chains and firmware pairs from the ``--qemu`` builds
    (default: every catalogue and registered build) and ``--ovmf`` builds."""
    from harness.inventory import firmware

    raw = opts.extra.get("parts", PARTS)
    parts = (raw,) if isinstance(raw, str) else tuple(raw)  # `--set parts=firmware`: one part
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        from harness.errors import ConfigError

        raise ConfigError(f"parts={','.join(unknown)}: unknown; expected some of {', '.join(PARTS)}")
    eps = matrix.endpoints(opts.qemu)
    ops = (opts.mode,) if opts.mode else matrix.DEFAULT_OPS
    plans: list[Plan] = []
    if "pairs" in parts:
        plans += matrix.pair_plans(eps, ops)
    if "chains" in parts:
        plans += matrix.chains(eps)
    if "firmware" in parts:
        fws = [firmware.get_firmware(v) for v in opts.ovmf] if len(opts.ovmf) >= 2 else list(firmware.all_firmware("x86_64"))
        plans += matrix.firmware_plans(eps[-1], [matrix.FirmwareEndpoint.of(f) for f in fws])
    return plans, {e.label: e.version for e in eps}


def run_cross_version(opts: ScenarioOptions, plans: Sequence[Plan] | None = None) -> ScenarioReport:
    """Run the matrix (or ``plans``) and report one record per hop."""
    report = ScenarioReport("cross-version")
    t0 = time.monotonic()
    if plans is None:
        plans, versions = build_plans(opts)
    else:
        labels = {lab for p in plans for h in p.hops for lab in (h.source, h.destination)}
        versions = {lab: builds.get_build(lab).version for lab in labels}
    fw = (opts.ovmf or [DEFAULT_FIRMWARE])[0]
    spec = VmSpec(firmware=fw, firmware_mode="split", name="xv",
                  cpu=str(opts.extra.get("cpu", DEFAULT_CPU)))
    incompat = matrix.load_incompatibilities(opts.extra.get("incompatibilities", matrix.INCOMPATIBILITIES))
    failed = False
    # fast=1 restores each fresh guest from a saved boot of its (build, machine type,
    # firmware) instead of booting it: what the hops check happens after the start
    fast = opts.flag("fast")
    with MachineFactory(spec, base=opts.workdir, fast=fast) as factory:
        runner = Runner(factory, spec, incompat, versions, lambda r: report.add(r, opts))
        try:
            for plan in plans:
                runner.run(plan)
        finally:
            runner._drop()
            failed = not report.ok
            if failed and opts.artifacts is not None:
                report.artifacts = str(factory.save_artifacts(opts.artifacts))
        report.notes.append(
            f"{len(plans)} plans, {len(report.records)} hops, {len(runner.boots)} "
            f"{'restores' if fast else 'boots'} ({sum(runner.boots):.0f} s starting)")  # fmt: skip
    report.duration_s = time.monotonic() - t0
    return report


@scenario("cross-version", "cross-version migration matrix: every QEMU pair both ways, chains, firmware pairs")
def cross_version(opts: ScenarioOptions) -> ScenarioReport:
    return run_cross_version(opts)
