"""Fetching Debian packages and unpacking them into side-by-side prefixes.

The host's apt configuration is never touched: a private apt state (sources list, lists,
archive cache) lives under ``<cache>/apt``.  Its mirror is the one the host's own apt
sources name, so a local mirror configured on the host is respected.

A prefix is unpacked under a temporary name and renamed into place only when complete,
with a manifest recording every file's size; a prefix whose manifest is missing or whose
files do not match is treated as corrupt and provisioned again.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from harness.errors import ProvisionError
from harness.inventory.catalog import Catalog, FirmwareEntry, PackageRef, QemuEntry, Version
from harness.paths import cache_root, ensure_dir

log = logging.getLogger(__name__)

# Listing and diagnostic commands look, they never fetch: inside no_provisioning() a build
# that is absent raises NotProvisioned (naming the command that fetches it) instead.
_FETCH: contextvars.ContextVar[bool] = contextvars.ContextVar("harness_fetch", default=True)


class NotProvisioned(ProvisionError):
    """A build or source that is not in the cache, met where nothing may be fetched."""


@contextlib.contextmanager
def provisioning(allowed: bool) -> Iterator[None]:
    """For the duration, fetching (downloads, unpacking, image builds) is ``allowed`` or not;
    where it is not, an absent build or image raises :class:`NotProvisioned`."""
    token = _FETCH.set(allowed)
    try:
        yield
    finally:
        _FETCH.reset(token)


def no_provisioning() -> contextlib.AbstractContextManager[None]:
    """For the duration, nothing is downloaded, unpacked or built."""
    return provisioning(False)


def provisioning_allowed() -> bool:
    return _FETCH.get()

MANIFEST = "harness-prefix.json"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
LISTS_MAX_AGE = 7 * 24 * 3600.0


def host_mirror() -> str:
    """The Debian mirror the host's apt sources use (``HARNESS_DEBIAN_MIRROR`` overrides)."""
    env = os.environ.get("HARNESS_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    candidates = [Path("/etc/apt/sources.list")]
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        candidates += sorted(parts.glob("*.sources")) + sorted(parts.glob("*.list"))
    for path in candidates:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for match in re.finditer(r"(?m)^\s*URIs:\s*(\S+)", text):
            uri = match.group(1).rstrip("/")
            if uri.endswith("/debian"):
                return uri
        for match in re.finditer(r"(?m)^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s", text):
            uri = match.group(1).rstrip("/")
            if uri.endswith("/debian"):
                return uri
    raise ProvisionError(
        "cannot find a Debian mirror in /etc/apt/sources.list(.d); "
        "set HARNESS_DEBIAN_MIRROR to one"
    )


def upstream_version(debian_version: str) -> str:
    """``1:10.0.2+ds-2+deb13u1~bpo12+1`` -> ``10.0.2``."""
    text = debian_version.split(":", 1)[-1]
    return re.split(r"[+~-]", text, maxsplit=1)[0]


@dataclass
class AptArchive:
    """Debian's archive, reached through a private apt state under ``root``."""

    root: Path
    suites: tuple[str, ...]
    mirror: str = ""
    arch: str = "amd64"
    #: Resolve dependencies against an empty dpkg status (nothing installed), so that a
    #: package's whole closure, C library included, is downloaded: see :meth:`closure`.
    empty_status: bool = False

    def __post_init__(self) -> None:
        self._lock: FileLock | None = None
        if not self.mirror:
            self.mirror = host_mirror()
        with self.lock():
            ensure_dir(self.root / "lists" / "partial")
            ensure_dir(self.root / "cache" / "archives" / "partial")
            ensure_dir(self.root / "etc" / "preferences.d")
            if self.empty_status:
                status = self.root / "state" / "status"
                ensure_dir(status.parent)
                if not status.exists() or status.stat().st_size:
                    status.write_text("")

    @property
    def sources_file(self) -> Path:
        return self.root / "etc" / "sources.list"

    def _sources_text(self) -> str:
        opt = f"[signed-by={KEYRING} arch={self.arch}]"
        lines = []
        for suite in sorted(self.suites):
            lines.append(f"deb {opt} {self.mirror} {suite} main")
            lines.append(f"deb-src {opt} {self.mirror} {suite} main")
        return "\n".join(lines) + "\n"

    def _options(self) -> list[str]:
        return [
            "-o", f"Dir::Etc::SourceList={self.sources_file}",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::Etc::Preferences={self.root / 'etc' / 'preferences'}",
            "-o", f"Dir::Etc::PreferencesParts={self.root / 'etc' / 'preferences.d'}",
            "-o", f"Dir::State::Lists={self.root / 'lists'}",
            "-o", f"Dir::Cache={self.root / 'cache'}",
            "-o", f"APT::Architecture={self.arch}",
            "-o", "APT::Sandbox::User=root",
            "-o", "Debug::NoLocking=1",
            "-o", "Acquire::Retries=3",
        ] + ([
            "-o", f"Dir::State::status={self.root / 'state' / 'status'}",
            "-o", f"Dir::State::extended_states={self.root / 'state' / 'extended_states'}",
        ] if self.empty_status else [])  # fmt: skip

    def lock(self) -> FileLock:
        """The one lock of this package state, taken by every apt call on it (apt's own
        locking is off: it needs root).  Reentrant within this object."""
        if self._lock is None:
            ensure_dir(self.root)
            self._lock = FileLock(str(self.root / ".apt.lock"), timeout=3600)
        return self._lock

    def _run(self, tool: str, args: Sequence[str], cwd: Path | None = None) -> str:
        with self.lock():
            return self._run_locked(tool, args, cwd)

    def _run_locked(self, tool: str, args: Sequence[str], cwd: Path | None = None) -> str:
        cmd = [tool, *self._options(), *args]
        try:
            proc = subprocess.run(
                cmd, cwd=cwd, capture_output=True, text=True, timeout=900, check=False
            )
        except FileNotFoundError as exc:
            raise ProvisionError(f"{tool} not found; the harness needs Debian's apt") from exc
        except subprocess.TimeoutExpired as exc:
            raise ProvisionError(f"{' '.join(cmd)} timed out after 900 s") from exc
        if proc.returncode != 0:
            raise ProvisionError(
                f"{tool} {' '.join(args)} failed with exit code {proc.returncode}:\n"
                + (proc.stderr.strip() or proc.stdout.strip())[-2000:]
            )
        return proc.stdout

    def update(self, force: bool = False) -> None:
        """Refresh the private package lists when missing, stale or their sources changed."""
        with self.lock():
            self._update(force)

    def _update(self, force: bool) -> None:
        text = self._sources_text()
        stamp = self.root / "lists" / ".harness-updated"
        current = self.sources_file.read_text() if self.sources_file.exists() else ""
        fresh = (
            stamp.exists()
            and current == text
            and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE
        )
        if fresh and not force:
            return
        self.sources_file.write_text(text)
        log.info("apt-get update (private lists under %s)", self.root)
        self._run("apt-get", ["update"])
        stamp.touch()

    def candidate(self, ref: PackageRef) -> str:
        """The version ``ref`` resolves to in its suite."""
        out = self._run("apt-cache", ["show", "--no-all-versions", f"{ref.name}/{ref.suite}"])
        match = re.search(r"(?m)^Version:\s*(\S+)", out)
        if not match:
            raise ProvisionError(f"package {ref} not found in Debian's archive")
        return match.group(1)

    def download(self, refs: Iterable[PackageRef], dest: Path) -> list[Path]:
        """Download ``refs`` into ``dest`` (one apt call); returns the .deb files."""
        refs = list(refs)
        ensure_dir(dest)
        before = set(dest.glob("*.deb"))
        try:
            self._run("apt-get", ["download", *(str(r) for r in refs)], cwd=dest)
        except ProvisionError as exc:
            missing = re.findall(r"Unable to locate package (\S+)|Release '(\S+)'", str(exc))
            names = ", ".join(a or b for a, b in missing)
            hint = f" (not found: {names})" if names else ""
            raise ProvisionError(
                f"downloading {', '.join(map(str, refs))} failed{hint}: {exc}"
            ) from exc
        return sorted(set(dest.glob("*.deb")) - before) or sorted(dest.glob("*.deb"))

    def closure(self, refs: Iterable[PackageRef], target: str, dest: Path) -> list[Path]:
        """Download ``refs`` and everything they depend on (no recommends), as apt would
        install them with ``-t target`` on a system where nothing is installed yet; returns
        the .deb files.  Needs ``empty_status``."""
        if not self.empty_status:
            raise ProvisionError("closure(): this package state has the host's dpkg status")
        refs = list(refs)
        if dest.exists():
            shutil.rmtree(dest)
        ensure_dir(dest / "partial")
        try:
            self._run("apt-get", [
                "-o", f"Dir::Cache::archives={dest}", "install", "--download-only", "-y",
                "--no-install-recommends", "-t", target, *(r.name for r in refs),
            ])  # fmt: skip
        except ProvisionError as exc:
            shutil.rmtree(dest, ignore_errors=True)
            raise ProvisionError(
                f"resolving the dependencies of {', '.join(map(str, refs))} from "
                f"{', '.join(self.suites)} failed: {exc}"
            ) from exc
        shutil.rmtree(dest / "partial", ignore_errors=True)
        for lock in dest.glob("lock"):
            lock.unlink()
        return sorted(dest.glob("*.deb"))

    def source_tarball(self, source: str, suite: str, dest: Path) -> Path:
        """Download the upstream tarball of a source package (no .dsc: see BRIEF)."""
        ensure_dir(dest)
        found = sorted(dest.glob(f"{source}_*.orig.tar.*"))
        if found:
            return found[-1]
        self._run(
            "apt-get", ["source", "--download-only", "--tar-only", f"{source}/{suite}"], cwd=dest
        )
        found = sorted(dest.glob(f"{source}_*.orig.tar.*"))
        if not found:
            raise ProvisionError(f"apt-get source {source}/{suite} produced no orig tarball")
        return found[-1]


_TRIPLETS = {"x86_64": ("x86_64-linux-gnu", "ld-linux-x86-64.so.2"),
             "aarch64": ("aarch64-linux-gnu", "ld-linux-aarch64.so.1")}


def host_triplet() -> tuple[str, str]:
    """(multiarch triplet, loader name) of this host: the emulator binaries are host code."""
    return _TRIPLETS.get(os.uname().machine, _TRIPLETS["x86_64"])


def find_loader(prefix: Path) -> Path | None:
    """The dynamic loader a prefix brings with its own C library (libc6 unpacked), or None."""
    triplet, name = host_triplet()
    for rel in (f"usr/lib/{triplet}/{name}", f"lib/{triplet}/{name}", f"usr/lib64/{name}",
                f"lib64/{name}"):  # fmt: skip
        if (prefix / rel).exists():
            return prefix / rel
    return None


def deb_field(deb: Path, field: str) -> str:
    """One control field of a .deb (``Package``, ``Version``, ...)."""
    try:
        out = subprocess.run(
            ["dpkg-deb", "--field", str(deb), field],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise ProvisionError(f"{deb} is not a readable Debian package: {exc.stderr.strip()}") from exc
    return out.stdout.strip()


def unpack(debs: Iterable[Path], into: Path) -> None:
    """Unpack every .deb into ``into`` (no maintainer scripts run)."""
    for deb in debs:
        proc = subprocess.run(
            ["dpkg-deb", "-x", str(deb), str(into)], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise ProvisionError(f"unpacking {deb} failed: {proc.stderr.strip()}")


def _walk_sizes(root: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel == MANIFEST or path.is_symlink():
                continue
            sizes[rel] = path.stat().st_size
    return sizes


def write_manifest(prefix: Path, info: dict[str, object]) -> None:
    """Record what a prefix holds, with every regular file's size."""
    data = dict(info)
    data["files"] = _walk_sizes(prefix)
    data["created"] = time.time()
    (prefix / MANIFEST).write_text(json.dumps(data, indent=1, sort_keys=True))


def read_manifest(prefix: Path) -> dict[str, object] | None:
    """The manifest of a complete prefix, or None when absent or unreadable."""
    try:
        data = json.loads((prefix / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def verify_prefix(prefix: Path) -> str | None:
    """None when ``prefix`` is complete and intact, else what is wrong with it."""
    if not prefix.is_dir():
        return "absent"
    data = read_manifest(prefix)
    if data is None:
        return f"{prefix / MANIFEST} missing or unreadable"
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        return f"{prefix / MANIFEST} lists no files"
    for rel, size in files.items():
        path = prefix / rel
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if actual != size:
            return f"{path} has {actual} bytes, manifest says {size}"
    return None


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A temporary sibling of ``final`` that becomes ``final`` only on success."""
    ensure_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Provisioner:
    """Provisions the catalogue's builds under ``<cache>/builds``."""

    catalog: Catalog
    root: Path | None = None

    def __post_init__(self) -> None:
        self.root = self.root or cache_root()
        self._archive: AptArchive | None = None
        self._closure_archives: dict[tuple[str, ...], AptArchive] = {}

    @property
    def builds_dir(self) -> Path:
        assert self.root is not None
        return self.root / "builds"

    @property
    def debs_dir(self) -> Path:
        assert self.root is not None
        return self.root / "debs"

    def archive(self) -> AptArchive:
        """The private apt archive, its lists refreshed on first use."""
        if self._archive is None:
            assert self.root is not None
            self._archive = AptArchive(self.root / "apt", tuple(sorted(self.catalog.suites())))
            self._archive.update()
        return self._archive

    def closure_archive(self, suites: Sequence[str]) -> AptArchive:
        """A private package state of ``suites`` alone with an empty dpkg status, for
        builds that bring their whole closure (lists refreshed on first use)."""
        assert self.root is not None
        key = tuple(sorted(suites))
        cached = self._closure_archives.get(key)
        if cached is None:
            cached = AptArchive(self.root / ("apt-closure-" + "+".join(key)), key,
                                empty_status=True)  # fmt: skip
            cached.update()
            self._closure_archives[key] = cached
        return cached

    def lock(self) -> FileLock:
        assert self.root is not None
        ensure_dir(self.root)
        return FileLock(str(self.root / ".provision.lock"), timeout=3600)

    @staticmethod
    def _may_fetch(what: str, problem: str) -> None:
        if not _FETCH.get():
            raise NotProvisioned(f"{what} is not provisioned ({problem}); "
                                 "`harness provision` fetches it")  # fmt: skip

    def qemu_prefix(self, entry: QemuEntry) -> Path:
        return self.builds_dir / entry.key

    def firmware_prefix(self, entry: FirmwareEntry) -> Path:
        return self.builds_dir / entry.key

    def ensure_qemu(self, entry: QemuEntry) -> Path:
        """The prefix of a QEMU build, provisioned if absent or corrupt."""
        prefix = self.qemu_prefix(entry)
        problem = verify_prefix(prefix)
        if problem is None:
            return prefix
        self._may_fetch(f"QEMU {entry.version} ({entry.arch}, {entry.suite})", problem)
        with self.lock():
            problem = verify_prefix(prefix)
            if problem is None:
                return prefix
            log.info("provisioning QEMU %s (%s)", entry.version, problem)
            if entry.own_libc:
                archive = self.closure_archive(entry.closure)
                debs = archive.closure(entry.packages, entry.suite, self.debs_dir / entry.key)
            else:
                debs = self._fetch(entry.key, entry.packages + entry.libs)
            self._check_version(debs, entry.packages[0].name, entry.version, entry.suite)
            with staging(prefix) as tmp:
                unpack(debs, tmp)
                binary = tmp / entry.binary
                if not binary.is_file():
                    raise ProvisionError(
                        f"QEMU {entry.version}: {entry.binary} not in packages "
                        f"{', '.join(map(str, entry.packages))}"
                    )
                if entry.own_libc and find_loader(tmp) is None:
                    raise ProvisionError(
                        f"QEMU {entry.version} ({entry.suite}): the resolved closure has no "
                        "dynamic loader (libc6 missing)"
                    )
                write_manifest(
                    tmp,
                    {"kind": "qemu", "version": entry.version, "arch": entry.arch,
                     "own_libc": entry.own_libc, "closure": list(entry.closure),
                     "packages": {deb_field(d, "Package"): deb_field(d, "Version") for d in debs},
                     "debs": [str(d) for d in debs]},
                )  # fmt: skip
        return prefix

    def ensure_firmware(self, entry: FirmwareEntry) -> Path:
        """The prefix of a firmware build, provisioned if absent or corrupt."""
        prefix = self.firmware_prefix(entry)
        problem = verify_prefix(prefix)
        if problem is None:
            return prefix
        self._may_fetch(f"{entry.package} {entry.version} ({entry.arch}, {entry.suite})", problem)
        with self.lock():
            problem = verify_prefix(prefix)
            if problem is None:
                return prefix
            log.info("provisioning %s %s (%s)", entry.package, entry.version, problem)
            debs = self._fetch(entry.key, (PackageRef(entry.package, entry.suite),))
            self._check_version(debs, entry.package, entry.version, entry.suite)
            with staging(prefix) as tmp:
                unpack(debs, tmp)
                if not list((tmp / "usr/share/qemu/firmware").glob("*.json")):
                    raise ProvisionError(
                        f"{entry.package}/{entry.suite} ships no QEMU firmware descriptors"
                    )
                write_manifest(
                    tmp,
                    {"kind": "firmware", "version": entry.version, "arch": entry.arch,
                     "packages": {deb_field(d, "Package"): deb_field(d, "Version") for d in debs},
                     "debs": [str(d) for d in debs]},
                )  # fmt: skip
        return prefix

    def ensure_python_source(self) -> Path:
        """QEMU's ``python/`` directory, extracted from the Debian source tarball."""
        assert self.root is not None
        src = self.catalog.python
        dest = self.root / "src" / f"{src.source}-{src.suite}-python"
        problem = verify_prefix(dest)
        if problem is None:
            return dest
        self._may_fetch(f"QEMU's python/ tree ({src.source}/{src.suite})", problem)
        with self.lock():
            if verify_prefix(dest) is None:
                return dest
            tarball = self.archive().source_tarball(src.source, src.suite, self.root / "src")
            with staging(dest) as tmp:
                proc = subprocess.run(
                    ["tar", "-xf", str(tarball), "-C", str(tmp), "--strip-components=1",
                     "--wildcards", "*/python/*"],
                    capture_output=True, text=True, timeout=600,
                )  # fmt: skip
                if proc.returncode != 0 or not (tmp / "python" / "setup.py").exists():
                    raise ProvisionError(
                        f"{tarball} has no python/ directory: {proc.stderr.strip()}"
                    )
                digest = hashlib.sha256(tarball.name.encode()).hexdigest()[:12]
                write_manifest(tmp, {"kind": "python", "tarball": tarball.name, "id": digest})
        return dest

    def _fetch(self, key: str, refs: Sequence[PackageRef]) -> list[Path]:
        dest = self.debs_dir / key
        if dest.exists():
            shutil.rmtree(dest)
        try:
            return self.archive().download(refs, dest)
        except ProvisionError:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    @staticmethod
    def _check_version(debs: Sequence[Path], package: str, version: str, suite: str = "") -> None:
        # Archive drift: a suite moves on (trixie-backports replaces 11.1.3 with 11.1.4).  An
        # entry is pinned to the version it names; a provisioned prefix keeps working from
        # the cache, and a new provisioning fails here naming both versions.  Never a silent
        # swap: the new version becomes a new catalogue entry (or the entry is updated).
        for deb in debs:
            if deb_field(deb, "Package") == package:
                debver = deb_field(deb, "Version")
                got = upstream_version(debver)
                if not Version.parse(got).matches(Version.parse(version)):
                    where = f" {suite}" if suite else ""
                    raise ProvisionError(
                        f"{package}: Debian's{where} now offers {got} ({debver}), the catalogue "
                        f"entry wants {version}; update or add the catalogue entry "
                        "(harness/data/qemu.toml or firmware/catalog.toml)"
                    )
                return
        raise ProvisionError(f"{package} missing from the downloaded packages")

    def ensure_all(self) -> dict[str, Path]:
        """Provision every catalogue build; returns key -> prefix."""
        out: dict[str, Path] = {}
        for q in self.catalog.qemu:
            out[q.key] = self.ensure_qemu(q)
        for f in self.catalog.firmware:
            out[f.key] = self.ensure_firmware(f)
        return out
