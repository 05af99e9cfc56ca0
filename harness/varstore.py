"""Varstores: reading, diffing and instantiating OVMF's NVRAM files.

virt-firmware is the parser (``virt.firmware.varstore.edk2`` for the file format,
``virt.firmware.efi.bootentry`` and ``devpath`` for load options); this module never
parses the varstore format itself.  virt-firmware logs and calls ``sys.exit()`` on
malformed input, or lets ``struct.error``/``UnicodeDecodeError`` escape: every call goes
through :func:`_virt_firmware`, so the only error that comes out of here is
:class:`~harness.errors.VarstoreError`, naming the file (and what virt-firmware logged).

The model (:class:`VarstoreModel`) holds every variable keyed by (name, GUID), the
``Boot####`` load options decoded (title, device path, optional data, active flag),
``BootOrder`` as a list and ``BootNext``.  One limitation is virt-firmware's: it keys
variables by name only, so two variables with the same name under different GUIDs
collapse to the last one in the store (no OVMF variable we use is in that situation).

The same decoders serve the guest's live view (efivarfs, through the guest agent):
:func:`decode_load_option`, :func:`decode_boot_order`, :func:`compare_guest_view`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import VarstoreError

log = logging.getLogger(__name__)

EFI_GLOBAL_VARIABLE = "8be4df61-93ca-11d2-aa0d-00e098032b8c"

# EFI variable attributes (UEFI spec 8.2, SetVariable()).
NON_VOLATILE = 0x01
BOOTSERVICE_ACCESS = 0x02
RUNTIME_ACCESS = 0x04
_ATTRIBUTE_NAMES = (
    (0x01, "NV"),
    (0x02, "BS"),
    (0x04, "RT"),
    (0x08, "HW_ERROR"),
    (0x10, "AUTH_WRITE"),
    (0x20, "TIME_AUTH"),
    (0x40, "APPEND"),
    (0x80, "ENHANCED_AUTH"),
)
LOAD_OPTION_ACTIVE = 0x01

_BOOT_RE = re.compile(r"^Boot([0-9A-F]{4})$")


def attribute_names(attributes: int) -> list[str]:
    """``7`` -> ``["NV", "BS", "RT"]``; unknown bits as hex."""
    names = [n for bit, n in _ATTRIBUTE_NAMES if attributes & bit]
    rest = attributes & ~sum(bit for bit, _ in _ATTRIBUTE_NAMES)
    if rest:
        names.append(f"0x{rest:x}")
    return names


def boot_name(number: int) -> str:
    """``1`` -> ``"Boot0001"``."""
    return f"Boot{number:04X}"


# --- the virt-firmware boundary ---------------------------------------------------------


class _Capture(logging.Filter):
    """Keeps virt-firmware's log records (its only explanation before ``sys.exit``)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "virt" + os.sep + "firmware" not in record.pathname:
            return True
        self.messages.append(record.getMessage())
        log.debug("virt-firmware: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _virt_firmware(path: Path | str, action: str) -> Iterator[None]:
    """Run virt-firmware code; anything it raises or exits with becomes VarstoreError."""
    capture = _Capture()
    root = logging.getLogger()
    root.addFilter(capture)
    try:
        yield
    except VarstoreError:
        raise
    except (SystemExit, Exception) as exc:  # third-party parser on untrusted bytes
        said = "; ".join(capture.messages[-3:]) or f"{type(exc).__name__}: {exc}"
        raise VarstoreError(path, f"{action} failed: {said}") from exc
    finally:
        root.removeFilter(capture)


# --- model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EfiVariable:
    """One UEFI variable as stored: name, vendor GUID, attributes, data."""

    name: str
    guid: str
    attributes: int
    data: bytes

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.guid)

    @property
    def non_volatile(self) -> bool:
        return bool(self.attributes & NON_VOLATILE)

    def describe(self) -> str:
        """A short readable value: boot entry, boot order, or size and leading hex."""
        number = _boot_number(self.name, self.guid)
        try:
            if number is not None:
                return str(decode_load_option(self.data, number, where=self.name))
            if self.name in ("BootOrder", "DriverOrder") and self.guid == EFI_GLOBAL_VARIABLE:
                return "[" + ", ".join(boot_name(n) for n in decode_boot_order(self.data)) + "]"
            if self.name in ("BootNext", "BootCurrent", "Timeout") and len(self.data) == 2:
                value = struct.unpack("<H", self.data)[0]
                return boot_name(value) if self.name != "Timeout" else str(value)
            text = _virt_firmware_format(self)
        except VarstoreError as exc:
            return f"undecodable ({exc})"
        if text:
            return text
        head = self.data[:16].hex()
        return f"{len(self.data)} bytes: {head}{'...' if len(self.data) > 16 else ''}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "guid": self.guid,
            "guid_name": _guid_name(self.guid),
            "attributes": self.attributes,
            "attribute_names": attribute_names(self.attributes),
            "size": len(self.data),
            "data": self.data.hex(),
        }


@dataclass(frozen=True)
class BootEntry:
    """A decoded ``Boot####`` load option (UEFI spec 3.1.3, EFI_LOAD_OPTION)."""

    number: int
    title: str
    device_path: str
    optional_data: bytes = b""
    active: bool = True
    attributes: int = LOAD_OPTION_ACTIVE

    @property
    def name(self) -> str:
        return boot_name(self.number)

    def __str__(self) -> str:
        text = f'{self.name} "{self.title}" {self.device_path}'
        if not self.active:
            text += " (inactive)"
        if self.optional_data:
            text += f" optional-data={self.optional_data.hex()}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "name": self.name,
            "title": self.title,
            "device_path": self.device_path,
            "optional_data": self.optional_data.hex(),
            "active": self.active,
            "attributes": self.attributes,
        }


@dataclass(frozen=True)
class VarstoreModel:
    """What a varstore file holds, decoded."""

    path: Path
    size: int
    variables: dict[tuple[str, str], EfiVariable]
    boot_entries: dict[int, BootEntry]
    boot_order: list[int]
    boot_next: int | None
    # Variables that are present but could not be decoded (e.g. a garbage Boot####).
    problems: tuple[str, ...] = field(default=())

    def get(self, name: str, guid: str = EFI_GLOBAL_VARIABLE) -> EfiVariable | None:
        return self.variables.get((name, guid.lower()))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size": self.size,
            "boot_order": [boot_name(n) for n in self.boot_order],
            "boot_next": None if self.boot_next is None else boot_name(self.boot_next),
            "boot_entries": [self.boot_entries[n].to_json() for n in sorted(self.boot_entries)],
            "variables": [self.variables[k].to_json() for k in sorted(self.variables)],
            "problems": list(self.problems),
        }

    def __str__(self) -> str:
        lines = [f"varstore {self.path} ({self.size} bytes, {len(self.variables)} variables)"]
        order = ", ".join(boot_name(n) for n in self.boot_order) or "(none)"
        lines.append(f"BootOrder: {order}")
        if self.boot_next is not None:
            lines.append(f"BootNext: {boot_name(self.boot_next)}")
        numbers = {
            n: v for v in self.variables.values() if (n := _boot_number(v.name, v.guid)) is not None
        }
        lines.append("Boot entries:" if numbers else "Boot entries: (none)")
        for n in sorted(numbers):
            e = self.boot_entries.get(n)
            if e is None:
                lines.append(f"  {boot_name(n)} undecodable ({len(numbers[n].data)} bytes)")
                continue
            flag = "" if e.active else " (inactive)"
            lines.append(f'  {e.name}{flag} "{e.title}"')
            lines.append(f"      {e.device_path}")
        others = [
            v for k, v in sorted(self.variables.items())
            if _boot_number(v.name, v.guid) is None and not (
                v.guid == EFI_GLOBAL_VARIABLE and v.name in ("BootOrder", "BootNext"))
        ]  # fmt: skip
        lines.append("Other variables:" if others else "Other variables: (none)")
        for v in others:
            attrs = "|".join(attribute_names(v.attributes))
            lines.append(f"  {v.name} {_guid_name(v.guid)} [{attrs}] {v.describe()}")
        for p in self.problems:
            lines.append(f"problem: {p}")
        return "\n".join(lines)


def _virt_firmware_format(var: EfiVariable) -> str | None:
    """virt-firmware's own rendering of well-known variables (ascii, bool, device path)."""
    from virt.firmware.efi import efivar

    with _virt_firmware(var.name, "formatting the value"):
        obj = efivar.EfiVar(var.name, guid=var.guid, attr=var.attributes, data=var.data)
        text = obj.fmt_data()
    return None if text is None else str(text)


def _guid_name(guid: str) -> str:
    from virt.firmware.efi import guids

    try:
        return str(guids.name(guids.parse_str(guid)))
    except Exception:  # an odd GUID string only loses its friendly name
        return guid


def _boot_number(name: str, guid: str) -> int | None:
    match = _BOOT_RE.match(name)
    if match is None or guid != EFI_GLOBAL_VARIABLE:
        return None
    return int(match.group(1), 16)


# --- decoding --------------------------------------------------------------------------


# --- load options: the one codec (bootorder builds and copies them, the model decodes them) ---


@dataclass(frozen=True)
class LoadOption:
    """An EFI_LOAD_OPTION split into its raw parts (UEFI spec 3.1.3)."""

    attributes: int
    title: str
    device_path: bytes
    optional_data: bytes = b""

    def encode(self) -> bytes:
        """The load option's bytes, as a ``Boot####`` variable holds them."""
        title = self.title.encode("utf-16-le") + b"\0\0"
        return (struct.pack("<IH", self.attributes, len(self.device_path)) + title
                + self.device_path + self.optional_data)  # fmt: skip


def split_load_option(data: bytes, where: str = "load option") -> LoadOption:
    """The raw parts of a load option (the device path stays bytes, to be copied)."""
    if len(data) < 8:
        raise VarstoreError(where, f"load option of {len(data)} bytes is too short")
    attributes, path_len = struct.unpack_from("<IH", data)
    end = 6
    while True:
        if end + 2 > len(data):
            raise VarstoreError(where, "description is not a terminated UCS-2 string")
        if data[end:end + 2] == b"\0\0":
            break
        end += 2
    title = data[6:end].decode("utf-16-le", "replace")
    start = end + 2
    if start + path_len > len(data):
        raise VarstoreError(
            where, f"device path length {path_len} runs past the end ({len(data)} bytes)"
        )
    return LoadOption(attributes, title, data[start:start + path_len], data[start + path_len:])


def decode_load_option(data: bytes, number: int = 0, *, where: str = "") -> BootEntry:
    """Decode an EFI_LOAD_OPTION (a ``Boot####`` value, no efivarfs attribute prefix)."""
    from virt.firmware.efi import bootentry

    label = where or f"{boot_name(number)} data"
    option = split_load_option(data, where=label)  # the structure, checked completely
    with _virt_firmware(label, "decoding the load option"):
        # virt-firmware renders the device path as text (UEFI's device path to text)
        device_path = str(bootentry.BootEntry(data=bytes(data)).devicepath)
    return BootEntry(
        number=number,
        title=option.title,
        device_path=device_path,
        optional_data=option.optional_data,
        active=bool(option.attributes & LOAD_OPTION_ACTIVE),
        attributes=option.attributes,
    )


def decode_boot_order(data: bytes, *, where: str = "BootOrder data") -> list[int]:
    """``BootOrder``'s value (UINT16 array, no efivarfs prefix) as a list of numbers."""
    if len(data) % 2:
        raise VarstoreError(where, f"{len(data)} bytes is not a whole number of UINT16s")
    return [n for (n,) in struct.iter_unpack("<H", data)]


# --- reading ---------------------------------------------------------------------------


def read_varstore(path: Path | str, *, strict: bool = True) -> VarstoreModel:
    """Read a raw edk2 varstore file (OVMF_VARS*.fd or a guest's copy) into a model.

    A store that cannot be parsed completely (a garbled header, a variable running past
    the end, a state byte edk2 never writes, anything but erased flash after the last
    header) is refused with :class:`VarstoreError` naming the file and the offset.
    ``strict=False`` is for forensics only: it returns the variables up to the damage, for
    a caller that reports the damage itself (:func:`integrity_problems`; the storm does)."""
    from virt.firmware.varstore import edk2

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise VarstoreError(path, f"cannot read: {exc.strerror}") from exc
    if not path.is_file():
        raise VarstoreError(path, "not a regular file")
    if size == 0:
        raise VarstoreError(path, "empty file")
    with _virt_firmware(path, "reading"):
        if not edk2.Edk2VarStore.probe(str(path)):
            raise VarstoreError(
                path, f"no edk2 variable store (NvData firmware volume) in {size} bytes"
            )
        store = edk2.Edk2VarStore(str(path))
        # virt-firmware slices silently past the end; its own bounds tell truncation.
        if store.end > len(store.filedata):
            raise VarstoreError(
                path,
                f"truncated: its variable store ends at byte {store.end}, "
                f"the file has {len(store.filedata)}",
            )
    # refuse what cannot be parsed completely: virt-firmware stops quietly at the first
    # header it does not recognise, which would read a garbled store as "no variables"
    _slots, problems = store_slots(path)
    if problems and strict:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise VarstoreError(path, "not a complete edk2 variable store: "
                            + "; ".join(p.removeprefix(f"{path}: ") for p in problems[:2]) + more)
    with _virt_firmware(path, "reading"):
        varlist = store.get_varlist()
        raw = [
            EfiVariable(
                name=str(v.name),
                guid=str(v.guid).lower(),
                attributes=int(v.attr),
                data=bytes(v.data),
            )
            for v in varlist.values()
        ]
    return _model(path, size, raw)


def _model(path: Path, size: int, raw: Sequence[EfiVariable]) -> VarstoreModel:
    variables = {v.key: v for v in raw}
    entries: dict[int, BootEntry] = {}
    problems: list[str] = []
    order: list[int] = []
    boot_next: int | None = None
    for v in raw:
        number = _boot_number(v.name, v.guid)
        if number is None:
            continue
        try:
            entries[number] = decode_load_option(v.data, number, where=f"{path}: {v.name}")
        except VarstoreError as exc:
            problems.append(str(exc))
    bo = variables.get(("BootOrder", EFI_GLOBAL_VARIABLE))
    if bo is not None:
        try:
            order = decode_boot_order(bo.data, where=f"{path}: BootOrder")
        except VarstoreError as exc:
            problems.append(str(exc))
    bn = variables.get(("BootNext", EFI_GLOBAL_VARIABLE))
    if bn is not None:
        if len(bn.data) == 2:
            boot_next = struct.unpack("<H", bn.data)[0]
        else:
            problems.append(f"{path}: BootNext has {len(bn.data)} bytes, expected 2")
    return VarstoreModel(path, size, variables, entries, order, boot_next, tuple(problems))


# --- diff ------------------------------------------------------------------------------


def boot_order_diff(before: Sequence[int], after: Sequence[int]) -> list[str]:
    """What happened to a boot order, in words (empty when equal)."""
    if list(before) == list(after):
        return []
    out = []
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    if added:
        out.append("added " + ", ".join(boot_name(n) for n in added))
    if removed:
        out.append("removed " + ", ".join(boot_name(n) for n in removed))
    kept_before = [n for n in before if n in after]
    kept_after = [n for n in after if n in before]
    if kept_before != kept_after:
        out.append("reordered")
    fmt = ", ".join
    out.append(f"[{fmt(boot_name(n) for n in before)}] -> [{fmt(boot_name(n) for n in after)}]")
    return out


@dataclass(frozen=True)
class VarstoreDiff:
    """Variables added, removed and changed between two varstores (a -> b)."""

    a: Path
    b: Path
    added: tuple[EfiVariable, ...]
    removed: tuple[EfiVariable, ...]
    changed: tuple[tuple[EfiVariable, EfiVariable], ...]
    boot_order: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def added_boot_entries(self) -> list[int]:
        return sorted(n for v in self.added if (n := _boot_number(v.name, v.guid)) is not None)

    def __str__(self) -> str:
        lines = [f"--- {self.a}", f"+++ {self.b}"]
        if not self:
            lines.append("(no differences)")
        for v in self.removed:
            lines.append(f"- {v.name} {_guid_name(v.guid)}: {v.describe()}")
        for v in self.added:
            lines.append(f"+ {v.name} {_guid_name(v.guid)}: {v.describe()}")
        for old, new in self.changed:
            lines.append(f"~ {new.name} {_guid_name(new.guid)}:")
            if old.attributes != new.attributes:
                lines.append(
                    f"    attributes {'|'.join(attribute_names(old.attributes))} -> "
                    f"{'|'.join(attribute_names(new.attributes))}"
                )
            if old.data != new.data:
                lines.append(f"    was {old.describe()}")
                lines.append(f"    now {new.describe()}")
        if self.boot_order:
            lines.append("BootOrder: " + "; ".join(self.boot_order))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "a": str(self.a),
            "b": str(self.b),
            "added": [v.to_json() for v in self.added],
            "removed": [v.to_json() for v in self.removed],
            "changed": [{"before": o.to_json(), "after": n.to_json()} for o, n in self.changed],
            "boot_order": list(self.boot_order),
        }


def diff(a: VarstoreModel, b: VarstoreModel) -> VarstoreDiff:
    """Compare two varstore models (``a`` is the before, ``b`` the after)."""
    added = tuple(b.variables[k] for k in sorted(b.variables.keys() - a.variables.keys()))
    removed = tuple(a.variables[k] for k in sorted(a.variables.keys() - b.variables.keys()))
    changed = tuple(
        (a.variables[k], b.variables[k])
        for k in sorted(a.variables.keys() & b.variables.keys())
        if a.variables[k] != b.variables[k]
    )
    return VarstoreDiff(a.path, b.path, added, removed, changed,
                        tuple(boot_order_diff(a.boot_order, b.boot_order)))  # fmt: skip


# --- the guest's view ------------------------------------------------------------------


GuestVars = Mapping[tuple[str, str], tuple[int, bytes]]


def compare_guest_view(
    model: VarstoreModel, guest_vars: GuestVars, *, complete: bool = False
) -> list[str]:
    """Differences between the host-side file and what the guest reads from efivarfs.

    ``guest_vars`` maps (name, GUID) to (attributes, data without the 4-byte attribute
    prefix).  Volatile variables (BootCurrent, ...) are ignored: the file cannot hold
    them.  With ``complete``, the guest's dict claims to be every variable it can see, so
    a non-volatile runtime-visible variable of the file that the guest lacks is reported.
    """
    out: list[str] = []
    seen: set[tuple[str, str]] = set()
    for (name, guid), (attrs, data) in sorted(guest_vars.items()):
        key = (name, guid.lower())
        seen.add(key)
        if not attrs & NON_VOLATILE:
            continue
        host = model.variables.get(key)
        guest = EfiVariable(name, key[1], attrs, bytes(data))
        if host is None:
            out.append(f"{name} ({key[1]}): in the guest ({guest.describe()}), not in {model.path}")
            continue
        if host.attributes != attrs:
            out.append(
                f"{name}: attributes differ: guest {'|'.join(attribute_names(attrs))}, "
                f"file {'|'.join(attribute_names(host.attributes))}"
            )
        if host.data != guest.data:
            out.append(f"{name}: guest has {guest.describe()}; file has {host.describe()}")
    if complete:
        for key, v in sorted(model.variables.items()):
            if key not in seen and v.non_volatile and v.attributes & RUNTIME_ACCESS:
                out.append(
                    f"{v.name} ({v.guid}): in {model.path} ({v.describe()}), not in the guest"
                )
    return out


# --- private copies --------------------------------------------------------------------


def is_blank(path: Path) -> bool:
    """True for an all-zero file: Debian's AAVMF_VARS.fd before 2025.02 is one (AAVMF
    formats the store on first boot), so it is a valid template that no parser reads."""
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                if chunk.count(0) != len(chunk):
                    return False
    except OSError as exc:
        raise VarstoreError(path, f"cannot read: {exc.strerror}") from exc
    return True


@functools.lru_cache(maxsize=64)
def _template_parses(path: str, size: int, mtime_ns: int) -> None:
    """:func:`read_varstore` of a template (a blank one passes: :func:`is_blank`),
    remembered per file (size and mtime in the key): every QEMU the harness spawns gets a
    copy of it (2-3 ms of parsing each time, half a millisecond for the blank test)."""
    if not is_blank(Path(path)):
        read_varstore(path)


def instantiate(
    template: Path | str, dest: Path | str, *, overwrite: bool = False, validate: bool = True,
    durable: bool = True,
) -> Path:
    """Make a guest's private varstore: a copy of ``template`` at ``dest``, mode 0600.

    The copy is written to a temporary file beside ``dest`` and moved into place, so
    ``dest`` is never half-written.  Refuses an existing ``dest`` unless ``overwrite``,
    and refuses ``dest`` being the template itself.  With ``validate`` the template
    must parse as a varstore or be blank (:func:`is_blank`).  ``durable``: the copy reaches the disk before it is moved
    into place (a varstore that outlives the run); a scratch copy in a work directory
    removed with its guest skips that (an fsync on this machine's disk took up to 56 ms).
    """
    template, dest = Path(template), Path(dest)
    if not template.is_file():
        raise VarstoreError(template, "template does not exist or is not a regular file")
    if dest.exists() and (dest.resolve() == template.resolve() or os.path.samefile(dest, template)):
        raise VarstoreError(dest, f"refusing to overwrite the template {template} itself")
    if dest.resolve() == template.resolve():
        raise VarstoreError(dest, f"refusing to overwrite the template {template} itself")
    if dest.exists() and not overwrite:
        raise VarstoreError(dest, "already exists; pass overwrite=True to replace it")
    if validate:
        st = template.stat()
        _template_parses(str(template.resolve()), st.st_size, st.st_mtime_ns)
    try:
        data = template.read_bytes()
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    except OSError as exc:
        raise VarstoreError(dest, f"cannot create the copy: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        if overwrite:
            os.replace(tmp, dest)
        else:
            # link() fails if dest appeared meanwhile: no overwrite by a race.
            os.link(tmp, dest)
    except FileExistsError as exc:
        raise VarstoreError(dest, "appeared while copying; not overwritten") from exc
    except OSError as exc:
        raise VarstoreError(dest, f"cannot write the copy: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return dest


@contextlib.contextmanager
def private_copy(template: Path | str, dest: Path | str) -> Iterator[Path]:
    """A varstore copy owned by a ``with`` block (or an ExitStack): removed on exit."""
    path = instantiate(template, dest)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --- the store's structure: every header, its state, and what follows the last -------------

#: edk2 variable header states (MdeModulePkg VariableFormat.h); a state byte only ever loses
#: bits, so an updated variable goes ADDED -> ADDED & IN_DELETED_TRANSITION -> ... & DELETED.
VAR_HEADER_VALID_ONLY, VAR_ADDED = 0x7F, 0x3F
VAR_IN_DELETED_TRANSITION, VAR_DELETED = 0xFE, 0xFD
_SETTLED_STATES = {
    VAR_ADDED: "added",
    VAR_ADDED & VAR_DELETED: "deleted",
    VAR_ADDED & VAR_IN_DELETED_TRANSITION & VAR_DELETED: "deleted",
}
_TRANSITIONAL_STATES = {
    VAR_HEADER_VALID_ONLY: "header valid only (its data was never completed)",
    VAR_ADDED & VAR_IN_DELETED_TRANSITION: "in deleted transition (an update did not finish)",
}
_HEADER = struct.Struct("<HBxLQ16sLLL16s")  # authenticated header: 60 bytes


@dataclass(frozen=True)
class StoreSlot:
    """One variable header in the raw store: where, its state, its sizes."""

    offset: int
    state: int
    name_size: int
    data_size: int

    @property
    def end(self) -> int:
        return (self.offset + _HEADER.size + self.name_size + self.data_size + 3) & ~3


def store_slots(path: Path | str) -> tuple[list[StoreSlot], list[str]]:
    """Walk every variable header of an edk2 (authenticated) varstore file: the slots, and
    the problems a complete parse cannot accept, each naming the file and the offset: a
    header that runs past the store's end, a state byte edk2 never writes, anything but
    erased flash (0xff) after the last header."""
    from virt.firmware.varstore import edk2

    path = Path(path)
    with _virt_firmware(path, "reading"):
        if not edk2.Edk2VarStore.probe(str(path)):
            raise VarstoreError(path, "no edk2 variable store (NvData firmware volume)")
        store = edk2.Edk2VarStore(str(path))
    data, pos, end = store.filedata, store.start, min(store.end, len(store.filedata))
    slots: list[StoreSlot] = []
    problems: list[str] = []
    while pos + _HEADER.size <= end:
        magic, state, _attr, _count, _time, _pk, nsize, dsize, _guid = _HEADER.unpack_from(data, pos)
        if magic != 0x55AA:
            break
        slot = StoreSlot(pos, state, nsize, dsize)
        if slot.end > end:
            problems.append(f"{path}: the variable at offset {pos:#x} ({nsize}-byte name, "
                            f"{dsize}-byte data) runs past the store's end {end:#x}")  # fmt: skip
            return slots, problems
        if state not in _SETTLED_STATES and state not in _TRANSITIONAL_STATES:
            problems.append(f"{path}: the variable at offset {pos:#x} has state byte "
                            f"{state:#04x}, which edk2 never writes")  # fmt: skip
        slots.append(slot)
        pos = slot.end
    tail = bytes(data[pos:end])
    erased = b"\xff"
    if tail.strip(erased):
        first = pos + len(tail) - len(tail.lstrip(erased))
        last = pos + len(tail.rstrip(erased))
        problems.append(f"{path}: bytes that are neither a variable header nor erased flash "
                        f"at offset {first:#x}..{last:#x} (the last header ends at {pos:#x})")
    return slots, problems


def integrity_problems(path: Path | str, *, settled: bool = True) -> list[str]:
    """What is wrong with the store's structure; with ``settled`` (no write in progress)
    a variable left half-written or half-updated is a problem too."""
    slots, problems = store_slots(path)
    if settled:
        for s in slots:
            why = _TRANSITIONAL_STATES.get(s.state)
            if why is not None:
                problems.append(f"{path}: the variable at offset {s.offset:#x} is {why}")
    return problems
