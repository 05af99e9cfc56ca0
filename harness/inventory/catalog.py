"""What exists: the catalogue of QEMU and firmware builds (data, not code).

The entries live in ``harness/data/qemu.toml`` and ``firmware/catalog.toml``; this module
reads them into frozen dataclasses and refuses malformed entries with an error naming
the file, the entry and the field.  Versions compare numerically (10.0 > 7.2).
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import AmbiguousVersionError, CatalogError, UnknownVersionError
from harness.paths import DATA_DIR, FIRMWARE_DIR

QEMU_CATALOG = DATA_DIR / "qemu.toml"
#: The builds a guest gets when nobody names one (VmSpec, the plugin, the CLI, scenarios):
#: written here only; the catalogue must have them (checked when it is read).
DEFAULT_QEMU = "10.0.2"
DEFAULT_FIRMWARE = "2022.11"
FIRMWARE_CATALOG = FIRMWARE_DIR / "catalog.toml"

_VERSION_RE = re.compile(r"^\d+(\.\d+)*$")


@functools.total_ordering
@dataclass(frozen=True)
class Version:
    """A dotted numeric version, compared component by component (10.0 > 7.2)."""

    parts: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``"10.0.2"``; leading ``v`` and trailing non-numeric suffixes are dropped."""
        match = re.match(r"^v?(\d+(?:\.\d+)*)", text.strip())
        if not match:
            raise ValueError(f"not a version: {text!r}")
        return cls(tuple(int(p) for p in match.group(1).split(".")))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._padded(other)[0] < self._padded(other)[1]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        a, b = self._padded(other)
        return a == b

    def __hash__(self) -> int:
        parts = list(self.parts)
        while parts and parts[-1] == 0:
            parts.pop()
        return hash(tuple(parts))

    def _padded(self, other: Version) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n = max(len(self.parts), len(other.parts))
        return (
            self.parts + (0,) * (n - len(self.parts)),
            other.parts + (0,) * (n - len(other.parts)),
        )

    def matches(self, prefix: Version) -> bool:
        """True when ``prefix``'s components are a prefix of ours (7.2 matches 7.2.22)."""
        return self.parts[: len(prefix.parts)] == prefix.parts

    def __str__(self) -> str:
        return ".".join(str(p) for p in self.parts)


@dataclass(frozen=True)
class PackageRef:
    """A Debian binary package taken from one suite."""

    name: str
    suite: str
    version: str | None = None  # that exact version (apt finds it in any suite it knows)

    def __str__(self) -> str:
        return f"{self.name}={self.version}" if self.version else f"{self.name}/{self.suite}"


@dataclass(frozen=True)
class QemuEntry:
    """A QEMU build the harness can provision."""

    version: str
    arch: str
    suite: str
    packages: tuple[PackageRef, ...]
    libs: tuple[PackageRef, ...]
    binary: str
    datadirs: tuple[str, ...]
    notes: str = ""
    #: Suites apt resolves the build's whole dependency closure from, C library included
    #: (the build then runs through the prefix's own dynamic loader).  Empty: the build
    #: runs on the host's C library, with only ``libs`` added.
    closure: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"qemu-{self.version}-{self.arch}"

    @property
    def own_libc(self) -> bool:
        """True when the build brings its own C library and loader (a newer suite's QEMU)."""
        return bool(self.closure)


@dataclass(frozen=True)
class FirmwareEntry:
    """A firmware package (OVMF, AAVMF) the harness can provision."""

    version: str
    arch: str
    package: str
    suite: str

    @property
    def key(self) -> str:
        return f"{self.package}-{self.version}-{self.arch}"


@dataclass(frozen=True)
class PythonSource:
    """The Debian source package whose python/ directory provides qemu.machine."""

    source: str
    suite: str


@dataclass(frozen=True)
class Catalog:
    """Every QEMU and firmware build the harness knows how to provision."""

    qemu: tuple[QemuEntry, ...]
    firmware: tuple[FirmwareEntry, ...]
    python: PythonSource

    def qemu_entry(self, version: str, arch: str = "x86_64") -> QemuEntry:
        """The entry for ``version`` (exact, or a unique numeric prefix such as ``10.0``)."""
        return _pick(
            "QEMU", version, [e for e in self.qemu if e.arch == arch], lambda e: e.version
        )

    def firmware_entry(self, version: str, arch: str = "x86_64") -> FirmwareEntry:
        """The firmware entry for ``version`` on ``arch``."""
        return _pick(
            "firmware",
            version,
            [e for e in self.firmware if e.arch == arch],
            lambda e: e.version,
        )

    def suites(self) -> set[str]:
        """Every Debian suite the shared package state needs (builds that bring their own
        C library resolve their closure in a private state of their own suites)."""
        out = {self.python.suite}
        for q in self.qemu:
            if q.own_libc:
                continue
            out.update(p.suite for p in q.packages + q.libs)
        out.update(f.suite for f in self.firmware)
        return out


_E = TypeVar("_E")


def _pick(kind: str, wanted: str, entries: list[_E], version_of: Callable[[_E], str]) -> _E:
    exact = [e for e in entries if version_of(e) == wanted]
    if exact:
        return exact[0]
    try:
        want = Version.parse(wanted)
    except ValueError:
        raise UnknownVersionError(kind, wanted, [version_of(e) for e in entries]) from None
    found = [e for e in entries if Version.parse(version_of(e)).matches(want)]
    if len(found) == 1:
        return found[0]
    if found:
        raise AmbiguousVersionError(kind, wanted, [version_of(e) for e in found],
                                    [version_of(e) for e in entries])  # fmt: skip
    raise UnknownVersionError(kind, wanted, [version_of(e) for e in entries])


def _field(path: Path, where: str, table: Mapping[str, Any], name: str, kind: type) -> Any:
    if name not in table:
        raise CatalogError(path, f"{where}: missing field {name!r}")
    value = table[name]
    if not isinstance(value, kind):
        raise CatalogError(
            path,
            f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}",
        )
    return value


def _str_list(path: Path, where: str, table: Mapping[str, Any], name: str) -> list[str]:
    value = table.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise CatalogError(path, f"{where}: field {name!r} must be a list of strings")
    return list(value)


def _version(path: Path, where: str, table: Mapping[str, Any]) -> str:
    version = _field(path, where, table, "version", str)
    if not _VERSION_RE.match(version):
        raise CatalogError(path, f"{where}: version {version!r} is not dotted numbers")
    return str(version)


def _refs(names: Iterable[str], default_suite: str) -> tuple[PackageRef, ...]:
    out = []
    for name in names:
        pkg, _, suite = name.partition("/")
        out.append(PackageRef(pkg, suite or default_suite))
    return tuple(out)


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise CatalogError(path, "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(path, f"not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(path, f"not valid UTF-8: {exc}") from exc


def parse_qemu(path: Path, data: Mapping[str, Any]) -> tuple[tuple[QemuEntry, ...], PythonSource]:
    """Validate the QEMU catalogue's parsed TOML."""
    entries = data.get("qemu", [])
    if not isinstance(entries, list) or not entries:
        raise CatalogError(path, "expected at least one [[qemu]] table")
    out: list[QemuEntry] = []
    seen: set[tuple[str, str]] = set()
    for i, table in enumerate(entries):
        where = f"[[qemu]] entry {i + 1}"
        if not isinstance(table, dict):
            raise CatalogError(path, f"{where}: expected a table")
        version = _version(path, where, table)
        where = f"[[qemu]] {version}"
        arch = _field(path, where, table, "arch", str)
        suite = _field(path, where, table, "suite", str)
        packages = _str_list(path, where, table, "packages")
        if not packages:
            raise CatalogError(path, f"{where}: 'packages' is empty")
        entry = QemuEntry(
            version=version,
            arch=arch,
            suite=suite,
            packages=_refs(packages, suite),
            libs=_refs(_str_list(path, where, table, "libs"), suite),
            binary=_field(path, where, table, "binary", str),
            datadirs=tuple(_str_list(path, where, table, "datadirs")),
            notes=str(table.get("notes", "")),
            closure=tuple(_str_list(path, where, table, "closure")),
        )
        if entry.closure and entry.libs:
            raise CatalogError(
                path, f"{where}: 'closure' resolves every library; drop 'libs' ({entry.libs[0]})"
            )
        if entry.closure and suite not in entry.closure:
            raise CatalogError(path, f"{where}: 'closure' must include the entry's suite {suite!r}")
        if (version, arch) in seen:
            raise CatalogError(path, f"{where}: duplicate entry for {arch}")
        seen.add((version, arch))
        out.append(entry)
    py = data.get("python")
    if not isinstance(py, dict):
        raise CatalogError(path, "missing [python] table (where qemu.machine comes from)")
    python = PythonSource(
        source=_field(path, "[python]", py, "source", str),
        suite=_field(path, "[python]", py, "suite", str),
    )
    return tuple(out), python


def parse_firmware(path: Path, data: Mapping[str, Any]) -> tuple[FirmwareEntry, ...]:
    """Validate the firmware catalogue's parsed TOML."""
    entries = data.get("firmware", [])
    if not isinstance(entries, list) or not entries:
        raise CatalogError(path, "expected at least one [[firmware]] table")
    out = []
    for i, table in enumerate(entries):
        where = f"[[firmware]] entry {i + 1}"
        if not isinstance(table, dict):
            raise CatalogError(path, f"{where}: expected a table")
        version = _version(path, where, table)
        where = f"[[firmware]] {version}"
        out.append(
            FirmwareEntry(
                version=version,
                arch=_field(path, where, table, "arch", str),
                package=_field(path, where, table, "package", str),
                suite=_field(path, where, table, "suite", str),
            )
        )
    return tuple(out)


def load(qemu_path: Path = QEMU_CATALOG, firmware_path: Path = FIRMWARE_CATALOG) -> Catalog:
    """Read and validate both catalogue files (the defaults must be entries of them)."""
    qemu, python = parse_qemu(qemu_path, _load_toml(qemu_path))
    firmware = parse_firmware(firmware_path, _load_toml(firmware_path))
    cat = Catalog(qemu=qemu, firmware=firmware, python=python)
    if qemu_path == QEMU_CATALOG and firmware_path == FIRMWARE_CATALOG:
        for path, what, version, entries in (
            (qemu_path, "QEMU", DEFAULT_QEMU, cat.qemu), (firmware_path, "firmware", DEFAULT_FIRMWARE, cat.firmware),
        ):  # fmt: skip
            if not any(e.version == version for e in entries):
                raise CatalogError(path, f"the default {what} build {version} (harness.inventory.catalog) is not an entry")
    return cat


@functools.lru_cache(maxsize=1)
def default() -> Catalog:
    """The catalogue shipped with the harness (read once per process)."""
    return load()
