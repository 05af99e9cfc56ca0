"""The cross-version migration matrix: which hops to run, and which are known not to work.

Data flows one way: the QEMU builds (catalogue plus registered and ``--qemu`` builds) become
:class:`Endpoint` values (label, numeric version, versioned machine types); from those,
:func:`pair_plans`, :func:`chains` and :func:`firmware_plans` make :class:`Plan` values,
each an ordered list of :class:`Hop` values that one guest walks in turn.  Nothing here
starts QEMU; :mod:`harness.scenarios.cross_version` runs the plans.

Coverage: with operations ``o1, o2, ...``, the plan for the ordered pair (A, B) runs
``o1`` A -> B, ``o2`` B -> A, ``o3`` A -> B ...  on one guest booted on A, and the plan for
(B, A) runs the complement, so every ordered pair gets every operation exactly once with
one boot per ordered pair.

Expected incompatibilities are data (``firmware/expected-incompatibilities.toml``): a
cross-version hop QEMU does not support, named by version constraints, the operations,
the failure signature it must show and the reason.  :func:`load_incompatibilities`
refuses a malformed file with a :class:`~harness.errors.CatalogError` naming it.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import CatalogError, ConfigError, UnknownVersionError
from harness.inventory.catalog import Version
from harness.paths import FIRMWARE_DIR

if TYPE_CHECKING:
    from harness.inventory.builds import Capabilities, QemuBuild
    from harness.inventory.firmware import FirmwareBuild
    from harness.migration import MigrationResult

INCOMPATIBILITIES = FIRMWARE_DIR / "expected-incompatibilities.toml"
DEFAULT_OPS = ("live", "save-restore")
MATRIX_OPS = ("live", "save-restore")
# what an [[incompatible]] entry may name: the cross-version matrix's operations, and the
# CPR kinds that scenarios (storm, secure-boot) judge against the same data
ENTRY_OPS = ("live", "save-restore", "cpr-reboot", "cpr-transfer", "cpr-exec")
_MACHINE_RE = re.compile(r"^(pc-q35|pc-i440fx|virt)-(\d+\.\d+)$")
_CONSTRAINT_RE = re.compile(r"^\s*(>=|<=|==|!=|>|<)?\s*(\d+(?:\.\d+)*)\s*$")


# --- endpoints -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One QEMU build as the matrix sees it: a label, its numeric version, its machine types."""

    label: str
    version: Version
    machines: tuple[str, ...] = ()

    @classmethod
    def of(cls, build: QemuBuild) -> Endpoint:
        return cls.from_capabilities(build.label, build.capabilities)

    @classmethod
    def from_capabilities(cls, label: str, caps: Capabilities) -> Endpoint:
        return cls(label, Version.parse(caps.version), tuple(caps.machine_names()))

    def __str__(self) -> str:
        return self.label


def sort_numeric(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """Oldest first by numeric version (10.0 after 7.2); one endpoint per label."""
    seen: dict[str, Endpoint] = {}
    for e in endpoints:
        seen.setdefault(e.label, e)
    return sorted(seen.values(), key=lambda e: (e.version, e.label))


def endpoints(versions: Sequence[str] = (), arch: str = "x86_64") -> list[Endpoint]:
    """The builds to cross: the ``--qemu`` values when given (catalogue versions, registered
    labels or paths), otherwise every catalogue and registered build; numeric order."""
    from harness.inventory import builds

    chosen = [builds.get_build(v, arch) for v in versions] if versions else builds.all_builds(arch)
    return sort_numeric(Endpoint.of(b) for b in chosen)


def newest_common_machine(eps: Sequence[Endpoint], family: str = "pc-q35") -> str:
    """The newest versioned machine type of ``family`` every endpoint offers."""
    if not eps:
        raise ConfigError("no QEMU builds to find a common machine type for")
    common: set[Version] | None = None
    names: dict[Version, str] = {}
    for e in eps:
        mine: set[Version] = set()
        for name in e.machines:
            m = _MACHINE_RE.match(name)
            if m and m.group(1) == family:
                v = Version.parse(m.group(2))
                mine.add(v)
                names.setdefault(v, name)
        common = mine if common is None else common & mine
    if not common:
        raise UnknownVersionError(
            f"common {family} machine type", " / ".join(e.label for e in eps), []
        )
    return names[max(common)]


# --- plans ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hop:
    """One migration of a guest: ``op`` from build ``source`` to build ``destination``."""

    source: str
    destination: str
    op: str
    machine: str
    plan: str
    index: int
    firmware: str | None = None
    dest_firmware: str | None = None

    @property
    def pair(self) -> str:
        return f"{self.source} -> {self.destination}"


@dataclass(frozen=True)
class Plan:
    """Hops one guest walks in order: booted on ``boot`` (with ``firmware``), pinned to
    ``machine``.  ``follows`` names a plan whose guest this one may carry on."""

    name: str
    kind: str  # "pair" | "chain" | "firmware"
    boot: str
    machine: str
    hops: tuple[Hop, ...]
    firmware: str | None = None
    follows: str | None = None
    reboot_checks: bool = False
    meta: Mapping[str, str] = field(default_factory=dict)


def _check_ops(ops: Sequence[str]) -> tuple[str, ...]:
    from harness.migration import OPERATIONS

    if not ops:
        raise ConfigError("no migration operations given for the cross-version matrix")
    for op in ops:
        if op not in MATRIX_OPS:
            known = ", ".join(o for o in OPERATIONS if o in MATRIX_OPS)
            raise ConfigError(f"operation {op!r} cannot cross versions here; use one of {known}")
    return tuple(dict.fromkeys(ops))


def ordered_pairs(eps: Sequence[Endpoint]) -> list[tuple[Endpoint, Endpoint]]:
    """Every ordered pair of distinct builds, by numeric version of source then destination."""
    eps = sort_numeric(eps)
    return [(a, b) for a, b in itertools.permutations(eps, 2)]


def pair_plans(eps: Sequence[Endpoint], ops: Sequence[str] = DEFAULT_OPS) -> list[Plan]:
    """One plan per ordered pair (A, B): ``ops[0]`` A -> B, ``ops[1]`` B -> A, ... on one
    guest booted on A with the newest machine type both offer."""
    ops = _check_ops(ops)
    plans = []
    for a, b in ordered_pairs(eps):
        machine = newest_common_machine([a, b])
        name = f"pair {a.label} -> {b.label}"
        hops = []
        for i, op in enumerate(ops):
            src, dst = (a, b) if i % 2 == 0 else (b, a)
            hops.append(Hop(src.label, dst.label, op, machine, name, i + 1))
        plans.append(Plan(name, "pair", a.label, machine, tuple(hops)))
    return plans


def chains(eps: Sequence[Endpoint], op: str = "live") -> list[Plan]:
    """A fleet upgrade (every build, oldest to newest) and a rollback (newest to the one
    before), on the machine type all builds offer; the rollback carries on the upgraded
    guest when it is still running.  Fewer than two builds: no chains."""
    (op,) = _check_ops([op])
    eps = sort_numeric(eps)
    if len(eps) < 2:
        return []
    machine = newest_common_machine(eps)
    up = tuple(
        Hop(a.label, b.label, op, machine, "upgrade", i + 1)
        for i, (a, b) in enumerate(itertools.pairwise(eps))
    )
    newest, previous = eps[-1], eps[-2]
    down = (Hop(newest.label, previous.label, op, machine, "rollback", 1),)
    return [
        Plan("upgrade", "chain", eps[0].label, machine, up,
             meta={"path": " -> ".join(e.label for e in eps)}),
        Plan("rollback", "chain", newest.label, machine, down, follows="upgrade",
             meta={"path": f"{newest.label} -> {previous.label}"}),
    ]  # fmt: skip


@dataclass(frozen=True)
class FirmwareEndpoint:
    """One firmware build as the matrix sees it: version and the sizes of its flash pair."""

    version: str
    code_size: int
    vars_size: int

    @classmethod
    def of(cls, fw: FirmwareBuild) -> FirmwareEndpoint:
        desc = fw.select()
        return cls(fw.version, desc.code_size, desc.vars_size)


def firmware_pairs(fws: Sequence[FirmwareEndpoint]) -> list[tuple[FirmwareEndpoint, FirmwareEndpoint]]:
    """Consecutive firmware upgrades (numeric order) whose flash layouts are identical:
    only those can migrate (the flash is a RAM block whose size must match)."""
    ordered = sorted(fws, key=lambda f: Version.parse(f.version))
    return [
        (a, b)
        for a, b in itertools.pairwise(ordered)
        if (a.code_size, a.vars_size) == (b.code_size, b.vars_size)
    ]


def firmware_plans(
    qemu: Endpoint, fws: Sequence[FirmwareEndpoint], op: str = "live"
) -> list[Plan]:
    """One plan per firmware upgrade pair: a guest booted on the older firmware migrates
    (same QEMU build) to a destination started with the newer firmware's CODE."""
    (op,) = _check_ops([op])
    machine = newest_common_machine([qemu])
    plans = []
    for a, b in firmware_pairs(fws):
        name = f"firmware {a.version} -> {b.version}"
        hop = Hop(qemu.label, qemu.label, op, machine, name, 1, a.version, b.version)
        plans.append(Plan(name, "firmware", qemu.label, machine, (hop,), firmware=a.version,
                          reboot_checks=True))  # fmt: skip
    return plans


# --- expected incompatibilities ----------------------------------------------------------


@dataclass(frozen=True)
class Incompatibility:
    """A hop QEMU does not support: it must fail, showing ``signature``."""

    source: str
    destination: str
    ops: tuple[str, ...]
    signatures: tuple[str, ...]  # the failure may show as any of them (one cause, several faces)
    reason: str
    machine: str | None = None
    where: str = ""
    firmware: str | None = None  # constraint on the source's firmware (firmware upgrades)
    dest_firmware: str | None = None  # and on the destination's
    boot: str | None = None  # constraint on the build the guest booted on (device ABI)
    arch: str | None = None  # the guest architecture it is seen on (default: any)
    scenario: str | None = None  # the scenario it is seen in (default: any)
    intermittent: bool = False  # a race: the hop may pass; when it fails, with the signature

    @property
    def signature(self) -> str:
        """The signatures as one name for records and reports (``a|b`` for several)."""
        return "|".join(self.signatures)

    def applies(self, source: Version, destination: Version, op: str, machine: str,
                firmware: Version | None = None, dest_firmware: Version | None = None,
                boot: Version | None = None, arch: str | None = None,
                scenario: str | None = None) -> bool:
        return (
            _version_ok(source, self.source)
            and _version_ok(destination, self.destination)
            and (not self.ops or op in self.ops)
            and (self.machine is None or self.machine == machine)
            and (self.firmware is None or (firmware is not None and _version_ok(firmware, self.firmware)))
            and (self.dest_firmware is None
                 or (dest_firmware is not None and _version_ok(dest_firmware, self.dest_firmware)))
            and (self.boot is None or (boot is not None and _version_ok(boot, self.boot)))
            and (self.arch is None or self.arch == arch)
            and (self.scenario is None or self.scenario == scenario)
        )  # fmt: skip


@dataclass(frozen=True)
class BootIncompatibility:
    """A QEMU x firmware pair that does not boot: the boot must fail, showing ``signature``."""

    qemu: str
    firmware: str
    signature: str
    reason: str
    where: str = ""

    def applies(self, qemu: Version, firmware: Version) -> bool:
        return _version_ok(qemu, self.qemu) and _version_ok(firmware, self.firmware)


@dataclass(frozen=True)
class DeprecatedMachine:
    """Versioned machine types a QEMU build deprecates: a hop onto such a build on such a
    type must print QEMU's deprecation ``text``, and is then judged as usual (it still has
    to migrate).  A warning no entry covers, or an entry whose warning does not appear,
    is a problem of the hop: the file is kept true."""

    qemu: str
    family: str
    versions: str
    text: str
    reason: str
    where: str = ""

    def applies(self, qemu: Version, machine: str) -> bool:
        m = _MACHINE_RE.match(machine)
        return (
            m is not None and m.group(1) == self.family and _version_ok(qemu, self.qemu)
            and _version_ok(Version.parse(m.group(2)), self.versions)
        )  # fmt: skip


_DEPRECATED_RE = re.compile(r"warning: Machine type '([^']+)' is deprecated: ?([^\n]*)")


def deprecation_warnings(output: str) -> dict[str, str]:
    """Machine type -> QEMU's deprecation text, from a QEMU's output."""
    return {m.group(1): m.group(2).strip() for m in _DEPRECATED_RE.finditer(output)}


def _version_ok(have: Version, constraint: str) -> bool:
    m = _CONSTRAINT_RE.match(constraint)
    if not m:  # validated on load; a hand-made entry with a bad constraint matches nothing
        return False
    op, want = m.group(1), Version.parse(m.group(2))
    if op is None:
        return have.matches(want)
    return {
        ">=": have >= want, "<=": have <= want, ">": have > want, "<": have < want,
        "==": have == want, "!=": have != want,
    }[op]  # fmt: skip


@dataclass(frozen=True)
class Incompatibilities:
    """The expected-incompatibility entries of one data file."""

    path: Path
    entries: tuple[Incompatibility, ...] = ()
    boots: tuple[BootIncompatibility, ...] = ()
    machines: tuple[DeprecatedMachine, ...] = ()

    def lookup_machine(self, qemu: Version, machine: str) -> DeprecatedMachine | None:
        """The ``[[deprecated-machine]]`` entry covering ``machine`` on this build, or None."""
        for entry in self.machines:
            if entry.applies(qemu, machine):
                return entry
        return None

    def machine_problems(self, qemu: Version, label: str, machine: str, output: str) -> tuple[list[str], DeprecatedMachine | None]:
        """Problems of a QEMU process's output against the deprecation entries (and the
        entry that covers its machine type, if any)."""
        warned = deprecation_warnings(output)
        entry = self.lookup_machine(qemu, machine)
        problems = []
        for name, text in sorted(warned.items()):
            covering = self.lookup_machine(qemu, name)
            if covering is None:
                problems.append(f"QEMU {label} deprecates machine type {name} ({text!r}), and no "
                                f"[[deprecated-machine]] entry of {self.path.name} says so")  # fmt: skip
            elif covering.text not in text:
                problems.append(f"QEMU {label} deprecates {name} with {text!r}; {covering.where} "
                                f"expects {covering.text!r}")  # fmt: skip
        if entry is not None and machine not in warned:
            problems.append(f"{entry.where} says QEMU {label} deprecates {machine}, but it printed "
                            "no deprecation warning for it")  # fmt: skip
        return problems, entry

    def lookup(self, source: Version, destination: Version, op: str, machine: str,
               firmware: Version | None = None, dest_firmware: Version | None = None,
               boot: Version | None = None, arch: str | None = None,
               scenario: str | None = None, signature: str | None = None) -> Incompatibility | None:
        """The entry covering this hop, or None (the hop must then succeed).  Several may
        cover it (an intermittent one for the source build everywhere, a specific one for a
        device): the first that names ``signature`` (the hop's failure, if any), else the
        first that is not intermittent (the hop must fail), else the first."""
        covering = [e for e in self.entries
                    if e.applies(source, destination, op, machine, firmware, dest_firmware, boot, arch, scenario)]  # fmt: skip
        if signature is not None:
            for entry in covering:
                if signature in entry.signatures:
                    return entry
        return next((e for e in covering if not e.intermittent), covering[0] if covering else None)

    def lookup_boot(self, qemu: Version, firmware: Version) -> BootIncompatibility | None:
        """The first ``[[boot]]`` entry covering this pair, or None (it must then boot)."""
        for entry in self.boots:
            if entry.applies(qemu, firmware):
                return entry
        return None


def _text(path: Path, where: str, table: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    if key not in table:
        if required:
            raise CatalogError(path, f"{where}: missing field {key!r}")
        return None
    value = table[key]
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(path, f"{where}: field {key!r} must be a non-empty string")
    return value.strip()


def _tables(path: Path, data: Mapping[str, Any], key: str, fields: set[str]) -> list[tuple[str, dict[str, Any]]]:
    raw = data.get(key, [])
    if not isinstance(raw, list):
        raise CatalogError(path, f"{key!r} must be an array of tables ([[{key}]])")
    out = []
    for i, table in enumerate(raw):
        where = f"[[{key}]] entry {i + 1}"
        if not isinstance(table, dict):
            raise CatalogError(path, f"{where}: expected a table")
        extra = sorted(set(table) - fields)
        if extra:
            raise CatalogError(path, f"{where}: unknown field(s) {', '.join(extra)}")
        out.append((where, table))
    return out


def _constraint(path: Path, where: str, table: Mapping[str, Any], key: str) -> str:
    value = _text(path, where, table, key)
    assert value is not None
    if not _CONSTRAINT_RE.match(value):
        raise CatalogError(path, f"{where}: {key} {value!r} is not a version constraint "
                                 "such as '10.0', '>=8.2' or '<6'")  # fmt: skip
    return value


def _signature_and_reason(path: Path, where: str, table: Mapping[str, Any]) -> tuple[str, str]:
    sigs, reason = _signatures_and_reason(path, where, table, several=False)
    return sigs[0], reason


def _signatures_and_reason(path: Path, where: str, table: Mapping[str, Any], *,
                           several: bool = True) -> tuple[tuple[str, ...], str]:
    """``signature``: a known signature's name, or (``several``) a list of them."""
    from harness import signatures

    value = table.get("signature")
    if several and isinstance(value, list):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise CatalogError(path, f"{where}: field 'signature' must be a name or a non-empty list of names")
        sigs = tuple(value)
    else:
        sig = _text(path, where, table, "signature")
        assert sig is not None
        sigs = (sig,)
    for sig in sigs:
        try:
            signatures.by_name(sig)
        except ConfigError as exc:
            raise CatalogError(path, f"{where}: {exc}") from exc
    reason = _text(path, where, table, "reason")
    assert reason is not None
    return sigs, reason


def parse_incompatibilities(path: Path, data: Mapping[str, Any]) -> Incompatibilities:
    """Validate parsed TOML: every entry needs version constraints, a known signature and
    a reason; ``ops`` (optional) must name matrix operations.  ``[[incompatible]]`` tables
    are migration hops, ``[[boot]]`` tables QEMU x firmware pairs that do not boot."""
    unknown = sorted(set(data) - {"incompatible", "boot", "deprecated-machine"})
    if unknown:
        raise CatalogError(path, f"unknown top-level key(s) {', '.join(unknown)}; expected "
                                 "[[incompatible]], [[boot]] and [[deprecated-machine]] tables")  # fmt: skip
    hops = []
    fields = {"source", "destination", "ops", "machine", "signature", "reason", "firmware",
              "dest_firmware", "boot", "arch", "scenario", "intermittent"}
    for i, (where, table) in enumerate(_tables(path, data, "incompatible", fields)):
        src = _constraint(path, where, table, "source")
        dst = _constraint(path, where, table, "destination")
        ops = table.get("ops", [])
        if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
            raise CatalogError(path, f"{where}: field 'ops' must be a list of strings")
        bad = [o for o in ops if o not in ENTRY_OPS]
        if bad:
            raise CatalogError(path, f"{where}: unknown operation(s) {', '.join(bad)}; "
                                     f"known: {', '.join(ENTRY_OPS)}")  # fmt: skip
        sigs, reason = _signatures_and_reason(path, where, table)
        machine = _text(path, where, table, "machine", required=False)
        fws: dict[str, Any] = {k: _constraint(path, where, table, k) if k in table else None
                               for k in ("firmware", "dest_firmware", "boot")}  # fmt: skip
        extra: dict[str, Any] = {}
        for key in ("arch", "scenario"):
            if key in table:
                extra[key] = _text(path, where, table, key)
        if "intermittent" in table:
            if not isinstance(table["intermittent"], bool):
                raise CatalogError(path, f"{where}: field 'intermittent' must be true or false")
            extra["intermittent"] = table["intermittent"]
        hops.append(Incompatibility(src, dst, tuple(ops), sigs, reason, machine,
                                    f"{path.name} entry {i + 1}", **fws, **extra))  # fmt: skip
    boots = []
    for i, (where, table) in enumerate(_tables(path, data, "boot", {"qemu", "firmware", "signature", "reason"})):
        qemu = _constraint(path, where, table, "qemu")
        firmware = _constraint(path, where, table, "firmware")
        sig, reason = _signature_and_reason(path, where, table)
        boots.append(BootIncompatibility(qemu, firmware, sig, reason, f"{path.name} boot entry {i + 1}"))
    machines = []
    fields = {"qemu", "family", "versions", "text", "reason"}
    for i, (where, table) in enumerate(_tables(path, data, "deprecated-machine", fields)):
        family = _text(path, where, table, "family")
        if family not in ("pc-q35", "pc-i440fx", "virt"):
            raise CatalogError(path, f"{where}: family {family!r} is not pc-q35, pc-i440fx or virt")
        warn_text = _text(path, where, table, "text")
        why = _text(path, where, table, "reason")
        assert family is not None and warn_text is not None and why is not None
        machines.append(DeprecatedMachine(
            _constraint(path, where, table, "qemu"), family,
            _constraint(path, where, table, "versions"), warn_text, why,
            f"{path.name} deprecated-machine entry {i + 1}"))  # fmt: skip
    return Incompatibilities(path, tuple(hops), tuple(boots), tuple(machines))


def load_incompatibilities(path: Path = INCOMPATIBILITIES) -> Incompatibilities:
    """Read and validate the expected-incompatibilities file."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise CatalogError(path, "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(path, f"not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(path, f"not valid UTF-8: {exc}") from exc
    return parse_incompatibilities(path, data)


# --- judging a hop -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a hop's outcome means against the expectations."""

    ok: bool
    expected_failure: bool
    note: str = ""


def judge(failed: bool, signature: str | None,
          expected: Incompatibility | BootIncompatibility | None) -> Verdict:
    """A hop that fails as its entry says is an expected failure; a listed hop that passes
    is a failure too (the data is stale); anything else that fails fails."""
    if expected is None:
        return Verdict(ok=not failed, expected_failure=False)
    if not failed:
        if isinstance(expected, Incompatibility) and expected.intermittent:
            return Verdict(True, False, f"passed this time; listed as an intermittent failure "
                                        f"({expected.where}: {expected.signature})")  # fmt: skip
        return Verdict(False, False, f"listed as incompatible ({expected.where}: {expected.signature}) "
                                     "but it passed: remove or narrow the entry")  # fmt: skip
    if signature is not None and signature in _expected_signatures(expected):
        return Verdict(False, True, f"expected: {expected.reason}")
    return Verdict(False, False, f"failed with {signature or 'an unclassified error'}, not the "
                                 f"expected {expected.signature} ({expected.where})")  # fmt: skip


def record_verdict(rec: dict[str, Any], verdict: Verdict, expected: Incompatibility | None) -> dict[str, Any]:
    """Put a hop's verdict into its record: ``ok``, ``expected_failure``, and the entry's
    signature and reason when one covers the hop."""
    rec["ok"], rec["expected_failure"] = verdict.ok, verdict.expected_failure
    if expected is not None:
        rec["expected_signature"], rec["reason"] = expected.signature, expected.reason
        rec["expected_signatures"] = list(_expected_signatures(expected))  # "a|b" above, as a list
    if verdict.note:
        rec["note"] = verdict.note
    return rec


def judge_result(res: MigrationResult, incompat: Incompatibilities, *,
                 scenario: str | None = None) -> tuple[Verdict, Incompatibility | None]:
    """A migration result judged against the entries: its builds, operation, machine
    type and architecture (and ``scenario``) pick the entry, its signature the verdict."""
    from harness.inventory import builds

    expected = incompat.lookup(builds.get_build(res.source, res.arch).version,
                               builds.get_build(res.destination, res.arch).version,
                               res.op, res.machine, arch=res.arch, scenario=scenario,
                               signature=None if res.ok else res.signature)  # fmt: skip
    return judge(not res.ok, res.signature, expected), expected


def _expected_signatures(expected: Incompatibility | BootIncompatibility) -> tuple[str, ...]:
    return expected.signatures if isinstance(expected, Incompatibility) else (expected.signature,)
