"""Boot order: what the guest sets, what the firmware booted, and what QEMU's fw_cfg does.

From inside the guest (through the agent, over SSH): read ``BootOrder``, ``BootNext``,
``BootCurrent`` and the ``Boot####`` load options (:func:`guest_boot`); set the order
and the next boot (:func:`set_boot_order`, :func:`set_boot_next`); add a load option
(:func:`add_boot_entry`, e.g. a second entry for the boot disk under another title, so
that *which* entry booted is visible).  Which entry actually booted is known twice: the
volatile ``BootCurrent`` the guest reads, and OVMF's ``BdsDxe: starting Boot#### "..."``
line on the serial console (:func:`started_entries`, :func:`assert_booted`).

QEMU passes its own boot order to the firmware through the fw_cfg file ``bootorder``
(``bootindex=`` device properties; ``-boot order=`` only feeds the legacy CMOS/SeaBIOS
path).  What each OVMF version then does to the varstore's ``BootOrder`` is recorded as
data in ``firmware/bootorder-fwcfg.toml`` (:func:`load_fwcfg_records`) by
:func:`observe_fwcfg`, and a test compares a fresh observation with the record
(:func:`fwcfg_problems`) so a change in behaviour is noticed.

Load options that OVMF creates for devices it enumerates carry an auto-created marker
GUID in their optional data; OVMF deletes such options when it no longer enumerates
them exactly, so an entry a guest adds must not copy that optional data
(:func:`add_boot_entry` leaves it out).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import CatalogError, StateError, VarstoreError
from harness.paths import FIRMWARE_DIR
from harness.varstore import (
    EFI_GLOBAL_VARIABLE,
    BootEntry,
    LoadOption,
    VarstoreModel,
    boot_name,
    boot_order_diff,
    decode_load_option,
    split_load_option,
)

if TYPE_CHECKING:
    from harness.factory import MachineFactory
    from harness.machine import Machine

#: OVMF's line when it hands control to a boot option (escape sequences may precede it).
BDS_START_RE = re.compile(r'BdsDxe: starting Boot([0-9A-Fa-f]{4}) "([^"\n]*)"')
#: The entry number :func:`add_boot_entry` uses unless told otherwise.
USER_ENTRY = 0x0100
USER_TITLE = "harness-user"
FWCFG_RECORD = FIRMWARE_DIR / "bootorder-fwcfg.toml"
_ATTR_BOOT = 0x07  # NV | BS | RT, as the UEFI spec requires for Boot####/BootOrder


def parse_number(text: str | int) -> int:
    """``"0003"``, ``"Boot0003"`` or ``3`` -> 3."""
    if isinstance(text, int):
        number = text
    else:
        s = text.strip()
        s = s[4:] if s.lower().startswith("boot") else s
        try:
            number = int(s, 16)
        except ValueError as exc:
            raise StateError(f"not a boot number: {text!r}") from exc
    if not 0 <= number <= 0xFFFF:
        raise StateError(f"boot number {text!r} out of range")
    return number


def hex4(number: int) -> str:
    """3 -> ``"0003"`` (the agent's spelling)."""
    return f"{number:04X}"


# --- the guest's view --------------------------------------------------------------------


@dataclass(frozen=True)
class GuestBootView:
    """Boot variables as the guest reads them from efivarfs."""

    current: int | None
    next: int | None
    order: tuple[int, ...]
    raw_entries: Mapping[int, bytes] = field(default_factory=dict)

    @property
    def entries(self) -> dict[int, BootEntry]:
        """The load options decoded (undecodable ones left out)."""
        out = {}
        for n, data in self.raw_entries.items():
            try:
                out[n] = decode_load_option(data, n, where=f"guest {boot_name(n)}")
            except VarstoreError:
                continue
        return out

    def title(self, number: int | None) -> str:
        if number is None:
            return "(none)"
        data = self.raw_entries.get(number)
        if data is None:
            return f"{boot_name(number)} (no such entry)"
        try:
            return f'{boot_name(number)} "{split_load_option(data).title}"'
        except VarstoreError:
            return f"{boot_name(number)} (undecodable)"

    @classmethod
    def from_agent(cls, answer: Mapping[str, Any]) -> GuestBootView:
        """Parse ``agent boot``'s JSON answer."""
        try:
            cur, nxt = answer.get("BootCurrent"), answer.get("BootNext")
            return cls(
                current=None if cur is None else parse_number(str(cur)),
                next=None if nxt is None else parse_number(str(nxt)),
                order=tuple(parse_number(str(n)) for n in answer["BootOrder"]),
                raw_entries={parse_number(str(k)): bytes.fromhex(str(v))
                             for k, v in dict(answer.get("entries") or {}).items()},
            )  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError, StateError) as exc:
            raise StateError(f"guest agent boot answer malformed: {answer!r}") from exc


def guest_boot(vm: Machine) -> GuestBootView:
    """BootCurrent, BootNext, BootOrder and Boot#### as the guest sees them now."""
    return GuestBootView.from_agent(vm.agent("boot"))


def set_boot_order(vm: Machine, order: Sequence[int]) -> None:
    """Write ``BootOrder`` from inside the guest."""
    if not order:
        raise StateError("refusing to set an empty BootOrder")
    vm.agent("bootorder", "set", ",".join(hex4(n) for n in order))


def set_boot_next(vm: Machine, number: int | None) -> None:
    """Write ``BootNext`` from inside the guest (None removes it)."""
    if number is None:
        vm.agent("bootnext", "rm")
    else:
        vm.agent("bootnext", "set", hex4(number))


def add_boot_entry(vm: Machine, number: int = USER_ENTRY, title: str = USER_TITLE, *,
                   like: int | None = None, view: GuestBootView | None = None) -> LoadOption:
    """Create ``Boot####`` from inside the guest: the device path of entry ``like``
    (default: the one that booted) under a new title, active, without optional data
    (so OVMF does not take it for one of its auto-created options)."""
    view = view or guest_boot(vm)
    source = view.current if like is None else like
    if source is None or source not in view.raw_entries:
        raise StateError(f"cannot copy boot entry {view.title(source)}: the guest has "
                         f"{', '.join(boot_name(n) for n in sorted(view.raw_entries)) or 'none'}")
    base = split_load_option(view.raw_entries[source], where=f"guest {boot_name(source)}")
    option = LoadOption(attributes=0x01, title=title, device_path=base.device_path)
    vm.agent("efivar", "set", f"{boot_name(number)}-{EFI_GLOBAL_VARIABLE}",
             option.encode().hex(), str(_ATTR_BOOT))  # fmt: skip
    return option


# --- which entry booted --------------------------------------------------------------------


def console_since(vm: Machine, since: int = 0) -> str:
    """The guest's serial log from byte offset ``since`` (a ``console.mark()``), cleaned."""
    from harness.guest.console import clean

    try:
        with vm.console.log_path.open("rb") as fh:
            fh.seek(since)
            data = fh.read()
    except FileNotFoundError:
        return ""
    return clean(data.decode("utf-8", "replace"))


def started_entries(console_text: str) -> list[tuple[int, str]]:
    """Every ``BdsDxe: starting Boot####`` in a console log: (number, title), in order."""
    return [(int(m.group(1), 16), m.group(2)) for m in BDS_START_RE.finditer(console_text)]


def booted_problems(expected: int, view: GuestBootView,
                    started: Sequence[tuple[int, str]]) -> list[str]:
    """Differences between the entry that should have booted and what BootCurrent and the
    firmware's serial line say (empty when both name ``expected``)."""
    out = []
    if view.current != expected:
        out.append(f"BootCurrent is {view.title(view.current)}, expected {view.title(expected)}")
    if not started:
        out.append(f"the firmware printed no 'BdsDxe: starting Boot####' line for this boot "
                   f"(expected {boot_name(expected)})")
    elif started[-1][0] != expected:
        n, title = started[-1]
        out.append(f'the firmware started {boot_name(n)} "{title}", expected {view.title(expected)}'
                   + (f" (all started this boot: {', '.join(boot_name(s) for s, _ in started)})"
                      if len(started) > 1 else ""))  # fmt: skip
    return out


def assert_booted(vm: Machine, expected: int, since: int = 0,
                  view: GuestBootView | None = None) -> GuestBootView:
    """Fail unless entry ``expected`` booted: ``BootCurrent`` in the guest and the
    firmware's serial line after console offset ``since`` (use the mark before reboot)."""
    view = view or guest_boot(vm)
    started = started_entries(console_since(vm, since))
    problems = booted_problems(expected, view, started)
    if problems:
        raise StateError("wrong boot entry booted:\n  - " + "\n  - ".join(problems))
    return view


def boot_order_problems(expected: Sequence[int], actual: Sequence[int], where: str, *,
                        may_grow: bool = False) -> list[str]:
    """What happened to a BootOrder, in words (empty when it is as expected).  With
    ``may_grow``, entries appended after the expected ones are accepted (firmware that
    enumerates a device its predecessor did not adds an option at the end)."""
    if may_grow and list(actual[:len(expected)]) == list(expected):
        return []
    words = boot_order_diff(list(expected), list(actual))
    return [f"BootOrder in {where}: " + "; ".join(words)] if words else []


def boot_next_problems(view: GuestBootView, model: VarstoreModel | None = None) -> list[str]:
    """BootNext must be gone after the boot that used it (guest view and host file)."""
    out = []
    if view.next is not None:
        out.append(f"BootNext is still set in the guest ({view.title(view.next)}): the firmware "
                   "did not consume it")
    if model is not None and model.boot_next is not None:
        out.append(f"BootNext is still set in {model.path} ({boot_name(model.boot_next)})")
    return out


# --- fw_cfg bootorder vs the varstore: observation and record ----------------------------

#: The configurations observed per OVMF version, in the order they run on one varstore.
FWCFG_CONFIGS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("fresh", {}, "fresh copy of the template, no -boot and no bootindex; the guest then "
     f"adds {boot_name(USER_ENTRY)} (the boot disk again, titled {USER_TITLE!r}) and puts "
     "it first in BootOrder, and powers off"),
    ("boot-order-n", {"boot_order": "n"}, "same varstore, QEMU -boot order=n (network first "
     "for the legacy path)"),
    ("bootindex-disk", {"disk_bootindex": 1}, "same varstore, bootindex=1 on the boot disk "
     "(fw_cfg bootorder names it)"),
)


@dataclass(frozen=True)
class FwcfgObservation:
    """What one boot under one fw_cfg configuration showed."""

    ovmf: str
    qemu: str
    config: str
    boot_current: str | None
    started: str | None
    boot_order: tuple[str, ...]
    entries: Mapping[str, str]
    description: str = ""

    def to_toml(self) -> str:
        def q(s: str) -> str:
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = ["[[case]]", f"ovmf = {q(self.ovmf)}", f"qemu = {q(self.qemu)}",
                 f"config = {q(self.config)}", f"description = {q(self.description)}",
                 f"boot_current = {q(self.boot_current or '')}",
                 f"started = {q(self.started or '')}",
                 "boot_order = [" + ", ".join(q(n) for n in self.boot_order) + "]",
                 "entries = { " + ", ".join(f"{k} = {q(v)}" for k, v in sorted(self.entries.items()))
                 + " }"]  # fmt: skip
        return "\n".join(lines) + "\n"


def _observe(vm: Machine, ovmf: str, config: str, description: str, since: int) -> FwcfgObservation:
    view = guest_boot(vm)
    started = started_entries(console_since(vm, since))
    return FwcfgObservation(
        ovmf=ovmf, qemu=vm.build.label, config=config, description=description,
        boot_current=None if view.current is None else boot_name(view.current),
        started=boot_name(started[-1][0]) if started else None,
        boot_order=tuple(boot_name(n) for n in view.order),
        entries={boot_name(n): e.title for n, e in sorted(view.entries.items())},
    )  # fmt: skip


def observe_fwcfg(factory: MachineFactory, ovmf: str, **spec: Any) -> list[FwcfgObservation]:
    """Boot OVMF ``ovmf`` under each of :data:`FWCFG_CONFIGS` on one varstore and record
    what the firmware booted and what BootOrder it left (three boots)."""
    from harness import state

    out: list[FwcfgObservation] = []
    varstore: Path | None = None
    for i, (config, fields, description) in enumerate(FWCFG_CONFIGS):
        vm = factory(firmware=ovmf, varstore=varstore, name=f"fwcfg-{config}", **spec, **fields)
        varstore = vm.varstore_path
        out.append(_observe(vm, ovmf, config, description, since=0))
        if i == 0:
            view = guest_boot(vm)
            add_boot_entry(vm, view=view)
            set_boot_order(vm, [USER_ENTRY] + [n for n in view.order if n != USER_ENTRY])
        state.poweroff(vm)
    return out


def load_fwcfg_records(path: Path = FWCFG_RECORD) -> list[FwcfgObservation]:
    """The recorded observations (``firmware/bootorder-fwcfg.toml``)."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(path, f"cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(path, f"not valid TOML: {exc}") from exc
    cases = data.get("case", [])
    if not isinstance(cases, list):
        raise CatalogError(path, "'case' must be an array of tables")
    out = []
    for i, c in enumerate(cases):
        try:
            out.append(FwcfgObservation(
                ovmf=str(c["ovmf"]), qemu=str(c["qemu"]), config=str(c["config"]),
                description=str(c.get("description", "")),
                boot_current=str(c["boot_current"]) or None, started=str(c["started"]) or None,
                boot_order=tuple(str(n) for n in c["boot_order"]),
                entries={str(k): str(v) for k, v in dict(c["entries"]).items()},
            ))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogError(path, f"case[{i}] malformed: {exc!r}") from exc
    return out


def write_fwcfg_records(observations: Iterable[FwcfgObservation], path: Path = FWCFG_RECORD,
                        header: str = "") -> Path:
    """Replace the records for the observed (ovmf, qemu) pairs, keep the others."""
    observations = list(observations)
    fresh = {(o.ovmf, o.qemu) for o in observations}
    kept = [r for r in (load_fwcfg_records(path) if path.exists() else [])
            if (r.ovmf, r.qemu) not in fresh]  # fmt: skip
    rows = sorted(kept + observations, key=lambda r: (r.ovmf, r.qemu,
                  [c for c, _, _ in FWCFG_CONFIGS].index(r.config)
                  if r.config in [c for c, _, _ in FWCFG_CONFIGS] else 99))  # fmt: skip
    text = header + "\n".join(r.to_toml() for r in rows)
    path.write_text(text, encoding="utf-8")
    return path


def fwcfg_problems(recorded: Sequence[FwcfgObservation],
                   observed: Sequence[FwcfgObservation]) -> list[str]:
    """Where an observation differs from the record (empty when behaviour is stable)."""
    out: list[str] = []
    index = {(r.ovmf, r.qemu, r.config): r for r in recorded}
    for o in observed:
        r = index.get((o.ovmf, o.qemu, o.config))
        where = f"OVMF {o.ovmf} on QEMU {o.qemu}, {o.config}"
        if r is None:
            out.append(f"{where}: nothing recorded (record it: see {FWCFG_RECORD.name})")
            continue
        if r.boot_current != o.boot_current:
            out.append(f"{where}: BootCurrent {o.boot_current}, recorded {r.boot_current}")
        if r.started != o.started:
            out.append(f"{where}: the firmware started {o.started}, recorded {r.started}")
        if r.boot_order != o.boot_order:
            words = boot_order_diff([parse_number(n) for n in r.boot_order],
                                    [parse_number(n) for n in o.boot_order])  # fmt: skip
            out.append(f"{where}: BootOrder differs from the record: " + "; ".join(words))
        if dict(r.entries) != dict(o.entries):
            gone = sorted(set(r.entries) - set(o.entries))
            new = sorted(set(o.entries) - set(r.entries))
            retitled = sorted(k for k in set(r.entries) & set(o.entries) if r.entries[k] != o.entries[k])
            out.append(f"{where}: boot entries differ: missing {gone or 'none'}, "
                       f"new {new or 'none'}, retitled {retitled or 'none'}")
    return out
