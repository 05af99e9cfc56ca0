"""The nightly matrix: what it covers (data), which share a shard runs, and running it
through pytest with xdist into ``results/<timestamp>/``.

Data flows one way: :data:`DEFAULT_KINDS` (one row per scenario family: which runner,
which axis of builds, which migration mode a build must offer, a cost estimate) and the
provisioned builds become a :class:`Matrix` of :class:`Entry` values, written to
``matrix.json`` in the results directory.  :func:`run` starts pytest on
``harness/nightly/suite/test_matrix.py`` (one thin test item per entry, parametrized from that
file through ``HARNESS_NIGHTLY_MATRIX``) plus the integration test files named by
``pytest`` rows, with ``-n JOBS``; each item calls :func:`run_entry` and appends a
:class:`harness.nightly.results.RunRecord` to ``records/<worker>.jsonl``.  Afterwards
:mod:`harness.nightly.report` joins those records with ``junit.xml`` into ``results.json`` and
``report.html``.

Runners: ``scenario`` (a function of :mod:`harness.scenarios`), ``boot`` (boot a guest on a
QEMU x OVMF pair and reach SSH), ``pytest`` (existing integration test files, recorded
from JUnit only) and ``inject`` (a deliberate failure for the harness's own tests).

Axes: ``qemu*ovmf`` (every pair), ``qemu+ovmf`` (every QEMU with the default firmware and
the newest QEMU with every other firmware), ``pairs`` / ``chains`` / ``firmware-pairs``
(cross-version plans of :mod:`harness.matrix`, one entry per plan), ``newest`` (the newest
QEMU with the default firmware), ``tests`` (pytest node ids).

Sharding (:func:`shard`): entries are sorted by estimated cost (then id) and dealt
greedily to the least loaded of N shards, so every runner computing the same matrix picks
the same disjoint share and the shards' wall times stay close.

Rotation (:func:`rotate`): the default matrix does not fit 30 minutes on a machine with
half this one's CPU (about 60 min of two workers' time there), so by default each night
runs its *core* (every scenario family on the newest QEMU with the default firmware) and
one of N cost-balanced thirds of the rest, chosen by the date: every entry runs at least
once every N nights, and a night can be replayed with ``--night``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from harness import matrix, signatures
from harness.errors import ConfigError, HarnessError
from harness.inventory.catalog import DEFAULT_FIRMWARE
from harness.matrix import BootIncompatibility
from harness.paths import NIGHTLY_SUITE_DIR, PACKAGE_DIR, checkout
from harness.scenarios import ScenarioOptions, ScenarioReport, setting_value

MATRIX_ENV = "HARNESS_NIGHTLY_MATRIX"
MATRIX_FILE = "matrix.json"
RECORDS_DIR = "records"
ARTIFACTS_DIR = "artifacts"
# the nightly's own test module ships in the package: its node ids are relative to the
# directory that holds the package (the checkout, or site-packages)
TEST_FILE = "harness/nightly/suite/test_matrix.py"
TEST_FUNCTION = "test_scenario"
DEFAULT_OVMF = DEFAULT_FIRMWARE
DEFAULT_CYCLES = 3
DEFAULT_JOBS = 2
DEFAULT_TIMEOUT_S = 3 * 3600.0
#: nights a default-matrix rotation spans (the core runs every night); measured: the whole
#: matrix is 60 min of two workers at half this machine's CPU, a third plus the core 25 min
DEFAULT_ROTATION = 3
INJECTED = "injected-failure"
RUNNERS = ("scenario", "boot", "pytest", "inject")
AXES = ("qemu*ovmf", "qemu+ovmf", "qemu", "pairs", "chains", "firmware-pairs", "newest", "tests")


@dataclass(frozen=True)
class Kind:
    """One row of the matrix definition: a scenario family and how it spreads over builds."""

    scenario: str  # name in reports and for --scenario
    runner: str  # one of RUNNERS
    axis: str  # one of AXES
    target: str | None = None  # registry scenario name (runner "scenario")
    mode: str | None = None  # migration mode every build of an entry must offer
    modes: tuple[str, ...] = ()  # scenario modes (``ScenarioOptions.mode``), one entry each
    cycles: bool = False  # back-to-back: takes --cycles
    cost_s: float = 30.0  # estimated wall time of one entry here (TCG, 2 cores)
    tests: tuple[str, ...] = ()  # pytest node ids (runner "pytest")
    arch: str = "x86_64"  # guest architecture; other than x86_64: the selected builds that have it
    settings: tuple[tuple[str, str], ...] = ()  # scenario settings (``--set K=V``) of its entries


EXHAUSTIVE_TESTS = tuple(f"tests/integration/{t}" for t in (
    "test_aarch64.py::test_fwcfg_boot_order_matches_the_record",
    "test_aarch64.py::test_os_state_persists_across_back_to_back_cpr_transfer",
    "test_aarch64.py::test_new_releases_migrate_and_cpr_exec_on_aarch64",
    "test_boot.py::test_uefi_split_pflash_boot_and_ssh",
    "test_images_boot.py::test_nested_l1_runs_l2_with_kvm",
    "test_cross_version.py::test_upgrade_and_rollback_chains",
    "test_distro_validation.py::test_nightly_runs_trixies_own_packages_against_the_reference",
    "test_nested.py::test_live_migrate_l1_twice",
    "test_nested.py::test_nested_migration_inside_l1",
    "test_nested.py::test_cross_version_l1_migration_7_2_to_10_0_2",
    "test_secure_boot.py::test_aarch64_secure_boot_and_vtpm_live_and_cpr_transfer",
    "test_secure_boot.py::test_smbase_lock_lost_on_10_0_2_and_kept_across_to_10_0_13",
    "test_storm.py::test_storm_aarch64_cpr_transfer_live_and_reboot",
    "test_storm.py::test_storm_aarch64_capped_live_loses_writes",
))  # fmt: skip

# The default nightly matrix.  cost_s: wall seconds of one entry measured in a full run here
# (`make nightly`, TCG, 2 cores, quiet, 2026-11-22; cpr-exec has never run here and is
# estimated like cpr-reboot); used for ordering and shard balance.
DEFAULT_KINDS: tuple[Kind, ...] = (
    Kind("boot", "boot", "qemu*ovmf", cost_s=13),
    # every live and save-restore hop also compares the guests' RAM before the new QEMU
    # runs the guest (about 4 s a hop here): lost dirty pages show as guest-ram-differs
    Kind("live", "scenario", "qemu+ovmf", target="live", cycles=True, cost_s=35,
         settings=(("verify_ram", "1"),)),
    Kind("save-restore", "scenario", "qemu+ovmf", target="save-restore", cycles=True, cost_s=37,
         settings=(("verify_ram", "1"),)),
    Kind("cpr-reboot", "scenario", "qemu+ovmf", target="cpr-reboot", mode="cpr-reboot", cycles=True, cost_s=19),
    Kind("cpr-transfer", "scenario", "qemu+ovmf", target="cpr-transfer", mode="cpr-transfer", cycles=True, cost_s=20),
    Kind("cpr-exec", "scenario", "qemu+ovmf", target="cpr-exec", mode="cpr-exec", cycles=True, cost_s=20),
    Kind("storm", "scenario", "qemu", target="storm", cost_s=70),
    Kind("storm-aarch64", "scenario", "qemu", target="storm", cost_s=90, arch="aarch64"),
    Kind("secure-boot", "scenario", "qemu", target="secure-boot", cost_s=75),
    Kind("secure-boot-aarch64", "scenario", "qemu", target="secure-boot", cost_s=75, arch="aarch64"),
    Kind("secure-boot", "scenario", "chains", target="secure-boot", cost_s=150,
         settings=(("ops", "live"), ("restart", "0"))),
    Kind("cross-version", "scenario", "pairs", target="cross-version", cost_s=22),
    Kind("cross-version", "scenario", "chains", target="cross-version", cost_s=24),
    Kind("firmware-upgrade", "scenario", "firmware-pairs", target="cross-version", cost_s=48),
    Kind("firmware-upgrade", "pytest", "tests", cost_s=46,
         tests=("tests/integration/test_firmware_upgrade.py",)),
    Kind("boot-order", "pytest", "tests", cost_s=165, tests=("tests/integration/test_bootorder.py",)),
    # what `make test` deselects as `exhaustive`: more variants of capabilities it checks
    # once (tests/integration/test_exhaustive_in_nightly.py keeps this list complete)
    Kind("exhaustive", "pytest", "tests", cost_s=810, tests=EXHAUSTIVE_TESTS),
    Kind("nested", "scenario", "newest", target="nested", modes=("live",), cost_s=30),
    # the announce-timer-freed finding: a guest reset after a load with announce-rounds 0
    Kind("announce-reset", "scenario", "qemu", target="announce-reset", cost_s=8),
)  # fmt: skip


def judge_boot(step: dict[str, Any], expected: BootIncompatibility | None) -> dict[str, Any]:
    """Mark a boot step against its ``[[boot]]`` entry (see :func:`harness.matrix.judge`)."""
    if expected is None:
        return step
    booted = bool(step.get("ok"))
    verdict = matrix.judge(not booted, step.get("signature"), expected)
    step["reason"] = expected.reason
    if verdict.expected_failure:
        step["expected_failure"] = True
    else:  # it booted (the entry is stale), or failed some other way
        step.update(ok=False, status="failed", error=f"{verdict.note}; {step.get('error') or 'booted'}")
        if booted:
            step["signature"] = "unexpected-pass"
    return step


@dataclass(frozen=True)
class Entry:
    """One scenario run of the matrix (one test item, or a set of pytest node ids)."""

    id: str
    scenario: str
    runner: str
    qemu: tuple[str, ...] = ()
    ovmf: tuple[str, ...] = ()
    cycles: int = 1
    mode: str | None = None
    target: str | None = None
    part: str | None = None  # cross-version: pairs | chains | firmware
    plan: str | None = None  # cross-version plan name
    tests: tuple[str, ...] = ()
    cost_s: float = 30.0
    arch: str = "x86_64"
    settings: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Entry:
        d = dict(data)
        for key in ("qemu", "ovmf", "tests"):
            d[key] = tuple(d.get(key) or ())
        d["settings"] = tuple(tuple(kv) for kv in d.get("settings") or ())
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"matrix entry {data.get('id', '?')!r}: {exc}") from exc


@dataclass
class Matrix:
    """The matrix of one run: every entry, the selected share, and what was left out why."""

    entries: list[Entry]
    selected: list[str]
    not_applicable: list[str] = field(default_factory=list)
    shard: str | None = None
    qemu: list[str] = field(default_factory=list)
    ovmf: list[str] = field(default_factory=list)
    cycles: int = DEFAULT_CYCLES
    registrations: dict[str, list[str]] = field(default_factory=dict)
    rotation: dict[str, Any] | None = None  # see :func:`rotate`

    def chosen(self) -> list[Entry]:
        want = set(self.selected)
        return [e for e in self.entries if e.id in want]

    def to_json(self) -> dict[str, Any]:
        return {
            "entries": [e.to_json() for e in self.entries], "selected": self.selected,
            "not_applicable": self.not_applicable, "shard": self.shard, "qemu": self.qemu,
            "ovmf": self.ovmf, "cycles": self.cycles, "registrations": self.registrations,
            "rotation": self.rotation,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Matrix:
        return cls(
            entries=[Entry.from_json(e) for e in data.get("entries", [])],
            selected=list(data.get("selected", [])),
            not_applicable=list(data.get("not_applicable", [])),
            shard=data.get("shard"), qemu=list(data.get("qemu", [])),
            ovmf=list(data.get("ovmf", [])), cycles=int(data.get("cycles", DEFAULT_CYCLES)),
            registrations={k: list(v) for k, v in (data.get("registrations") or {}).items()},
            rotation=data.get("rotation"),
        )  # fmt: skip

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Matrix:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"nightly matrix {path}: {exc}") from exc


# --- building the matrix -------------------------------------------------------------------


def safe_id(text: str) -> str:
    """An entry id fragment without spaces or path separators (paths of custom builds)."""
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_") or "x"


@dataclass(frozen=True)
class BuildInfo:
    """What the matrix needs to know about a QEMU build (so tests can fake it)."""

    label: str
    version: tuple[int, ...]
    modes: frozenset[str]


def probe_builds(labels: Sequence[str]) -> list[BuildInfo]:
    """Version and migration modes of each QEMU build (probing it if not cached)."""
    from harness.inventory import builds

    out = []
    for label in labels:
        b = builds.get_build(label)
        caps = b.capabilities
        version = tuple(int(x) for x in re.findall(r"\d+", caps.version)[:3])
        out.append(BuildInfo(b.label, version, frozenset(caps.migration_modes)))
    return out


def aarch64_labels(labels: Sequence[str]) -> list[str]:
    """The labels of ``labels`` that have an aarch64 build (catalogue or registered)."""
    from harness.inventory import builds

    have = {b.label for b in builds.all_builds("aarch64")}
    return [label for label in labels if label in have]


def default_builds() -> tuple[list[str], list[str]]:
    """Every provisioned (catalogue and registered) QEMU and OVMF build, by label."""
    from harness.inventory import builds, firmware

    return [b.label for b in builds.all_builds()], [f.version for f in firmware.all_firmware("x86_64")]


PlanLister = Callable[[str, Sequence[str], Sequence[str]], list[str]]


def cross_version_plans(part: str, qemu: Sequence[str], ovmf: Sequence[str]) -> list[str]:
    """Names of the cross-version plans of ``part`` for these builds (from harness.matrix)."""
    from harness.scenarios import cross_version

    opts = ScenarioOptions(qemu=list(qemu), ovmf=list(ovmf), extra={"parts": [part]})
    plans, _ = cross_version.build_plans(opts)
    return [p.name for p in plans]


def build_matrix(
    kinds: Sequence[Kind] = DEFAULT_KINDS,
    qemu: Sequence[BuildInfo] = (),
    ovmf: Sequence[str] = (),
    *,
    cycles: int = DEFAULT_CYCLES,
    scenarios: Sequence[str] = (),
    registered: Sequence[str] | None = None,
    plans: PlanLister = cross_version_plans,
    full: bool = False,
    arch_builds: Mapping[str, Sequence[str]] | None = None,
    checkout: bool = True,
) -> Matrix:
    """Entries for ``kinds`` over the given builds, ordered by cost (most expensive first,
    so xdist starts the long ones early).  ``scenarios`` restricts to those families;
    ``registered`` (the scenario registry's names) skips nothing but marks absent targets.

    ``full``: every ordered cross-version pair.  Otherwise (the default nightly, sized for
    30 minutes on a 2-core TCG host) the pairs of builds next to each other in version
    order and every build with the newest, both directions; the chains still walk every
    build in order.

    ``arch_builds``: for rows of another guest architecture (``Kind.arch``), the labels of
    the selected builds that exist for it (a row whose architecture has none is skipped).

    ``checkout``: whether a source checkout's ``tests/`` is at hand; without it (the
    harness installed as a package) rows that run those pytest files are skipped, named."""
    if cycles < 1:
        raise ConfigError(f"--cycles {cycles}: expected a positive number")
    if not qemu:
        raise ConfigError("no QEMU builds for the nightly matrix: run `harness provision` or pass --qemu")
    if not ovmf:
        raise ConfigError("no OVMF builds for the nightly matrix: run `harness provision` or pass --ovmf")
    known = sorted({k.scenario for k in kinds})
    unknown = [s for s in scenarios if s not in known]
    if unknown:
        raise ConfigError(f"--scenario {', '.join(unknown)}: unknown; the matrix has {', '.join(known)}")
    newest = max(qemu, key=lambda b: (b.version, b.label))
    fw_default = DEFAULT_OVMF if DEFAULT_OVMF in ovmf else ovmf[0]
    entries: list[Entry] = []
    skipped: list[str] = []
    for kind in kinds:
        if scenarios and kind.scenario not in scenarios:
            continue
        if kind.runner not in RUNNERS or kind.axis not in AXES:
            raise ConfigError(f"matrix row {kind.scenario}: runner {kind.runner!r} / axis {kind.axis!r} unknown")
        if kind.runner == "pytest" and not checkout:
            skipped.append(f"{kind.scenario}: runs the checkout's {', '.join(kind.tests)}; this "
                           "harness is an installed package (run it from a clone)")  # fmt: skip
            continue
        rows = qemu
        if kind.arch != "x86_64":
            have = set((arch_builds or {}).get(kind.arch, ()))
            rows = [b for b in qemu if b.label in have]
            if not rows:
                skipped.append(f"{kind.scenario}: no selected QEMU build has an {kind.arch} build")
                continue
        new = _expand(kind, rows, list(ovmf), newest, fw_default, cycles, plans, skipped, full)
        if registered is not None and kind.runner == "scenario" and kind.target not in registered:
            skipped.append(f"{kind.scenario}: scenario {kind.target!r} is not registered in "
                           "harness.scenarios (its entries are reported as skipped)")  # fmt: skip
        entries += new
    ids = [e.id for e in entries]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"nightly matrix: duplicate entry ids {', '.join(dupes)}")
    entries.sort(key=lambda e: (-e.cost_s, e.id))
    return Matrix(entries, [e.id for e in entries], skipped, None,
                  [b.label for b in qemu], list(ovmf), cycles)  # fmt: skip


def default_pair(src: str, dst: str, qemu: Sequence[BuildInfo]) -> bool:
    """Whether the default (not ``--full``) matrix crosses ``src`` and ``dst``: neighbours in
    version order, or one of them the newest build."""
    order = [b.label for b in sorted(qemu, key=lambda b: (b.version, b.label))]
    if src not in order or dst not in order:
        return True
    i, j = order.index(src), order.index(dst)
    return abs(i - j) == 1 or order[-1] in (src, dst)


def _expand(kind: Kind, qemu: Sequence[BuildInfo], ovmf: list[str], newest: BuildInfo,
            fw_default: str, cycles: int, plans: PlanLister, skipped: list[str],
            full: bool = False) -> list[Entry]:
    n = cycles if kind.cycles else 1
    cost = kind.cost_s + (max(0, n - 1) * 3.0 if kind.cycles else 0.0)

    def mk(eid: str, **kw: Any) -> Entry:
        return Entry(id=eid, scenario=kind.scenario, runner=kind.runner, target=kind.target,
                     cycles=n, cost_s=cost, arch=kind.arch, settings=kind.settings, **kw)  # fmt: skip

    def able(b: BuildInfo) -> bool:
        return kind.mode is None or kind.mode in b.modes

    out: list[Entry] = []
    if kind.axis == "tests":
        out.append(mk(kind.scenario, tests=kind.tests))
        return out
    if kind.axis in ("qemu*ovmf", "qemu+ovmf", "qemu", "newest"):
        if kind.axis == "qemu*ovmf":
            combos = [(b, f) for b in qemu for f in ovmf]
        elif kind.axis == "qemu":
            combos = [(b, fw_default) for b in qemu]
        elif kind.axis == "qemu+ovmf":
            combos = [(b, fw_default) for b in qemu] + [(newest, f) for f in ovmf if f != fw_default]
        else:
            combos = [(newest, fw_default)]
        usable = [(b, f) for b, f in combos if able(b)]
        if not usable:
            skipped.append(f"{kind.scenario}: no selected QEMU build offers migration mode {kind.mode}")
        for b, f in usable:
            for mode in kind.modes or (None,):
                tag = f"-{mode}" if mode else ""
                out.append(mk(f"{kind.scenario}{tag}-qemu{safe_id(b.label)}-ovmf{safe_id(f)}",
                              qemu=(b.label,), ovmf=(f,), mode=mode))
        return out
    labels = [b.label for b in qemu]
    if kind.axis == "pairs":
        dropped = 0
        for name in plans("pairs", labels, [fw_default]):
            src, _, dst = name.removeprefix("pair ").partition(" -> ")
            if not full and not default_pair(src, dst, qemu):
                dropped += 1
                continue
            out.append(mk(f"{kind.scenario}-qemu{safe_id(src)}-to-qemu{safe_id(dst)}",
                          qemu=(src, dst), ovmf=(fw_default,), part="pairs", plan=name))
        if dropped:
            skipped.append(f"{kind.scenario}: {dropped} ordered pairs of builds that are neither "
                           "neighbours in version order nor with the newest run with --full")  # fmt: skip
    elif kind.axis == "chains" and len(labels) >= 2:
        out.append(mk(f"{kind.scenario}-chains", qemu=tuple(labels), ovmf=(fw_default,), part="chains"))
    elif kind.axis == "firmware-pairs" and len(ovmf) >= 2:
        for name in plans("firmware", [newest.label], ovmf):
            fa, _, fb = name.removeprefix("firmware ").partition(" -> ")
            out.append(mk(f"{kind.scenario}-ovmf{safe_id(fa)}-to-ovmf{safe_id(fb)}",
                          qemu=(newest.label,), ovmf=(fa, fb), part="firmware", plan=name))
    if not out:
        skipped.append(f"{kind.scenario} ({kind.axis}): nothing to cross with these builds")
    return out


def inject_entry(qemu: str) -> Entry:
    """A deliberately failing entry (``--inject-failure``), for the harness's own tests."""
    return Entry(id=INJECTED, scenario=INJECTED, runner="inject", qemu=(qemu,), cost_s=0.0)


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` (1-based) -> (K, N); anything else is a :class:`ConfigError`."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"--shard {text!r}: expected K/N such as 1/4")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise ConfigError(f"--shard {text}: K must be between 1 and N (N >= 1)")
    return k, n


def shard(entries: Sequence[Entry], k: int, n: int) -> list[Entry]:
    """Shard ``k`` of ``n``: entries by cost (descending, then id) dealt to the least loaded
    shard (ties: the lowest number).  Deterministic for the same matrix; the shards are
    disjoint and together cover every entry."""
    loads = [0.0] * n
    mine: list[Entry] = []
    for e in sorted(entries, key=lambda e: (-e.cost_s, e.id)):
        target = min(range(n), key=lambda i: (loads[i], i))
        loads[target] += max(e.cost_s, 1.0)
        if target == k - 1:
            mine.append(e)
    return mine


def parse_night(text: str | None) -> datetime.date:
    """``YYYY-MM-DD`` (default: today, UTC) -> the night a rotation is computed for."""
    if text is None:
        return datetime.datetime.now(datetime.UTC).date()
    try:
        return datetime.date.fromisoformat(text.strip())
    except ValueError as exc:
        raise ConfigError(f"--night {text!r}: expected a date such as 2026-11-30") from exc


def core_ids(entries: Sequence[Entry], newest: str, fw_default: str) -> list[str]:
    """The entries a rotation runs every night: those on the newest QEMU alone with the
    default firmware (or none), one per scenario family that has one."""
    return [e.id for e in entries if e.qemu == (newest,) and e.ovmf in ((), (fw_default,))
            and e.runner in ("scenario", "boot")]  # fmt: skip


def rotate(m: Matrix, n: int, night: datetime.date, core: Sequence[str]) -> None:
    """Select night ``night``'s share of ``m`` in a rotation over ``n`` nights: the
    ``core`` entries, and of the rest the cost-balanced share :func:`shard` deals to
    slot ``night.toordinal() % n + 1`` (so consecutive nights take consecutive slots and
    every entry runs once every ``n`` nights).  ``n`` = 1 selects everything."""
    if n < 1:
        raise ConfigError(f"--rotation {n}: expected a positive number of nights")
    if n == 1:
        return
    want = set(m.selected)
    pool = [e for e in m.entries if e.id in want]
    keep = [e for e in pool if e.id in set(core)]
    rest = [e for e in pool if e.id not in set(core)]
    k = night.toordinal() % n + 1
    mine = {e.id for e in shard(rest, k, n)}
    m.selected = [i for i in m.selected if i in set(core) or i in mine]
    later = {}
    for step in range(1, n):
        other = (night.toordinal() + step) % n + 1
        later[str(night + datetime.timedelta(days=step))] = len(shard(rest, other, n))
    m.rotation = {"night": str(night), "slot": f"{k}/{n}", "core": [e.id for e in keep],
                  "share": len(mine), "rest": len(rest), "next_nights": later}  # fmt: skip


# --- running one entry (inside a pytest worker) ----------------------------------------------


@dataclass
class EntryOutcome:
    """What one entry's run found."""

    entry: Entry
    report: ScenarioReport
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is not None or self.report.ok

    @property
    def expected_failures(self) -> int:
        return sum(1 for r in self.report.records if r.get("expected_failure"))

    def failure_text(self) -> str:
        from harness.nightly.results import step_error

        lines = [f"{self.entry.id}: {self.report.scenario} failed"]
        for r in self.report.records:
            if not r.get("ok") and not r.get("expected_failure"):
                where = " ".join(str(r.get(k)) for k in ("op", "source", "destination") if r.get(k))
                cyc = f" cycle {r['cycle']}" if r.get("cycle") is not None else ""
                sig = f" [{r['signature']}]" if r.get("signature") else ""
                lines.append(f"  {where}{cyc}{sig}: {step_error(r).strip().splitlines()[-1][:300]}")
        if not self.report.records:
            lines.append("  the scenario produced no records")
        if self.report.artifacts:
            lines.append(f"  artifacts: {self.report.artifacts}")
        return "\n".join(lines)


def run_entry(entry: Entry, *, artifacts: Path | None = None, workdir: Path | None = None,
              on_record: Callable[[dict[str, Any]], None] | None = None) -> EntryOutcome:
    """Run one matrix entry through the library (no pytest needed)."""
    if entry.runner == "scenario":
        return _run_scenario(entry, artifacts, workdir, on_record)
    if entry.runner == "boot":
        return _run_boot(entry, artifacts, workdir)
    if entry.runner == "inject":
        report = ScenarioReport(entry.scenario)
        report.add({"op": "injected", "ok": False, "status": "failed", "source": entry.qemu[0],
                    "destination": entry.qemu[0], "signature": "injected-failure",
                    "error": "deliberate failure injected by --inject-failure"})  # fmt: skip
        return EntryOutcome(entry, report)
    raise ConfigError(f"matrix entry {entry.id}: runner {entry.runner!r} does not run in a scenario test")


def _run_scenario(entry: Entry, artifacts: Path | None, workdir: Path | None,
                  on_record: Callable[[dict[str, Any]], None] | None) -> EntryOutcome:
    from harness import scenarios

    opts = ScenarioOptions(qemu=list(entry.qemu), ovmf=list(entry.ovmf), cycles=entry.cycles,
                           mode=entry.mode, workdir=workdir, artifacts=artifacts, on_record=on_record)  # fmt: skip
    if entry.arch != "x86_64":
        opts.extra["arch"] = entry.arch
    opts.extra.update({k: setting_value(v) for k, v in entry.settings})
    target = entry.target or entry.scenario
    if target not in scenarios.names():
        return EntryOutcome(entry, ScenarioReport(entry.scenario),
                            skipped=f"scenario {target!r} is not registered in harness.scenarios")  # fmt: skip
    if target == "cross-version" and entry.part:
        from harness.scenarios import cross_version

        opts.extra["parts"] = [entry.part]
        plans, _ = cross_version.build_plans(opts)
        if entry.plan is not None:
            plans = [p for p in plans if p.name == entry.plan]
            if not plans:
                raise ConfigError(f"matrix entry {entry.id}: cross-version plan {entry.plan!r} not found")
        report = cross_version.run_cross_version(opts, plans)
    else:
        report = scenarios.get(target)(opts)
    report.scenario = entry.scenario
    return EntryOutcome(entry, report)


def _run_boot(entry: Entry, artifacts: Path | None, workdir: Path | None) -> EntryOutcome:
    """Boot a UEFI guest (split pflash, private varstore) on one QEMU x OVMF pair to SSH."""
    from harness import migration
    from harness.factory import MachineFactory
    from harness.spec import VmSpec

    report = ScenarioReport(entry.scenario)
    qemu, fw = entry.qemu[0], entry.ovmf[0]
    step: dict[str, Any] = {"op": "boot", "source": qemu, "firmware": fw}
    t0 = time.monotonic()
    factory = MachineFactory(VmSpec(qemu=qemu, firmware=fw, name="boot"), base=workdir)
    failed = True
    try:
        vm = factory()
        step["machine"] = migration.machine_type(vm)
        step["boot_s"] = round(vm.ready.seconds, 2) if vm.ready else None
        step["boot_id"] = vm.ready.boot_id if vm.ready else None
        out = vm.ssh.run("cat /sys/firmware/efi/fw_platform_size", timeout=30, check=False)
        if out.rc != 0 or out.stdout.strip() not in ("64", "32"):
            step.update(ok=False, status="failed",
                        error=f"the guest does not see UEFI (/sys/firmware/efi: rc {out.rc}, {out.stderr.strip()[:200]})")  # fmt: skip
        else:
            step.update(ok=True, status="completed")
            failed = False
    except HarnessError as exc:
        sig = signatures.classify(str(exc))
        step.update(ok=False, status="error", error=str(exc), signature=sig.name if sig else None)
    finally:
        kept = factory.close(failed=failed, artifacts=artifacts)
        report.artifacts = str(kept) if kept else None
    report.add(judge_boot(step, _boot_incompatibility(qemu, fw)))
    report.duration_s = time.monotonic() - t0
    return EntryOutcome(entry, report)


def _boot_incompatibility(qemu: str, firmware: str) -> BootIncompatibility | None:
    from harness.inventory import builds
    from harness.inventory.catalog import Version

    try:
        fw_version = Version.parse(firmware)
        try:
            version = builds.get_build(qemu).version
        except HarnessError:
            version = Version.parse(qemu)
    except (ValueError, HarnessError):  # a label that is no version matches no entry
        return None
    return matrix.load_incompatibilities().lookup_boot(version, fw_version)


REGISTRATION_OPTIONS = ("qemu_deb", "ovmf_deb", "qemu_dir")


def register_from_options(args: argparse.Namespace) -> Any:
    """The hook for distro validation: ``harness.inventory.registry.register_from_options(args)``
    registers ``--qemu-deb``/``--ovmf-deb``/``--qemu-dir`` builds before the matrix is made
    (it exports ``$HARNESS_REGISTRY``, which pytest and its workers inherit).  Returns its
    registration, or None when no such option was given."""
    if not any(getattr(args, k, None) for k in REGISTRATION_OPTIONS):
        return None
    try:
        from harness.inventory import registry
    except ImportError as exc:
        raise ConfigError("--qemu-deb/--ovmf-deb/--qemu-dir need harness.inventory.registry (distro "
                          "validation), which this checkout does not have") from exc  # fmt: skip
    return registry.register_from_options(args)


# --- running the matrix --------------------------------------------------------------------


@dataclass
class NightlyOptions:
    """What ``harness nightly`` was asked for."""

    results_root: Path = Path("results")
    results_dir: Path | None = None
    qemu: list[str] = field(default_factory=list)
    ovmf: list[str] = field(default_factory=list)
    scenarios: list[str] = field(default_factory=list)
    shard: str | None = None
    jobs: int = DEFAULT_JOBS
    cycles: int = DEFAULT_CYCLES
    inject_failure: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    registrations: dict[str, list[str]] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    pytest_args: list[str] = field(default_factory=list)
    full: bool = False
    rotation: int | None = None  # None: DEFAULT_ROTATION for the default matrix, else 1
    night: str | None = None  # YYYY-MM-DD the rotation is computed for (default today)
    settings: list[tuple[str, str]] = field(default_factory=list)  # --set, for every scenario row

    def rotation_nights(self) -> int:
        """The rotation asked for; unset, the default matrix (no --scenario, --qemu,
        --ovmf, --full) rotates over :data:`DEFAULT_ROTATION` nights, a run narrowed by
        hand runs all it names, and shards (several machines) share the whole matrix."""
        if self.rotation is not None:
            return self.rotation
        narrowed = self.scenarios or self.qemu or self.ovmf or self.full or self.inject_failure
        return 1 if narrowed or self.shard else DEFAULT_ROTATION


def apply_settings(m: Matrix, settings: Sequence[tuple[str, str]]) -> None:
    """``--set`` settings for every scenario row, after the row's own (the command line's
    win).  The boot rows and the pytest rows take none: a boot row checks a cold boot."""
    if settings:
        m.entries = [replace(e, settings=(*e.settings, *settings)) if e.runner == "scenario" else e
                     for e in m.entries]  # fmt: skip


def timestamp(t: float | None = None) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(t))


def new_results_dir(root: Path) -> Path:
    """A fresh ``root/<timestamp>`` (suffixed when two runs start in the same second)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = timestamp()
    for i in range(100):
        path = root / (stamp if i == 0 else f"{stamp}.{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"cannot create a new results directory under {root}")


def plan(opts: NightlyOptions) -> Matrix:
    """The (sharded) matrix ``opts`` asks for, from the provisioned or given builds."""
    from harness import scenarios

    qlabels, flabels = default_builds() if not (opts.qemu and opts.ovmf) else ([], [])
    qemu = probe_builds(opts.qemu or qlabels)
    ovmf = list(dict.fromkeys(opts.ovmf or flabels))
    m = build_matrix(DEFAULT_KINDS, qemu, ovmf, cycles=opts.cycles, scenarios=opts.scenarios,
                     registered=list(scenarios.names()), full=opts.full,
                     arch_builds={"aarch64": aarch64_labels([b.label for b in qemu])},
                     checkout=checkout() is not None)  # fmt: skip
    apply_settings(m, opts.settings)
    newest = max(qemu, key=lambda b: (b.version, b.label))
    nights = opts.rotation_nights()
    if nights != 1 or opts.night is not None:
        fw_default = DEFAULT_OVMF if DEFAULT_OVMF in ovmf else ovmf[0]
        rotate(m, nights, parse_night(opts.night), core_ids(m.entries, newest.label, fw_default))
    if opts.inject_failure:
        m.entries.append(inject_entry(newest.label))
        m.selected.append(INJECTED)
    if opts.shard:  # of what the rotation selected
        k, n = parse_shard(opts.shard)
        m.selected = [e.id for e in shard(m.chosen(), k, n)]
        m.shard = f"{k}/{n}"
    m.registrations = {k: [str(Path(p).resolve()) for p in v] for k, v in opts.registrations.items() if v}
    return m


def prepare(opts: NightlyOptions) -> tuple[Matrix, Path]:
    """Build (and shard) the matrix and write it into a new results directory."""
    m = plan(opts)
    out = (opts.results_dir or new_results_dir(opts.results_root)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / RECORDS_DIR).mkdir(exist_ok=True)
    m.save(out / MATRIX_FILE)
    return m, out


def pytest_command(matrix: Matrix, results_dir: Path, opts: NightlyOptions) -> list[str]:
    """The pytest command line that runs the selected entries of ``matrix``."""
    chosen = matrix.chosen()
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-n", str(opts.jobs),
           "--dist", "worksteal" if opts.jobs > 0 else "no", "-o", "junit_family=xunit2",
           "--junitxml", str(results_dir / "junit.xml"),
           "--harness-artifacts", str(results_dir / ARTIFACTS_DIR), "-rfEsx"]  # fmt: skip
    if opts.jobs == 0:
        cmd[cmd.index("-n"):cmd.index("-n") + 4] = []
    for v in opts.qemu if any(e.runner == "pytest" for e in chosen) else []:
        cmd += ["--qemu", v]
    for v in opts.ovmf if any(e.runner == "pytest" for e in chosen) else []:
        cmd += ["--ovmf", v]
    if checkout() is None:  # an installed package: its own ini, node ids as in a checkout
        cmd += ["-c", str(NIGHTLY_SUITE_DIR / "nightly-pytest.ini"), "--rootdir", str(PACKAGE_DIR.parent)]
    cmd += opts.pytest_args
    # always: its conftest registers distro builds in every worker
    cmd.append(str(NIGHTLY_SUITE_DIR / "test_matrix.py") if checkout() is None else TEST_FILE)
    for e in chosen:
        if e.runner == "pytest":
            cmd += list(e.tests)
    return cmd


@contextlib.contextmanager
def owned_process(cmd: Sequence[str], env: Mapping[str, str], cwd: Path | None,
                  stdout: int | IO[str] = subprocess.PIPE) -> Iterator[subprocess.Popen[str]]:
    """A child (pytest, a harness command) in its own session; on the way out, however we
    leave (an exception, Ctrl-C, a signal turned into one), its whole process group is
    interrupted, then killed, so nothing it started outlives us.  SIGKILL leaves no way
    out: the child has a parent-death signal (and the harness's pytest workers follow
    their controller, their guests follow them)."""
    from harness.guest.qemu_process import die_with_parent

    argv, child_env = die_with_parent(cmd, dict(env))
    proc = subprocess.Popen(argv, cwd=cwd, env=child_env, stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            for sig, grace in ((signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc.stdout is not None:
            proc.stdout.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def _pump(stream: IO[str], echo: Callable[[str], None], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            echo(line.rstrip("\n"))


class RecordTail:
    """New records of ``records/*.jsonl`` as workers append them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}

    def poll(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for path in sorted(self.directory.glob("*.jsonl")):
            start = self._offsets.get(path, 0)
            try:
                with path.open("rb") as fh:
                    fh.seek(start)
                    data = fh.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # only whole lines
            self._offsets[path] = start + end
            for line in data[:end].splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out


@dataclass
class NightlyRun:
    """A finished run: where it wrote, pytest's status, and the joined results."""

    results_dir: Path
    pytest_rc: int
    results: dict[str, Any]
    timed_out: bool = False

    @property
    def unexpected_failures(self) -> int:
        s = self.results.get("summary", {})
        return int(s.get("failed", 0)) + int(s.get("error", 0))

    @property
    def exit_status(self) -> int:
        if self.timed_out or self.unexpected_failures:
            return 1
        # 0 all passed, 5 nothing collected (an empty shard); anything else is trouble
        return 0 if self.pytest_rc in (0, 5) else 1


def run(opts: NightlyOptions, echo: Callable[[str], None]) -> NightlyRun:
    """Run the matrix: pytest with xdist, live progress through ``echo``, then the reports."""
    from harness.nightly import report

    if opts.jobs < 0:
        raise ConfigError(f"--jobs {opts.jobs}: expected 0 (no xdist) or more")
    started = time.time()
    matrix, out = prepare(opts)
    chosen = matrix.chosen()
    echo(f"nightly: {len(chosen)} of {len(matrix.entries)} matrix entries"
         + (f" (shard {matrix.shard})" if matrix.shard else "")
         + f", {opts.jobs} jobs, results in {out}")  # fmt: skip
    if matrix.rotation:
        echo(f"  {report.rotation_text(matrix.rotation)}")
    for note in matrix.not_applicable:
        echo(f"  not run: {note}")
    cmd = pytest_command(matrix, out, opts)
    env = {**os.environ, MATRIX_ENV: str((out / MATRIX_FILE).resolve())}
    lock = threading.Lock()
    tail = RecordTail(out / RECORDS_DIR)
    timed_out = False
    with owned_process(cmd, env, checkout() or out) as proc:
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, echo, lock), daemon=True)
        pump.start()
        deadline = time.monotonic() + opts.timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                timed_out = True
                with lock:
                    echo(f"nightly: timed out after {opts.timeout_s:.0f} s; stopping pytest")
                break
            time.sleep(1.0)
            for rec in tail.poll():
                with lock:
                    echo(report.progress_line(rec))
    pump.join(timeout=10)
    for rec in tail.poll():
        echo(report.progress_line(rec))
    rc = proc.returncode if proc.returncode is not None else -1
    results = report.build_results(out, run_info={
        "started": started, "finished": time.time(), "argv": opts.argv, "jobs": opts.jobs,
        "pytest_rc": rc, "timed_out": timed_out, "pytest_command": cmd,
    })  # fmt: skip
    report.write_all(out, results)
    return NightlyRun(out, rc, results, timed_out)
