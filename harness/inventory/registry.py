"""User builds registered for a run, visible to every process of that run.

People validating distro packages hand the harness ``.deb`` files (``--qemu-deb``,
``--ovmf-deb``) or a directory (``--qemu-dir``); people chasing a bug hand it a source build.
This module turns each into a :class:`~harness.inventory.builds.QemuBuild` or
:class:`~harness.inventory.firmware.FirmwareBuild` and records it in a small JSON *registry file*.  The
file's path travels in ``$HARNESS_REGISTRY``, so pytest-xdist workers and other subprocesses
see the same builds: :func:`harness.inventory.builds.get_build` / ``all_builds`` and
:func:`harness.inventory.firmware.get_firmware` / ``all_firmware`` call :func:`load` first.

QEMU ``.deb`` files are unpacked once into a content-addressed prefix under
``<cache>/builds/registered-qemu-...``.  A distro's QEMU package needs libraries Debian 12
may lack (``libcapstone4``, ``liburing2``, ...); when the given packages do not bring them,
the library directories of the catalogue prefix of the same QEMU version are reused; when
that is not enough either, :class:`~harness.errors.ProvisionError` names the missing sonames.
A package built for a newer C library than the host's (trixie's, forky's) gets its whole
closure resolved from the suite that has exactly that package version (the catalogue's
closure suites are asked in turn) and runs through the prefix's own loader, like the
catalogue's own-libc builds; when no such suite has it, the error names the version and the
suites asked.

Source builds (``harness build-qemu``) are found by their label ``src:VERSION+HASH8`` from
the source-build cache, registry file or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, ProvisionError
from harness.inventory import builds as builds_mod
from harness.inventory import catalog as catalog_mod
from harness.inventory import firmware as fw_mod
from harness.inventory.builds import QemuBuild
from harness.paths import (
    REGISTRY_ENV,
    REGISTRY_FORMAT,
    cache_root,
    ensure_dir,
    file_sha256,
    read_registry,
    registry_path,
)

log = logging.getLogger(__name__)

ENV_VAR = REGISTRY_ENV
FORMAT = REGISTRY_FORMAT
#: The packages of a QEMU build; the system emulator's own package must be among the debs.
QEMU_PACKAGE = "qemu-system-x86"


@dataclass
class Registration:
    """What :func:`register_from_options` registered, and where the registry file is."""

    path: Path
    qemu: list[str] = field(default_factory=list)
    firmware: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"registry": str(self.path), "qemu": self.qemu, "firmware": self.firmware}


# --- the registry file: written here, read by builds and firmware ----------------------

# what builds and firmware read from it, re-exported for callers of this module
qemu_record = builds_mod.qemu_record
qemu_from_record = builds_mod.qemu_from_record
catalog_entry_for = builds_mod.catalog_entry_for
from_source_build = builds_mod.from_source_build
source_build = builds_mod.source_build


def load(wanted: str | None = None) -> None:
    """Make this run's registered builds known to this process (cheap when unchanged);
    ``wanted``: a QEMU label being looked up (``src:...`` labels come from the source-build
    cache even without a registry file).  Lookups in builds and firmware do this too."""
    builds_mod.load_registered(wanted)
    fw_mod.load_registered()


def forget(path: Path) -> None:
    """Drop what was loaded from ``path`` from this process (tests stay independent)."""
    builds_mod.forget_registered(path)
    fw_mod.forget_registered(path)


# -------------------------------------------------------------------


def _write(path: Path, data: dict[str, Any]) -> None:
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def record(path: Path, *, qemu: Iterable[QemuBuild] = (),
           firmware: Iterable[dict[str, str]] = ()) -> None:  # fmt: skip
    """Add builds to the registry file at ``path`` (a later record of a label replaces it)."""
    from filelock import FileLock

    ensure_dir(path.parent)
    with FileLock(str(path) + ".lock", timeout=60):
        data = read_registry(path)
        by_label = {r["label"]: r for r in data["qemu"]}
        for b in qemu:
            by_label[b.label] = qemu_record(b)
        data["qemu"] = list(by_label.values())
        by_version = {(r["version"], r["arch"]): r for r in data["firmware"]}
        for fw in firmware:
            by_version[(fw["version"], fw["arch"])] = dict(fw)
        data["firmware"] = list(by_version.values())
        _write(path, data)


# --- shared libraries ----------------------------------------------------------------------


_NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.MULTILINE)
_LIBC_TOO_OLD = re.compile(r"version `(GLIBC_[\d.]+)' not found")


def needs_newer_libc(binary: Path, libdirs: Sequence[Path] = ()) -> list[str]:
    """The glibc symbol versions ``binary`` needs that the host's C library lacks."""
    env = dict(os.environ)
    if libdirs:
        env["LD_LIBRARY_PATH"] = ":".join(str(d) for d in libdirs)
    try:
        proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                              env=env, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"ldd {binary} failed: {exc}") from exc
    return sorted(set(_LIBC_TOO_OLD.findall(proc.stdout + proc.stderr)))


def missing_sonames(binary: Path, libdirs: Sequence[Path]) -> list[str]:
    """The sonames ``binary`` needs that the loader cannot find with ``libdirs`` first."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([str(d) for d in libdirs]
                                      + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))  # fmt: skip
    try:
        proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                              env=env, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProvisionError(f"ldd {binary} failed: {exc}") from exc
    if proc.returncode != 0 and "not a dynamic executable" not in proc.stdout + proc.stderr:
        raise ProvisionError(f"ldd {binary} exited {proc.returncode}: {proc.stderr.strip()}")
    return sorted(set(_NOT_FOUND.findall(proc.stdout)))


def with_library_fallback(build: QemuBuild, version: str) -> QemuBuild:
    """``build``, plus the catalogue prefix's library dirs if the loader needs them.

    Raises :class:`ProvisionError` naming the sonames still missing.
    """
    missing = missing_sonames(build.binary, build.libdirs)
    if not missing:
        return build
    entry = catalog_entry_for(version, build.arch)
    if entry is None:
        raise ProvisionError(
            f"{build.binary} needs {', '.join(missing)}, which this host lacks, and no "
            f"catalogue QEMU entry matches version {version} to borrow them from; pass the "
            "library .debs too (e.g. --qemu-deb libfoo.deb)"
        )
    ref = builds_mod.from_catalog(entry)
    libdirs = tuple(build.libdirs) + tuple(d for d in ref.libdirs if d not in build.libdirs)
    still = missing_sonames(build.binary, libdirs)
    if still:
        raise ProvisionError(
            f"{build.binary} needs {', '.join(still)}: neither the given packages, the host nor "
            f"the catalogue {entry.version} prefix ({ref.prefix}) provide them; pass the "
            "library .debs too"
        )
    log.info("%s borrows %s from the catalogue %s prefix", build.label, ", ".join(missing),
             entry.version)  # fmt: skip
    return QemuBuild(build.label, build.arch, build.binary, build.datadirs, libdirs,
                     build.source, build.prefix)  # fmt: skip


# --- QEMU from .deb files ------------------------------------------------------------------




def register_qemu_debs(debs: Sequence[Path], label: str | None = None,
                       arch: str = "x86_64") -> QemuBuild:  # fmt: skip
    """Unpack QEMU packages (qemu-system-x86, -common, -data, seabios, ipxe, libs) as a build.

    The label defaults to ``deb:<Debian version of qemu-system-x86>``.
    """
    from filelock import FileLock

    from harness.inventory.provision import deb_field, upstream_version, verify_prefix

    paths = [Path(d).expanduser().resolve() for d in debs]
    if not paths:
        raise ConfigError("no QEMU .deb files given")
    for p in paths:
        if not p.is_file() or p.suffix != ".deb":
            raise ConfigError(f"{p}: not a .deb file")
    packages = {deb_field(p, "Package"): (p, deb_field(p, "Version")) for p in paths}
    if QEMU_PACKAGE not in packages:
        raise ConfigError(
            f"none of the given .debs is {QEMU_PACKAGE} (got {', '.join(sorted(packages))}); "
            "pass qemu-system-x86, qemu-system-common, qemu-system-data, seabios and ipxe-qemu"
        )
    debver = packages[QEMU_PACKAGE][1]
    version = upstream_version(debver)
    digest = hashlib.sha256("".join(sorted(file_sha256(p) for p in paths)).encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9.+~-]", "_", debver)
    prefix = cache_root() / "builds" / f"registered-qemu-{safe}-{digest}"
    ensure_dir(prefix.parent)
    # xdist workers may register the same packages at once: one unpacks, the others wait
    with FileLock(str(prefix) + ".lock", timeout=600):
        if verify_prefix(prefix) is not None:
            _unpack_qemu(paths, prefix, packages, version)
    default_label = f"deb:{debver.split(':', 1)[-1]}"  # without the epoch
    from harness.inventory.provision import read_manifest

    own_libc = bool((read_manifest(prefix) or {}).get("own_libc"))
    build = builds_mod.from_prefix(prefix, label or default_label, arch, f"deb:{debver}",
                                   own_libc=own_libc)  # fmt: skip
    if not build.binary.is_file():
        raise ProvisionError(f"{QEMU_PACKAGE} {debver} has no {build.binary.relative_to(prefix)}")
    return build if own_libc else with_library_fallback(build, version)


def _unpack_qemu(paths: Sequence[Path], prefix: Path, packages: dict[str, tuple[Path, str]],
                 version: str) -> None:
    from harness.inventory.provision import deb_field, staging, unpack, write_manifest

    with staging(prefix) as tmp:
        unpack(paths, tmp)
        binary: Path | None = tmp / "usr/bin/qemu-system-x86_64"
        if binary is None or not binary.is_file():
            binary = next(iter(sorted((tmp / "usr/bin").glob("qemu-system-*"))), None)
        closure: dict[str, str] = {}
        suites: tuple[str, ...] = ()
        own_libc = "libc6" in packages
        if binary is not None and not own_libc:
            too_new = needs_newer_libc(binary)
            if too_new:
                suites, debs = _resolve_closure(packages, too_new, binary)
                extra = [d for d in debs if deb_field(d, "Package") not in packages]
                unpack(extra, tmp)
                closure = {deb_field(d, "Package"): deb_field(d, "Version") for d in extra}
                own_libc = True
        write_manifest(tmp, {
            "kind": "qemu", "registered": [str(p) for p in paths],
            "packages": {k: v[1] for k, v in packages.items()}, "version": version,
            "own_libc": own_libc, "closure_suites": list(suites), "closure": closure,
        })  # fmt: skip


def _resolve_closure(packages: dict[str, tuple[Path, str]], too_new: Sequence[str],
                     binary: Path) -> tuple[tuple[str, ...], list[Path]]:
    """The suites whose archive has exactly the given QEMU package version, and the .debs
    of the packages' whole closure from there (C library included)."""
    from harness.inventory.catalog import PackageRef
    from harness.inventory.provision import Provisioner

    debver = packages[QEMU_PACKAGE][1]
    cat = catalog_mod.default()
    candidates = list(dict.fromkeys((e.closure, e.suite) for e in cat.qemu if e.closure))
    prov = Provisioner(cat)
    asked = []
    with prov.lock():
        for suites, target in candidates:
            archive = prov.closure_archive(suites)
            asked.append(target)
            try:
                have = archive.candidate(PackageRef(QEMU_PACKAGE, target))
            except ProvisionError:
                continue
            if have != debver:
                continue
            refs = [PackageRef(name, target) for name in sorted(packages)]
            dest = prov.debs_dir / f"registered-closure-{re.sub(r'[^A-Za-z0-9.+~-]', '_', debver)}"
            log.info("%s needs %s: resolving its closure from %s", binary.name,
                     ", ".join(too_new), "+".join(suites))  # fmt: skip
            return tuple(suites), archive.closure(refs, target, dest)
    raise ProvisionError(
        f"{binary} needs a newer C library than this host's ({', '.join(too_new)}), and none of "
        f"the suites asked ({', '.join(asked) or 'none: no catalogue entry has a closure'}) has "
        f"{QEMU_PACKAGE} {debver} to resolve its libraries from; pass the library .debs too "
        "(libc6 and the rest of the closure: apt-get install --download-only on that suite)"
    )


def register_qemu_dir(path: Path, label: str | None = None, arch: str = "x86_64") -> QemuBuild:
    """A QEMU build directory or a directory of unpacked packages (libraries checked; a
    directory that holds its own libc6 runs through its own loader)."""
    build = builds_mod.register(path, label=label, arch=arch)
    if build.loader is not None:
        return build
    too_new = needs_newer_libc(build.binary, build.libdirs)
    if too_new:
        raise ProvisionError(
            f"{build.binary} needs a newer C library than this host's ({', '.join(too_new)}): "
            "pass the package's .debs with --qemu-deb (their closure is resolved from their "
            "suite) or a directory that also holds the closure's libc6 unpacked"
        )
    version = _binary_version(build)
    return with_library_fallback(build, version) if version else build


def _binary_version(build: QemuBuild) -> str:
    """The upstream version a directory build claims (manifest, VERSION file), or ''."""
    from harness.inventory.provision import read_manifest

    if build.prefix is not None:
        man = read_manifest(build.prefix) or {}
        if isinstance(man.get("version"), str):
            return str(man["version"])
        pkgs = man.get("packages")
        if isinstance(pkgs, dict) and isinstance(pkgs.get(QEMU_PACKAGE), str):
            from harness.inventory.provision import upstream_version

            return upstream_version(pkgs[QEMU_PACKAGE])
    for cand in (build.binary.parent / "VERSION", build.binary.parent.parent / "VERSION"):
        if cand.is_file():
            return cand.read_text().strip()
    return ""


# --- source builds -----------------------------------------------------------------------


# --- what nightly calls ------------------------------------------------------------------


def default_registry_path() -> Path:
    return cache_root() / "registries" / f"registry-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"


def register_from_options(args: Any, path: Path | None = None) -> Registration:
    """Register ``args.qemu_deb`` (one build from all of them), ``args.qemu_dir`` (one build
    each) and ``args.ovmf_deb`` (one firmware build each) for this run.

    The registry file is ``path``, else ``$HARNESS_REGISTRY``, else a new file under
    ``<cache>/registries``; ``$HARNESS_REGISTRY`` is set to it so subprocesses (pytest and
    its xdist workers) see the same builds.
    """
    qemu_debs = [Path(p) for p in getattr(args, "qemu_deb", None) or []]
    qemu_dirs = [Path(p) for p in getattr(args, "qemu_dir", None) or []]
    ovmf_debs = [Path(p) for p in getattr(args, "ovmf_deb", None) or []]
    path = path or registry_path() or default_registry_path()
    path = path.expanduser().resolve()
    reg = Registration(path)
    qemu: list[QemuBuild] = []
    if qemu_debs:
        qemu.append(register_qemu_debs(qemu_debs))
    qemu += [register_qemu_dir(d) for d in qemu_dirs]
    firmware: list[dict[str, str]] = []
    for deb in ovmf_debs:
        fw = fw_mod.register_firmware(deb)
        firmware.append({"version": fw.version, "arch": fw.arch, "path": str(fw.prefix)})
        reg.firmware.append(fw.version)
    for b in qemu:
        builds_mod.add_registered(b)
        reg.qemu.append(b.label)
    record(path, qemu=qemu, firmware=firmware)
    os.environ[ENV_VAR] = str(path)
    load()
    return reg

