"""The variable-write storm as a scenario: hops of every kind the builds offer, cut while the
guest writes EFI variables (:mod:`harness.storm`).

``--qemu A [--qemu B ...]``: the guest boots on A; each round makes, on the build it runs
on, every hop kind that build offers (live, save-restore, cpr-reboot, cpr-transfer, cpr-exec;
``--set ops=live,cpr-transfer`` chooses; ``--set bandwidth=20M`` caps the live hops' stream
so the guest writes during precopy), then a warm reboot (where edk2 reclaims the full
store), then a live migration to the next ``--qemu`` build (cross-version, on the newest
versioned machine type they all offer).  ``--cycles N`` makes N rounds.  One record per hop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from harness import matrix, migration, storm
from harness.errors import ConfigError
from harness.factory import MachineFactory
from harness.inventory import builds
from harness.inventory.builds import QemuBuild
from harness.inventory.catalog import DEFAULT_FIRMWARE, DEFAULT_QEMU
from harness.scenarios import ScenarioOptions, ScenarioReport, keeping_artifacts, scenario
from harness.spec import VmSpec

#: The hop kinds, in the order a round makes them (each only where the build offers it).
KINDS = ("live", "save-restore", "cpr-reboot", "cpr-transfer", "cpr-exec")
_MODES = {"cpr-reboot": "cpr-reboot", "cpr-transfer": "cpr-transfer", "cpr-exec": "cpr-exec"}


def offered(build: QemuBuild, wanted: tuple[str, ...] = KINDS, shared: bool = True) -> list[str]:
    """The hop kinds of ``wanted`` that ``build``'s schema offers (without ``shared`` guest
    RAM, not the ones that need it)."""
    caps = build.capabilities
    needs_shared = ("cpr-transfer", "cpr-exec")
    return [k for k in wanted if (k not in _MODES or caps.has_mode(_MODES[k]))
            and (shared or k not in needs_shared)]  # fmt: skip


@dataclass
class HopSetup:
    """What a scenario that hops one guest across ``--qemu`` builds derives from its options."""

    arch: str
    qbuilds: list[QemuBuild]
    wanted: tuple[str, ...]  # the hop kinds asked for (``--set ops=``)
    machine: str  # the newest versioned machine type every build offers
    shared: bool  # every build can share guest RAM (the CPR kinds need it)
    fields: dict[str, Any]  # VmSpec fields that follow from the above
    firmware: str


def hop_setup(opts: ScenarioOptions, what: str = "the hop kinds") -> HopSetup:
    """Builds, hop kinds, machine type and spec fields from ``--qemu``, ``--ovmf`` and
    ``--set arch= ops= cpu=`` (shared by the storm and secure-boot scenarios)."""
    arch = str(opts.extra.get("arch", "x86_64"))
    qbuilds = [builds.get_build(v, arch) for v in (opts.qemu or [DEFAULT_QEMU])]
    raw = opts.extra.get("ops", KINDS)
    wanted = (raw,) if isinstance(raw, str) else tuple(raw)
    bad = [k for k in wanted if k not in KINDS]
    if bad:
        raise ConfigError(f"ops={','.join(bad)}: unknown; {what} are {', '.join(KINDS)}")
    family = "virt" if arch == "aarch64" else "pc-q35"
    machine = qbuilds[0].capabilities.resolve_machine("virt" if arch == "aarch64" else "q35")
    for other in qbuilds[1:]:
        machine = builds.newest_common_machine(qbuilds[0].capabilities, other.capabilities, family)
    # memfd RAM shared with QEMU's auxiliary RAM where every build can (the CPR kinds need
    # it; older builds lack -machine aux-ram-share)
    shared = all(b.capabilities.has_mode("cpr-transfer") for b in qbuilds)
    fields: dict[str, Any] = dict(migration.spec_fields_for("cpr-transfer")) if shared else {}
    if arch == "aarch64":
        fields["cpu"] = str(opts.extra.get("cpu", "cortex-a57"))
    return HopSetup(arch, qbuilds, wanted, machine, shared, fields, (opts.ovmf or [DEFAULT_FIRMWARE])[0])


def parse_bandwidth(raw: object) -> int | None:
    """``--set bandwidth=20M``: the live hops' stream cap in bytes/s (K, M, G suffixes)."""
    if raw is None or raw == "":
        return None
    text = str(raw).strip()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    try:
        value = int(float(digits) * scale)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"bandwidth={raw}: expected a positive number of bytes/s, e.g. 20M")
    return value


def plan(qbuilds: list[QemuBuild], rounds: int, wanted: tuple[str, ...] = KINDS,
         reboot: bool = True, shared: bool = True) -> list[tuple[str, QemuBuild | None]]:
    """The hops of ``rounds`` rounds over ``qbuilds`` (see the module docstring)."""
    hops: list[tuple[str, QemuBuild | None]] = []
    for r in range(rounds):
        here = qbuilds[r % len(qbuilds)]
        hops += [(k, here) for k in offered(here, wanted, shared)]
        if reboot:
            hops.append(("reboot", None))
        if len(qbuilds) > 1:
            hops.append(("live", qbuilds[(r + 1) % len(qbuilds)]))
    return hops


def judge(rec: dict[str, Any], hop: storm.StormHop, incompat: matrix.Incompatibilities,
          arch: str, machine: str) -> None:
    """A hop's record judged against the expected incompatibilities (scenario "storm")."""
    expected = None
    if hop.op not in ("reboot", "stop"):
        expected = incompat.lookup(builds.get_build(hop.source, arch).version,
                                   builds.get_build(hop.destination, arch).version, hop.op,
                                   machine, arch=arch, scenario="storm",
                                   signature=None if hop.ok else hop.signature)  # fmt: skip
    matrix.record_verdict(rec, matrix.judge(not hop.ok, hop.signature, expected), expected)


@scenario("storm", "hops of every kind cut while the guest writes EFI variables (the storm)")
def run_storm(opts: ScenarioOptions) -> ScenarioReport:
    report = ScenarioReport("storm")
    t0 = time.monotonic()
    setup = hop_setup(opts, "the storm's hop kinds")
    arch, qbuilds, wanted, machine = setup.arch, setup.qbuilds, setup.wanted, setup.machine
    shared, fields, firmware = setup.shared, setup.fields, setup.firmware
    spec = VmSpec(qemu=qbuilds[0].label, firmware=firmware, machine=machine, arch=arch,
                  name="storm", **fields)  # fmt: skip
    reboot = opts.flag("reboot", default=True)
    bandwidth = parse_bandwidth(opts.extra.get("bandwidth"))
    hops = plan(qbuilds, max(1, opts.cycles), wanted, reboot, shared)
    incompat = matrix.load_incompatibilities(opts.extra.get("incompatibilities", matrix.INCOMPATIBILITIES))
    with MachineFactory(spec, base=opts.workdir) as factory, keeping_artifacts(report, opts, factory, "storm") as run:
        vm = factory(fast=opts.flag("fast"))

        def record(hop: storm.StormHop) -> None:
            rec = hop.to_json()
            rec.update(scenario="storm", arch=arch, machine=machine, firmware=firmware,
                       downtime_ms=hop.result.get("downtime_ms"))  # fmt: skip
            judge(rec, hop, incompat, arch, machine)
            report.add(rec, opts)

        storm.run(vm, hops, on_hop=record, dump_dir=opts.workdir or vm.workdir,
                  bandwidth=bandwidth)
        run.failed = not report.ok
    report.duration_s = time.monotonic() - t0
    return report
