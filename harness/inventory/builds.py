"""A QEMU build and what it can do.

A :class:`QemuBuild` is one emulator binary plus how to run it (environment, ``-L`` data
directories).  Its capabilities (version, machine types, migration modes, capabilities,
parameters, ``file:`` URIs, CPU models) are probed once over QMP from the build itself and
cached next to the cache root; they are never guessed from the version number.

Builds come from the catalogue (provisioned prefixes) or are registered by the user: an
emulator binary, a QEMU build directory, or a directory of unpacked Debian packages.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import (
    AmbiguousVersionError,
    ConfigError,
    LaunchError,
    ProvisionError,
    UnknownVersionError,
)
from harness.inventory import catalog as catalog_mod
from harness.inventory import sources
from harness.inventory.catalog import QemuEntry, Version
from harness.inventory.provision import find_loader, host_triplet
from harness.paths import (
    cache_root,
    ensure_dir,
    file_stamp,
    read_registry,
    registered_records,
    registry_path,
)

log = logging.getLogger(__name__)

PROBE_FORMAT = 2  # bump when the probe gathers new facts


@dataclass(frozen=True)
class MachineType:
    """One ``-machine`` type a build offers."""

    name: str
    alias: str | None = None
    is_default: bool = False
    deprecated: bool = False

    def versioned(self) -> tuple[str, Version] | None:
        """(family, version) for versioned types such as ``pc-q35-7.2`` or ``virt-9.0``."""
        match = re.match(r"^(pc-q35|pc-i440fx|virt)-(\d+\.\d+)$", self.name)
        if not match:
            return None
        return match.group(1), Version.parse(match.group(2))


@dataclass(frozen=True)
class Capabilities:
    """What a build supports, as probed from its QMP schema and queries."""

    version: str
    package: str
    machine_types: tuple[MachineType, ...]
    migration_modes: tuple[str, ...]
    migration_capabilities: tuple[str, ...]
    migration_parameters: tuple[str, ...]
    file_uri: bool
    migrate_channels: bool
    cpu_models: tuple[str, ...]
    commands: frozenset[str] = field(default_factory=frozenset)

    def has_mode(self, mode: str) -> bool:
        return mode in self.migration_modes

    def has_capability(self, cap: str) -> bool:
        return cap in self.migration_capabilities

    def machine_names(self) -> list[str]:
        return [m.name for m in self.machine_types]

    def resolve_machine(self, name: str) -> str:
        """An alias such as ``q35`` -> its versioned type (``pc-q35-10.0``)."""
        for m in self.machine_types:
            if m.alias == name:
                return m.name
        return name

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["commands"] = sorted(self.commands)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Capabilities:
        return cls(
            version=data["version"],
            package=data.get("package", ""),
            machine_types=tuple(MachineType(**m) for m in data["machine_types"]),
            migration_modes=tuple(data["migration_modes"]),
            migration_capabilities=tuple(data["migration_capabilities"]),
            migration_parameters=tuple(data["migration_parameters"]),
            file_uri=bool(data["file_uri"]),
            migrate_channels=bool(data["migrate_channels"]),
            cpu_models=tuple(data["cpu_models"]),
            commands=frozenset(data.get("commands", ())),
        )


@dataclass(frozen=True)
class QemuBuild:
    """One QEMU emulator and how to run it."""

    label: str
    arch: str
    binary: Path
    datadirs: tuple[Path, ...] = ()
    libdirs: tuple[Path, ...] = ()
    source: str = "catalog"
    prefix: Path | None = None
    #: The prefix's own dynamic loader, for a build that brings its own C library (a newer
    #: Debian suite's QEMU on this host): the binary is started through it, with the
    #: prefix's library directories only.  None: the host's loader, with ``libdirs`` first.
    loader: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for running the binary (the prefix's libraries and modules first)."""
        env = dict(os.environ)
        if self.libdirs and self.loader is None:
            paths = [str(p) for p in self.libdirs]
            if env.get("LD_LIBRARY_PATH"):
                paths.append(env["LD_LIBRARY_PATH"])
            env["LD_LIBRARY_PATH"] = ":".join(paths)
        env.update(self.module_env())
        return env

    def module_env(self) -> dict[str, str]:
        """``QEMU_MODULE_DIR`` for a prefix build: its own modules, never the host's."""
        if self.prefix is None:
            return {}
        for lib in self.libdirs:
            if (lib / "qemu").is_dir():
                return {"QEMU_MODULE_DIR": str(lib / "qemu")}
        return {}

    def wrapper(self) -> list[str]:
        """What goes before the binary on a command line: the prefix's loader and its
        library path for an own-libc build, else nothing."""
        if self.loader is None:
            return []
        return [str(self.loader), "--library-path", ":".join(str(d) for d in self.libdirs)]

    def command(self) -> list[str]:
        """The argv prefix that runs this build from a clean environment of the host
        (``env`` for the variables, then the loader if any, then the binary): what a
        cpr-exec command line starts with, whichever build the old process was."""
        unset, assign = [], []  # env takes its options before the assignments
        if self.loader is None and self.libdirs:
            assign.append("LD_LIBRARY_PATH=" + ":".join(str(d) for d in self.libdirs))
        else:
            unset += ["-u", "LD_LIBRARY_PATH"]
        modules = self.module_env()
        assign += [f"{k}={v}" for k, v in modules.items()]
        if not modules:
            unset += ["-u", "QEMU_MODULE_DIR"]
        env = ["/usr/bin/env", *unset, *assign]
        return [*env, *self.wrapper(), str(self.binary)]

    def data_args(self) -> list[str]:
        """``-L`` arguments for the build's firmware blobs and option ROMs."""
        out: list[str] = []
        for d in self.datadirs:
            out += ["-L", str(d)]
        return out

    @property
    def version(self) -> Version:
        return Version.parse(self.capabilities.version)

    @functools.cached_property
    def capabilities(self) -> Capabilities:
        """The build's probed capabilities (cached on disk per binary)."""
        return probe(self)

    def describe(self) -> dict[str, Any]:
        caps = self.capabilities
        return {
            "label": self.label,
            "version": caps.version,
            "package": caps.package,
            "arch": self.arch,
            "path": str(self.binary),
            "source": self.source,
            "machine_types": caps.machine_names(),
            "migration_modes": list(caps.migration_modes),
            "migration_capabilities": list(caps.migration_capabilities),
            "file_uri": caps.file_uri,
            "own_libc": self.loader is not None,
            "loader": str(self.loader) if self.loader else None,
        }

    def __str__(self) -> str:
        return f"QEMU {self.label} ({self.binary})"


# --- probing -------------------------------------------------------------------------


def _cache_key(build: QemuBuild) -> str:
    st = build.binary.stat()
    text = f"{PROBE_FORMAT}:{build.binary}:{st.st_size}:{st.st_mtime_ns}:{build.loader}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _schema_enum_values(schema: Sequence[Mapping[str, Any]], command: str, path: Sequence[str]) -> list[str]:
    """Follow ``command``'s argument type through member names in ``path`` to an enum."""
    by_name = {e["name"]: e for e in schema}
    cmd = by_name.get(command)
    if not cmd or cmd.get("meta-type") != "command":
        return []
    typ = by_name.get(cmd.get("arg-type", ""))
    for member in path:
        if typ is None:
            return []
        if typ.get("meta-type") == "array":
            typ = by_name.get(typ.get("element-type", ""))
            if typ is None:
                return []
        found = None
        for m in list(typ.get("members", [])) + [
            vm for v in typ.get("variants", []) for vm in by_name.get(v["type"], {}).get("members", [])
        ]:
            if m.get("name") == member:
                found = m
                break
        if found is None:
            return []
        typ = by_name.get(found["type"])
        if typ is not None and typ.get("meta-type") == "array":
            typ = by_name.get(typ.get("element-type", ""))
    if typ is None or typ.get("meta-type") != "enum":
        return []
    values = typ.get("values") or [m["name"] for m in typ.get("members", [])]
    return [str(v) for v in values]


def capabilities_from_qmp(
    version: Mapping[str, Any],
    machines: Sequence[Mapping[str, Any]],
    schema: Sequence[Mapping[str, Any]],
    capabilities: Sequence[Mapping[str, Any]],
    parameters: Mapping[str, Any],
    cpus: Sequence[Mapping[str, Any]],
) -> Capabilities:
    """Build :class:`Capabilities` from raw QMP answers (pure; unit tested on recordings)."""
    q = version["qemu"]
    ver = f"{q['major']}.{q['minor']}.{q['micro']}"
    mtypes = tuple(
        sorted(
            (
                MachineType(
                    name=m["name"],
                    alias=m.get("alias"),
                    is_default=bool(m.get("is-default", False)),
                    deprecated=bool(m.get("deprecated", False)),
                )
                for m in machines
            ),
            key=lambda m: m.name,
        )
    )
    modes = _schema_enum_values(schema, "migrate-set-parameters", ["mode"])
    if not modes:
        modes = ["normal"]  # builds before 8.2 have no 'mode' parameter: plain migration only
    transports = _schema_enum_values(schema, "migrate", ["channels", "addr", "transport"])
    has_channels = bool(transports)
    file_uri = "file" in transports
    if not has_channels:
        # 8.2 added file: with the channels API; also detect any enum listing a file transport
        file_uri = any(
            e.get("meta-type") == "enum"
            and {"socket", "exec", "file"} <= set(e.get("values", []))
            for e in schema
        )
    commands = frozenset(e["name"] for e in schema if e.get("meta-type") == "command")
    return Capabilities(
        version=ver,
        package=str(version.get("package", "")).strip(),
        machine_types=mtypes,
        migration_modes=tuple(modes),
        migration_capabilities=tuple(sorted(c["capability"] for c in capabilities)),
        migration_parameters=tuple(sorted(parameters)),
        file_uri=file_uri,
        migrate_channels=has_channels,
        cpu_models=tuple(sorted(c["name"] for c in cpus)),
        commands=commands,
    )


def probe_raw(build: QemuBuild) -> dict[str, Any]:
    """Start the build with ``-machine none`` and record the QMP answers the probe needs."""
    from harness.guest.qemu_process import QemuProcess

    with tempfile.TemporaryDirectory(prefix="harness-probe-") as tmp:
        proc = QemuProcess(
            build,
            ["-machine", "none", "-nodefaults", "-S"],
            workdir=Path(tmp),
            name="probe",
        )
        with proc:
            qmp = proc.qmp
            return {
                "version": qmp("query-version"),
                "machines": qmp("query-machines"),
                "schema": qmp("query-qmp-schema"),
                "capabilities": qmp("query-migrate-capabilities"),
                "parameters": qmp("query-migrate-parameters"),
                "cpus": qmp("query-cpu-definitions"),
            }


def probe(build: QemuBuild) -> Capabilities:
    """The build's capabilities, from the on-disk cache or a fresh probe."""
    if not build.binary.is_file():
        raise LaunchError(f"QEMU binary {build.binary} does not exist")
    cache = ensure_dir(cache_root() / "probes") / f"{_cache_key(build)}.json"
    try:
        return Capabilities.from_json(json.loads(cache.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    raw = probe_raw(build)
    caps = capabilities_from_qmp(**raw)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(caps.to_json()))
    tmp.replace(cache)
    return caps


# --- finding builds --------------------------------------------------------------------


def from_prefix(prefix: Path, label: str, arch: str = "x86_64", source: str = "prefix",
                binary: str | None = None, datadirs: Iterable[str] = (),
                own_libc: bool = False) -> QemuBuild:
    """A build unpacked from Debian packages into ``prefix`` (``own_libc``: its whole
    closure, C library included, is in the prefix and runs through the prefix's loader)."""
    triplet, _name = host_triplet()
    rel = binary or f"usr/bin/qemu-system-{arch}"
    dirs = list(datadirs) or ["usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"]
    libdirs = [prefix / "usr/lib" / triplet, prefix / "lib" / triplet]
    loader = None
    if own_libc:
        loader = find_loader(prefix)
        if loader is None:
            raise ProvisionError(
                f"{prefix}: the build brings its own C library, but no {_name} is in the prefix "
                "(libc6 missing from the unpacked packages)"
            )
    return QemuBuild(
        label=label,
        arch=arch,
        binary=prefix / rel,
        datadirs=tuple(prefix / d for d in dirs if (prefix / d).is_dir()),
        libdirs=tuple(d for d in libdirs if d.is_dir()),
        source=source,
        prefix=prefix,
        loader=loader,
    )


def from_catalog(entry: QemuEntry) -> QemuBuild:
    """The provisioned build of a catalogue entry (provisioning it if needed)."""
    from harness.inventory.provision import Provisioner

    prefix = Provisioner(catalog_mod.default()).ensure_qemu(entry)
    return from_prefix(
        prefix, entry.version, entry.arch, f"catalog:{entry.suite}", entry.binary, entry.datadirs,
        own_libc=entry.own_libc,
    )


def register(path: Path | str, label: str | None = None, arch: str = "x86_64") -> QemuBuild:
    """A user's build: an emulator binary, a QEMU build directory, or unpacked packages."""
    p = Path(path).expanduser().resolve()
    exe = f"qemu-system-{arch}"
    if p.is_file():
        if not os.access(p, os.X_OK):
            raise ProvisionError(f"{p} is not an executable QEMU binary")
        build_dir = p.parent
        datadirs = [d for d in (build_dir / "pc-bios", build_dir.parent / "pc-bios") if d.is_dir()]
        return QemuBuild(label or f"custom:{p}", arch, p, tuple(datadirs), (), "binary")
    if (p / exe).is_file():  # a QEMU build directory
        datadirs = [d for d in (p / "pc-bios", p.parent / "pc-bios") if d.is_dir()]
        return QemuBuild(label or f"custom:{p}", arch, p / exe, tuple(datadirs), (), "build-dir")
    if (p / "usr/bin" / exe).is_file():  # unpacked packages (with their own libc6, or not)
        return from_prefix(p, label or f"custom:{p}", arch, "unpacked",
                           own_libc=find_loader(p) is not None)  # fmt: skip
    raise ProvisionError(
        f"{p} is not a QEMU binary, a QEMU build directory (with {exe}) or a directory of "
        f"unpacked packages (with usr/bin/{exe})"
    )


_REGISTERED: dict[str, QemuBuild] = {}


# --- builds registered for this run (written by harness.inventory.registry) -----------------------

_LOADED: dict[str, tuple[int, int]] = {}  # registry path -> (mtime_ns, size) loaded


def qemu_record(build: QemuBuild) -> dict[str, Any]:
    """A build as a registry record (every field needed to run it again)."""
    return {
        "label": build.label, "arch": build.arch, "binary": str(build.binary),
        "datadirs": [str(d) for d in build.datadirs], "libdirs": [str(d) for d in build.libdirs],
        "source": build.source, "prefix": str(build.prefix) if build.prefix else None,
        "loader": str(build.loader) if build.loader else None,
    }  # fmt: skip


def qemu_from_record(rec: dict[str, Any]) -> QemuBuild:
    """The inverse of :func:`qemu_record`."""
    try:
        return QemuBuild(
            label=str(rec["label"]), arch=str(rec["arch"]), binary=Path(rec["binary"]),
            datadirs=tuple(Path(d) for d in rec["datadirs"]),
            libdirs=tuple(Path(d) for d in rec["libdirs"]),
            source=str(rec["source"]), prefix=Path(rec["prefix"]) if rec.get("prefix") else None,
            loader=Path(rec["loader"]) if rec.get("loader") else None,
        )  # fmt: skip
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"malformed QEMU record in the registry: {rec!r}") from exc


def catalog_entry_for(version: str, arch: str = "x86_64") -> QemuEntry | None:
    """The catalogue entry of the same QEMU release (``7.2.22`` -> the ``7.2`` entry)."""
    want = Version.parse(version)
    for entry in catalog_mod.default().qemu:
        if entry.arch != arch:
            continue
        ev = Version.parse(entry.version)
        if want.matches(ev) or ev.matches(want):
            return entry
    return None


def from_source_build(sb: Any) -> QemuBuild:
    """A :class:`harness.inventory.sources.SourceBuild` as a runnable build.

    Debian's source tarball has no SeaBIOS/iPXE blobs, so after the build's own ``pc-bios``
    come the data dirs of the catalogue prefix of the same release (or the newest one).
    """
    entry = catalog_entry_for(sb.version)
    if entry is None:
        entries = sorted(catalog_mod.default().qemu, key=lambda e: Version.parse(e.version))
        entry = entries[-1] if entries else None
    datadirs = [sb.build_dir / "pc-bios"]
    if entry is not None:
        datadirs += [d for d in from_catalog(entry).datadirs if d not in datadirs]
    return QemuBuild(sb.label, "x86_64", sb.binary, tuple(d for d in datadirs if d.is_dir()),
                     (), f"source:{sb.source}", sb.root)  # fmt: skip


def source_build(label: str) -> QemuBuild | None:
    """The cached source build labelled ``label`` (``src:10.0.2+1a2b3c4d``), or None."""
    for sb in sources.cached_builds():
        if sb.label == label:
            return from_source_build(sb)
    return None


def load_registered(wanted: str | None = None) -> None:
    """Make the QEMU builds registered for this run ($HARNESS_REGISTRY, e.g. nightly's
    --qemu-deb seen from an xdist worker) known to this process, cheaply when the file did
    not change; ``wanted``, a label being looked up: ``src:...`` labels come from the
    source-build cache even without a registry file."""
    path = registry_path()
    if path is not None:
        stamp = file_stamp(path)
        if stamp is not None and _LOADED.get(str(path)) != stamp:
            for rec in read_registry(path)["qemu"]:
                add_registered(qemu_from_record(rec))
            _LOADED[str(path)] = stamp
    if wanted and wanted.startswith("src:") and wanted not in _REGISTERED:
        build = source_build(wanted)
        if build is not None:
            add_registered(build)


def forget_registered(path: Path) -> None:
    """Drop the builds loaded from the registry file ``path`` from this process."""
    for rec in registered_records(path, "qemu"):
        _REGISTERED.pop(rec["label"], None)
    _LOADED.pop(str(path), None)


def _load_registry(wanted: str | None = None) -> None:
    load_registered(wanted)


def add_registered(build: QemuBuild) -> None:
    """Make a registered build findable by its label for this process."""
    _REGISTERED[build.label] = build


def get_build(version: str, arch: str = "x86_64") -> QemuBuild:
    """A build by catalogue version (``10.0``, ``10.0.2``), registered label, or path."""
    _load_registry(version)
    if version in _REGISTERED:
        return _REGISTERED[version]
    if "/" in version:
        build = register(version, arch=arch)
        add_registered(build)
        return build
    cat = catalog_mod.default()
    try:
        entry = cat.qemu_entry(version, arch)
    except AmbiguousVersionError:
        raise
    except UnknownVersionError as exc:
        raise UnknownVersionError(
            "QEMU", version, list(exc.available) + sorted(_REGISTERED)
        ) from None
    return from_catalog(entry)


def all_builds(arch: str = "x86_64") -> list[QemuBuild]:
    """Every catalogue build for ``arch`` plus registered ones, oldest first (inside
    :func:`harness.inventory.provision.no_provisioning`: the provisioned ones only)."""
    from harness.inventory.provision import NotProvisioned, provisioning_allowed

    _load_registry()
    builds = []
    for e in catalog_mod.default().qemu:
        if e.arch != arch:
            continue
        try:
            builds.append(from_catalog(e))
        except NotProvisioned:
            if provisioning_allowed():
                raise
            # a listing: what is not provisioned is not listed (doctor names it)
    builds += [b for b in _REGISTERED.values() if b.arch == arch]
    return builds


def newest_common_machine(a: Capabilities, b: Capabilities, family: str = "pc-q35") -> str:
    """The newest versioned machine type of ``family`` that both builds offer."""
    def versions(c: Capabilities) -> dict[Version, str]:
        out = {}
        for m in c.machine_types:
            v = m.versioned()
            if v and v[0] == family:
                out[v[1]] = m.name
        return out

    va, vb = versions(a), versions(b)
    common = sorted(set(va) & set(vb))
    if not common:
        raise UnknownVersionError(f"common {family} machine type", f"{a.version}/{b.version}", [])
    return va[common[-1]]
