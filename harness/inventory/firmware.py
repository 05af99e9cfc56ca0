"""Firmware builds, read from the QEMU firmware descriptors their packages ship.

A firmware package (Debian's ``ovmf``) ships its images under ``usr/share/OVMF`` and one
JSON descriptor per use case under ``usr/share/qemu/firmware`` (schema:
``docs/interop/firmware.json`` in QEMU's source).  The descriptors, not this module, say
which code image goes with which NVRAM template; a :class:`FirmwareBuild` is a provisioned
prefix plus its parsed :class:`FirmwareDescriptor` objects, and :meth:`FirmwareBuild.select`
picks one the way management software does (sorted by file name, first match wins).

Descriptors name absolute paths (``/usr/share/OVMF/OVMF_CODE_4M.fd``); here they are
resolved into the prefix.  A descriptor that is valid but unusable here (wrong
architecture, a file missing from the prefix, an unsupported format, a zero-length file
that hides a lower-priority one) is skipped and the reason logged; a malformed one is a
:class:`~harness.errors.CatalogError` naming the file and the field.

Debian also ships 2 MB images (``OVMF_CODE.fd`` + ``OVMF_VARS.fd``) in 2020.11 and 2022.11
that no descriptor names any more; :meth:`FirmwareBuild.variant` exposes them as
synthesized descriptors (tagged ``harness-synthesized``) so tests can build a flash-size
mismatch on purpose.  Likewise the combined ``usr/share/ovmf/OVMF.fd`` (loaded with
``-bios``, variables in RAM) is ``select(mode="stateless")``.
"""

from __future__ import annotations

import fnmatch
import functools
import gzip
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from harness.errors import (
    CatalogError,
    FirmwareError,
    UnknownVersionError,
    VarstoreError,
)
from harness.inventory import catalog
from harness.paths import file_stamp, read_registry, registered_records, registry_path
from harness.varstore import (
    is_blank as is_blank,  # a blank template is valid (AAVMF before 2025.02)
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DESCRIPTOR_DIR = PurePosixPath("usr/share/qemu/firmware")
FLASH_MODES = ("split", "combined", "stateless")
DEVICES = ("flash", "kernel", "memory")
FORMATS = ("raw", "qcow2")
SYNTHESIZED_TAG = "harness-synthesized"
# QEMU's machine aliases, expanded to the versioned globs descriptors use.
_MACHINE_ALIASES = {"q35": "pc-q35-*", "pc": "pc-i440fx-*", "virt": "virt-*"}
# The machine a build's firmware is selected for when the caller names none (AAVMF's
# descriptors list only virt-*).
DEFAULT_MACHINE = {"x86_64": "pc-q35-*", "aarch64": "virt-*"}


#: Enrolled key sets a Secure Boot varstore can start from (see FirmwareBuild.secure_boot_pair).
SB_KEYS = ("snakeoil", "ms")


@dataclass(frozen=True)
class FirmwareTarget:
    """One (emulator architecture, machine type globs) pair a descriptor supports."""

    architecture: str
    machines: tuple[str, ...]

    def matches(self, arch: str, machine: str) -> bool:
        """True for ``arch`` and a machine type (or the same glob) this target lists."""
        if arch != self.architecture:
            return False
        machine = _MACHINE_ALIASES.get(machine, machine)
        return any(machine == glob or fnmatch.fnmatchcase(machine, glob) for glob in self.machines)


@dataclass(frozen=True)
class FirmwareDescriptor:
    """One parsed QEMU firmware descriptor, its file names resolved into a prefix."""

    path: Path
    description: str
    interface_types: tuple[str, ...]
    device: str
    mode: str
    executable: Path
    nvram_template: Path | None
    format: str
    targets: tuple[FirmwareTarget, ...]
    features: tuple[str, ...]
    tags: tuple[str, ...]

    @property
    def name(self) -> str:
        """The descriptor's file name (``60-edk2-x86_64.json``)."""
        return self.path.name

    @property
    def synthesized(self) -> bool:
        """True for a pair the harness derived, that no descriptor file names."""
        return SYNTHESIZED_TAG in self.tags

    @property
    def secure_boot(self) -> bool:
        return "secure-boot" in self.features

    @property
    def requires_smm(self) -> bool:
        return "requires-smm" in self.features

    @property
    def enrolled_keys(self) -> bool:
        return "enrolled-keys" in self.features

    @property
    def code(self) -> Path:
        """The firmware executable (read-only pflash unit 0 in split mode)."""
        return self.executable

    @property
    def vars_template(self) -> Path:
        """The NVRAM template; raises for combined and stateless builds, which have none."""
        if self.nvram_template is None:
            raise FirmwareError(f"{self.path}: {self.mode} firmware has no NVRAM template")
        return self.nvram_template

    @property
    def code_size(self) -> int:
        return _size(self.executable, self.path)

    @property
    def vars_size(self) -> int:
        """Size of the NVRAM template (0 when there is none)."""
        return 0 if self.nvram_template is None else _size(self.nvram_template, self.path)

    @property
    def flash_size(self) -> int:
        """Bytes of flash the guest sees: code + vars (4 MiB or 2 MiB for OVMF)."""
        return self.code_size + self.vars_size

    def supports(self, arch: str, machine: str) -> bool:
        return any(t.matches(arch, machine) for t in self.targets)

    def to_json(self) -> dict[str, Any]:
        return {
            "descriptor": str(self.path),
            "description": self.description,
            "interface_types": list(self.interface_types),
            "device": self.device,
            "mode": self.mode,
            "code": str(self.executable),
            "vars_template": None if self.nvram_template is None else str(self.nvram_template),
            "format": self.format,
            "flash_size": self.flash_size,
            "targets": [
                {"architecture": t.architecture, "machines": list(t.machines)} for t in self.targets
            ],
            "features": list(self.features),
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class SecureBootPair:
    """A Secure Boot firmware build: its descriptor (code, features), the enrolled varstore
    template, and the key and certificate that sign images it accepts (None for keys the
    package does not ship, such as Microsoft's)."""

    descriptor: FirmwareDescriptor
    template: Path
    key: Path | None
    cert: Path | None
    passphrase: bytes | None = None  # the key's (README.Debian: 'snakeoil')

    @property
    def code(self) -> Path:
        return self.descriptor.code

    @property
    def requires_smm(self) -> bool:
        return self.descriptor.requires_smm


def _size(path: Path, descriptor: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise FirmwareError(f"{descriptor}: cannot stat {path}: {exc.strerror}") from exc


# --- parsing ---------------------------------------------------------------------------


def _get(path: Path, table: Mapping[str, Any], key: str, kind: type, where: str = "") -> Any:
    label = f"{where}.{key}" if where else key
    if key not in table:
        raise CatalogError(path, f"missing field {label!r}")
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CatalogError(
            path, f"field {label!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _strings(path: Path, table: Mapping[str, Any], key: str, where: str = "") -> tuple[str, ...]:
    label = f"{where}.{key}" if where else key
    value = _get(path, table, key, list, where)
    if not all(isinstance(v, str) for v in value):
        raise CatalogError(path, f"field {label!r} must be a list of strings")
    return tuple(value)


def _choice(path: Path, value: str, allowed: Iterable[str], label: str) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise CatalogError(path, f"field {label!r} is {value!r}, expected one of {allowed}")
    return value


def in_prefix(prefix: Path, filename: str) -> Path:
    """``/usr/share/OVMF/X.fd`` as a path inside ``prefix``, symlinks followed inside it.

    Absolute symlink targets are re-rooted in the prefix, so a package's
    ``OVMF_CODE.ms.fd -> /usr/share/OVMF/...`` still names the unpacked file.
    """
    rel = _relative(filename)
    for _ in range(40):
        candidate = prefix / rel
        if not candidate.is_symlink():
            return candidate
        target = os.readlink(candidate)
        rel = _relative(target if target.startswith("/") else f"{rel.parent}/{target}")
    raise FirmwareError(f"{prefix / filename}: too many levels of symbolic links")


def _relative(filename: str) -> PurePosixPath:
    # normpath on an absolute path clamps "..", so the result stays inside the prefix.
    return PurePosixPath(os.path.normpath("/" + filename.lstrip("/"))).relative_to("/")


def _file(path: Path, prefix: Path, table: Mapping[str, Any], where: str) -> Path:
    name = _get(path, table, "filename", str, where)
    if not name or "\0" in name:
        raise CatalogError(path, f"field {where}.filename {name!r} is not a file name")
    try:
        return in_prefix(prefix, name)
    except (OSError, ValueError) as exc:
        raise CatalogError(path, f"field {where}.filename {name!r}: {exc}") from exc


def parse_descriptor(path: Path, prefix: Path, data: Any | None = None) -> FirmwareDescriptor:
    """Parse one descriptor; file names are resolved into ``prefix``.

    ``data`` is the already-decoded JSON (read from ``path`` when None).  Anything that
    does not follow the schema raises :class:`CatalogError` naming ``path`` and the field.
    """
    if data is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CatalogError(path, f"cannot read: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise CatalogError(path, f"not valid UTF-8: {exc}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CatalogError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CatalogError(path, f"top level must be a JSON object, got {type(data).__name__}")
    description = _get(path, data, "description", str)
    interfaces = _strings(path, data, "interface-types")
    if not interfaces:
        raise CatalogError(path, "field 'interface-types' is empty")
    mapping = _get(path, data, "mapping", dict)
    device = _choice(path, _get(path, mapping, "device", str, "mapping"), DEVICES, "mapping.device")
    nvram: Path | None = None
    if device == "flash":
        # An absent mode means split (descriptors older than QEMU 7.0 have none).
        mode = "split"
        if "mode" in mapping:
            mode = _choice(path, _get(path, mapping, "mode", str, "mapping"), FLASH_MODES,
                           "mapping.mode")  # fmt: skip
        exe = _get(path, mapping, "executable", dict, "mapping")
        executable = _file(path, prefix, exe, "mapping.executable")
        fmt = _choice(
            path, _get(path, exe, "format", str, "mapping.executable"), FORMATS,
            "mapping.executable.format",
        )  # fmt: skip
        if "nvram-template" in mapping:
            tmpl = _get(path, mapping, "nvram-template", dict, "mapping")
            nvram = _file(path, prefix, tmpl, "mapping.nvram-template")
            _choice(
                path, _get(path, tmpl, "format", str, "mapping.nvram-template"), FORMATS,
                "mapping.nvram-template.format",
            )  # fmt: skip
            if mode != "split":
                raise CatalogError(path, f"mode {mode!r} must not have 'mapping.nvram-template'")
        elif mode == "split":
            # The schema allows it (the template may be absent for a split build), but a
            # split build without a template cannot give a guest a varstore.
            raise CatalogError(path, "split mode without 'mapping.nvram-template'")
    else:
        mode = "stateless"
        executable = _file(path, prefix, mapping, "mapping")
        fmt = "raw"
    targets_raw = _get(path, data, "targets", list)
    targets = []
    for i, t in enumerate(targets_raw):
        where = f"targets[{i}]"
        if not isinstance(t, dict):
            raise CatalogError(path, f"field {where!r} must be an object")
        targets.append(
            FirmwareTarget(
                architecture=_get(path, t, "architecture", str, where),
                machines=_strings(path, t, "machines", where),
            )
        )
    return FirmwareDescriptor(
        path=path,
        description=description,
        interface_types=interfaces,
        device=device,
        mode=mode,
        executable=executable,
        nvram_template=nvram,
        format=fmt,
        targets=tuple(targets),
        features=_strings(path, data, "features"),
        tags=_strings(path, data, "tags"),
    )


def load_descriptors(prefix: Path, arch: str = "x86_64") -> tuple[FirmwareDescriptor, ...]:
    """Every usable descriptor in ``prefix`` for ``arch``, in QEMU's priority order.

    Malformed descriptors raise :class:`CatalogError`; usable-elsewhere ones are skipped
    and logged with the reason.
    """
    directory = prefix / DESCRIPTOR_DIR
    files = sorted(directory.glob("*.json"), key=lambda p: p.name)
    out = []
    for path in files:
        if path.stat().st_size == 0:
            log.debug("skipping %s: zero-length (hides a lower-priority descriptor)", path)
            continue
        desc = parse_descriptor(path, prefix)
        reason = _unusable(desc, arch)
        if reason:
            log.debug("skipping %s: %s", path, reason)
            continue
        out.append(desc)
    return tuple(out)


def _unusable(desc: FirmwareDescriptor, arch: str) -> str | None:
    if not any(t.architecture == arch for t in desc.targets):
        found = ", ".join(sorted({t.architecture for t in desc.targets})) or "none"
        return f"targets {found}, not {arch}"
    if "uefi" not in desc.interface_types:
        return f"interface types {list(desc.interface_types)} lack uefi"
    if desc.format != "raw":
        return f"format {desc.format} (the harness uses raw images only)"
    for what, file in (("executable", desc.executable), ("nvram-template", desc.nvram_template)):
        if file is not None and not file.is_file():
            return f"{what} {file} is not in the prefix"
    return None


def _synthesize_2m(descs: Iterable[FirmwareDescriptor]) -> tuple[FirmwareDescriptor, ...]:
    """2 MB pairs the package still ships next to the 4 MB ones a descriptor names."""
    out: list[FirmwareDescriptor] = []
    seen: set[tuple[Path, Path]] = set()
    for d in descs:
        if d.mode != "split" or d.nvram_template is None:
            continue
        names = (d.executable.name, d.nvram_template.name)
        if not all("_4M" in n for n in names):
            continue
        code = d.executable.with_name(names[0].replace("_4M", ""))
        tmpl = d.nvram_template.with_name(names[1].replace("_4M", ""))
        if not (code.is_file() and tmpl.is_file()) or (code, tmpl) in seen:
            continue
        seen.add((code, tmpl))
        out.append(
            replace(
                d,
                description=f"{d.description} (2 MB flash: {code.name} + {tmpl.name}, "
                "shipped by the package but named by no descriptor)",
                executable=code,
                nvram_template=tmpl,
                tags=(*d.tags, SYNTHESIZED_TAG, "flash-2m"),
            )
        )
    return tuple(out)


def _synthesize_stateless(
    prefix: Path, descs: Iterable[FirmwareDescriptor]
) -> tuple[FirmwareDescriptor, ...]:
    """Debian's combined image ``usr/share/ovmf/OVMF.fd`` (loaded with ``-bios``: no
    persistent varstore, OVMF keeps variables in RAM), which no descriptor names."""
    image = prefix / "usr/share/ovmf/OVMF.fd"
    descs = tuple(descs)
    if not image.is_file() or any(_same(d.executable, image) for d in descs):
        return ()
    base = next((d for d in descs if d.mode == "split" and not d.secure_boot), None)
    if base is None:
        return ()
    return (
        replace(
            base,
            description=f"combined image {image.name} as -bios: stateless, variables in RAM "
            "(shipped by the package but named by no descriptor)",
            device="memory",
            mode="stateless",
            executable=image,
            nvram_template=None,
            tags=(*base.tags, SYNTHESIZED_TAG),
        ),
    )


# --- builds ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FirmwareBuild:
    """A provisioned firmware package: its prefix and the descriptors it ships."""

    version: str
    arch: str
    package: str
    prefix: Path
    debian_version: str
    descriptors: tuple[FirmwareDescriptor, ...]
    source: str = "catalog"
    extra: tuple[FirmwareDescriptor, ...] = field(default=(), repr=False)

    @property
    def key(self) -> str:
        return f"{self.package}-{self.version}-{self.arch}"

    def candidates(self) -> tuple[FirmwareDescriptor, ...]:
        """The descriptors, then the synthesized pairs (2 MB, stateless), in selection order."""
        return self.descriptors + self.extra

    def select(
        self,
        secure_boot: bool = False,
        machine: str | None = None,
        flash_size: int | None = None,
        mode: str = "split",
        enrolled: bool | None = None,
    ) -> FirmwareDescriptor:
        """The first descriptor (by file name) that matches; synthesized pairs come last.

        ``machine`` defaults to the build's architecture's (``pc-q35-*``, ``virt-*``).
        ``flash_size`` is code + vars in bytes (``4 * MiB``, ``2 * MiB``), or None for any.
        ``enrolled``: the descriptor's template must (True) or must not (False) have keys
        enrolled (feature ``enrolled-keys``); None: either.
        """
        machine = machine or DEFAULT_MACHINE.get(self.arch, "pc-q35-*")
        wanted = f"mode={mode} secure_boot={secure_boot} machine={machine}" + (
            f" flash_size={flash_size}" if flash_size is not None else ""
        ) + (f" enrolled_keys={enrolled}" if enrolled is not None else "")
        for d in self.candidates():
            if d.mode != mode or d.secure_boot != secure_boot:
                continue
            if enrolled is not None and d.enrolled_keys != enrolled:
                continue
            if d.device != "flash" and mode != "stateless":
                continue
            if not d.supports(self.arch, machine):
                continue
            if flash_size is not None and d.flash_size != flash_size:
                continue
            return d
        offered = "; ".join(
            f"{d.name}{' (synthesized)' if d.synthesized else ''}: mode={d.mode} "
            f"secure_boot={d.secure_boot} flash_size={d.flash_size}"
            for d in self.candidates()
        )
        raise FirmwareError(
            f"{self.key} ({self.prefix}): no firmware for {wanted}; offered: {offered or 'none'}"
        )

    def secure_boot_pair(self, keys: str = "snakeoil", machine: str | None = None) -> SecureBootPair:
        """The Secure Boot build and an enrolled varstore template for it, chosen by the
        descriptors' features (``secure-boot`` + ``enrolled-keys``, and on x86
        ``requires-smm``): ``keys="ms"`` is the descriptor's own template (Microsoft's keys),
        ``keys="snakeoil"`` Debian's sibling template with the package's test key enrolled
        (``*_VARS*.snakeoil.fd``), whose key and certificate sign test images."""
        if keys not in SB_KEYS:
            raise FirmwareError(f"secure boot keys {keys!r}: expected one of {', '.join(SB_KEYS)}")
        d = self.select(secure_boot=True, machine=machine, enrolled=True)
        if d.vars_template is None:
            raise FirmwareError(f"{d.path}: a Secure Boot descriptor without an NVRAM template")
        if keys == "ms":
            return SecureBootPair(d, d.vars_template, None, None)
        stem = re.sub(r"\.ms$", "", d.vars_template.stem)
        template = d.vars_template.with_name(f"{stem}.snakeoil{d.vars_template.suffix}")
        pkg = "ovmf" if self.arch == "x86_64" else "qemu-efi-aarch64"
        key = self.prefix / "usr/share" / pkg / "PkKek-1-snakeoil.key"
        cert = key.with_suffix(".pem")
        missing = [str(p) for p in (template, key, cert) if not p.is_file()]
        if missing:
            raise FirmwareError(f"{self.key}: Secure Boot with the snakeoil key needs {', '.join(missing)}, "
                                f"which the package does not ship (use keys='ms' with an image signed for it)")  # fmt: skip
        return SecureBootPair(d, template, key, cert, b"snakeoil")

    def variant(self, size: str, secure_boot: bool = False) -> FirmwareDescriptor:
        """The ``"4m"`` or ``"2m"`` flash pair (2m exists in 2020.11 and 2022.11 only)."""
        sizes = {"4m": 4 * MiB, "2m": 2 * MiB}
        if size.lower() not in sizes:
            raise FirmwareError(f"unknown flash variant {size!r}; expected one of {sorted(sizes)}")
        return self.select(secure_boot=secure_boot, flash_size=sizes[size.lower()])

    @property
    def default(self) -> FirmwareDescriptor:
        """The split-flash descriptor without Secure Boot for q35 (60-edk2-x86_64.json;
        for aarch64, virt and 60-edk2-aarch64.json)."""
        return self.select()

    @property
    def code(self) -> Path:
        return self.default.code

    @property
    def vars_template(self) -> Path:
        return self.default.vars_template

    @property
    def flash_size(self) -> int:
        return self.default.flash_size

    def flash_layouts(self) -> frozenset[tuple[int, int]]:
        """Every (code size, vars size) pair this build's split descriptors form."""
        return frozenset(
            (d.code_size, d.vars_size)
            for d in self.candidates()
            if d.mode == "split" and d.nvram_template is not None
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "arch": self.arch,
            "package": self.package,
            "debian_version": self.debian_version,
            "prefix": str(self.prefix),
            "source": self.source,
        }
        try:
            d = self.default
            out.update(code=str(d.code), vars_template=str(d.vars_template),
                       flash_size=d.flash_size)  # fmt: skip
        except FirmwareError as exc:
            out.update(code=None, vars_template=None, flash_size=None, problem=str(exc))
        out["descriptors"] = [d.to_json() for d in self.candidates()]
        return out


def load_build(
    prefix: Path,
    *,
    version: str,
    arch: str = "x86_64",
    package: str = "ovmf",
    debian_version: str = "",
    source: str = "catalog",
) -> FirmwareBuild:
    """Read the build unpacked at ``prefix`` (descriptors and, if present, its manifest)."""
    if not (prefix / DESCRIPTOR_DIR).is_dir():
        raise FirmwareError(f"{prefix}: no {DESCRIPTOR_DIR} directory (not a firmware package?)")
    if not debian_version:
        debian_version = _debian_version(prefix, package)
    descs = load_descriptors(prefix, arch)
    if not descs:
        raise FirmwareError(
            f"{prefix / DESCRIPTOR_DIR}: no usable descriptor for {arch} (see the log for why)"
        )
    return FirmwareBuild(
        version=version,
        arch=arch,
        package=package,
        prefix=prefix,
        debian_version=debian_version,
        descriptors=descs,
        source=source,
        extra=_synthesize_2m(descs) + _synthesize_stateless(prefix, descs),
    )


def _debian_version(prefix: Path, package: str) -> str:
    from harness.inventory.provision import read_manifest

    manifest = read_manifest(prefix) or {}
    packages = manifest.get("packages")
    if isinstance(packages, dict) and isinstance(packages.get(package), str):
        return str(packages[package])
    changelog = prefix / "usr/share/doc" / package / "changelog.Debian.gz"
    try:
        with gzip.open(changelog, "rt", errors="replace") as fh:
            first = fh.readline()
    except OSError:
        return ""
    match = re.match(r"^\S+ \(([^)]+)\)", first)
    return match.group(1) if match else ""


# Builds registered in this process (a user's distro package), by version.
_REGISTERED: dict[str, FirmwareBuild] = {}


_LOADED: dict[str, tuple[int, int]] = {}  # registry path -> (mtime_ns, size) loaded


def load_registered() -> None:
    """Make the firmware registered for this run ($HARNESS_REGISTRY, written by
    :mod:`harness.inventory.registry`) known to this process, cheaply when the file did not change."""
    path = registry_path()
    if path is None:
        return
    stamp = file_stamp(path)
    if stamp is None or _LOADED.get(str(path)) == stamp:
        return
    for rec in read_registry(path)["firmware"]:
        if f"{rec['version']}/{rec['arch']}" not in _REGISTERED:
            register_firmware(Path(rec["path"]), version=rec["version"], arch=rec["arch"])
    _LOADED[str(path)] = stamp


def forget_registered(path: Path) -> None:
    """Drop the firmware loaded from the registry file ``path`` from this process."""
    for rec in registered_records(path, "firmware"):
        unregister_firmware(rec["version"], rec["arch"])
    _LOADED.pop(str(path), None)


def _load_registry() -> None:
    load_registered()


def get_firmware(version: str, arch: str = "x86_64") -> FirmwareBuild:
    """A firmware build by version (registered first, then the catalogue; provisions)."""
    _load_registry()
    for key in (f"{version}/{arch}",):
        if key in _REGISTERED:
            return _REGISTERED[key]
    from harness.inventory.provision import Provisioner

    cat = catalog.default()
    try:
        entry = cat.firmware_entry(version, arch)
    except UnknownVersionError as exc:
        available = [e.version for e in cat.firmware if e.arch == arch]
        available += [b.version for b in _REGISTERED.values() if b.arch == arch]
        raise UnknownVersionError("firmware", version, available) from exc
    prefix = Provisioner(cat).ensure_firmware(entry)
    return load_build(prefix, version=entry.version, arch=entry.arch, package=entry.package)


def all_firmware(arch: str | None = None) -> tuple[FirmwareBuild, ...]:
    """Every catalogue build (provisioned if needed; inside
    :func:`harness.inventory.provision.no_provisioning` the provisioned ones only) and every
    registered one."""
    from harness.inventory.provision import NotProvisioned, provisioning_allowed

    _load_registry()
    cat = catalog.default()
    builds = []
    for e in cat.firmware:
        if arch is not None and e.arch != arch:
            continue
        try:
            builds.append(get_firmware(e.version, e.arch))
        except NotProvisioned:
            if provisioning_allowed():
                raise
    builds += [b for b in _REGISTERED.values() if arch is None or b.arch == arch]
    return tuple(builds)


def register_firmware(
    path: Path, *, version: str | None = None, arch: str = "x86_64"
) -> FirmwareBuild:
    """Make a user's firmware package usable: an unpacked package directory or a ``.deb``.

    A ``.deb`` is unpacked once into ``<cache>/builds/registered-...`` (content-addressed).
    The build is found afterwards by ``get_firmware(version)``; ``version`` defaults to the
    package's Debian version (``2022.11-6+deb12u2``), so it never shadows a catalogue one.
    """
    path = Path(path).expanduser().resolve()
    if path.is_file() and path.suffix == ".deb":
        prefix, package, debver = _unpack_deb(path)
    elif path.is_dir():
        prefix, package = path, "ovmf"
        manifest_pkgs = _manifest_packages(path)
        if len(manifest_pkgs) == 1:
            package = next(iter(manifest_pkgs))
        debver = _debian_version(path, package)
    else:
        raise FirmwareError(f"{path}: neither a .deb file nor an unpacked package directory")
    name = version or debver
    if not name:
        raise FirmwareError(f"{path}: cannot tell its version; pass version=")
    build = load_build(prefix, version=name, arch=arch, package=package,
                       debian_version=debver, source=f"registered:{path}")  # fmt: skip
    _REGISTERED[f"{name}/{arch}"] = build
    log.info("registered firmware %s (%s) from %s", name, debver or "?", path)
    return build


def unregister_firmware(version: str, arch: str = "x86_64") -> None:
    """Forget a registered build (tests use it to stay independent)."""
    _REGISTERED.pop(f"{version}/{arch}", None)


def _manifest_packages(prefix: Path) -> dict[str, Any]:
    from harness.inventory.provision import read_manifest

    pkgs = (read_manifest(prefix) or {}).get("packages")
    return pkgs if isinstance(pkgs, dict) else {}


def _unpack_deb(deb: Path) -> tuple[Path, str, str]:
    from harness.inventory.provision import (
        deb_field,
        staging,
        unpack,
        verify_prefix,
        write_manifest,
    )
    from harness.paths import cache_root

    package = deb_field(deb, "Package")
    debver = deb_field(deb, "Version")
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9.+~-]", "_", f"{package}-{debver}")
    prefix = cache_root() / "builds" / f"registered-{safe}-{digest}"
    if verify_prefix(prefix) is None:
        return prefix, package, debver
    with staging(prefix) as tmp:
        unpack([deb], tmp)
        write_manifest(tmp, {"kind": "firmware", "registered": str(deb),
                             "packages": {package: debver}, "sha256": digest})  # fmt: skip
    return prefix, package, debver


# --- checks ----------------------------------------------------------------------------


def _fmt_layout(code: int, vars_: int) -> str:
    total = code + vars_
    size = f"{total // MiB} MiB" if total % MiB == 0 else f"{total} bytes"
    return f"code {code} + vars {vars_} = {size}"


def check_flash_pair(code: Path, vars: Path, build: FirmwareBuild | None = None) -> int:
    """Refuse, before launch, a vars file that does not fit the code image.

    The known layouts (code size, vars size) come from ``build``'s descriptor pairs, or,
    without a build, from every build whose images include ``code`` (else all builds).
    Returns the flash size (code + vars).  Raises :class:`VarstoreError` naming the vars
    file, the sizes found and the sizes expected.
    """
    try:
        code_size = code.stat().st_size
    except OSError as exc:
        raise FirmwareError(f"firmware code {code}: {exc.strerror}") from exc
    try:
        vars_size = vars.stat().st_size
    except OSError as exc:
        raise VarstoreError(vars, f"cannot use as pflash: {exc.strerror}") from exc
    if build is not None:
        layouts = build.flash_layouts()
        where = build.key
    else:
        layouts, where = _layouts_of_code(str(code), code_size, code.stat().st_mtime_ns)
    if (code_size, vars_size) in layouts:
        return code_size + vars_size
    fitting = sorted(v for c, v in layouts if c == code_size)
    known = "; ".join(_fmt_layout(c, v) for c, v in sorted(layouts))
    if fitting:
        expected = f"expected vars of {' or '.join(map(str, fitting))} bytes for this code"
    else:
        expected = f"the code size {code_size} is in no known layout"
    raise VarstoreError(
        vars,
        f"{vars_size} bytes does not fit code {code} ({code_size} bytes, flash would be "
        f"{code_size + vars_size} bytes); {expected} (layouts of {where}: {known})",
    )


@functools.lru_cache(maxsize=64)
def _layouts_of_code(code: str, size: int, mtime_ns: int) -> tuple[frozenset[tuple[int, int]], str]:
    """The flash layouts of the builds whose images include ``code`` (else of all builds),
    and their names; remembered per code file (size and mtime in the key): reading every
    build's descriptors took 12 ms, and every QEMU the harness spawns checks its pair."""
    builds = all_firmware()
    owners = [b for b in builds if any(_same(d.code, Path(code)) for d in b.candidates())]
    layouts = frozenset().union(*(b.flash_layouts() for b in (owners or builds)))
    return layouts, ", ".join(b.key for b in (owners or builds))


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False
