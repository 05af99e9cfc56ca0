"""QEMU built from source: a tree or a tarball, optionally patched, x86_64-softmmu only.

A source build is cached under ``<cache>/source-builds/<hash>/`` where the hash covers the
source (tarball bytes or every file of a tree), the patches (their bytes, in order) and the
configure arguments; a second ``build-qemu`` with the same inputs does no work.  Layout::

    <hash>/src/        the unpacked (or copied) source, patches applied
    <hash>/build/      the out-of-tree build; build/qemu-system-x86_64 is the emulator
    <hash>/build.log   configure + make output
    <hash>/build.json  written last: inputs, label, timings (its presence = complete)

Host build dependencies are Debian packages (:data:`BUILD_DEPS`), installed through apt by
:func:`install_build_deps` (``harness build-qemu`` does it, as does ``make build-deps``).
QEMU >= 9.1 needs Meson >= 1.5 while Debian 12 ships 1.0; Debian's ``+ds`` tarball drops the
vendored wheel, so Meson comes from a small tools virtualenv (pip, PyPI) that configure's own
``pyvenv`` then nests.  The built tree has no SeaBIOS/iPXE blobs (DFSG-stripped), so the
registered build falls back to the data directories of the matching catalogue prefix (what
Debian's packages do by depending on seabios and ipxe-qemu).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from harness.errors import ConfigError, HostError, ProvisionError
from harness.paths import cache_root, ensure_dir

log = logging.getLogger(__name__)

#: Debian packages a QEMU x86_64-softmmu build needs on Debian 12.
BUILD_DEPS: tuple[str, ...] = (
    "gcc", "make", "ninja-build", "pkg-config", "python3-venv", "flex", "bison", "patch",
    "libglib2.0-dev", "libpixman-1-dev", "libslirp-dev", "zlib1g-dev", "libfdt-dev",
    "xz-utils",
)  # fmt: skip

#: Python packages for the tools venv (configure accepts meson >= 1.5.0 for QEMU 10.0).
TOOLS_REQUIREMENTS: tuple[str, ...] = ("meson==1.5.0", "pycotap==1.3.1")

#: Minimal feature set: one target, no docs, warnings not fatal, user networking on.
DEFAULT_CONFIGURE_ARGS: tuple[str, ...] = (
    "--target-list=x86_64-softmmu", "--disable-docs", "--disable-werror", "--enable-slirp",
    "--disable-download", "--disable-gtk", "--disable-sdl", "--disable-opengl",
    "--disable-install-blobs",
)  # fmt: skip

BUILD_FORMAT = 2  # bump when the layout or the hashed inputs change
CONFIGURE_TIMEOUT_S = 900.0
MAKE_TIMEOUT_S = 4 * 3600.0
APT_TIMEOUT_S = 1800.0
_SKIP_DIRS = {".git", "build", "__pycache__"}


@dataclass(frozen=True)
class SourceBuild:
    """A completed source build."""

    key: str
    root: Path
    label: str
    version: str
    source: str
    patches: tuple[str, ...]
    configure_args: tuple[str, ...]
    configure_s: float
    build_s: float

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def binary(self) -> Path:
        return self.build_dir / "qemu-system-x86_64"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BUILD_FORMAT, "key": self.key, "root": str(self.root),
            "label": self.label, "version": self.version, "source": self.source,
            "patches": list(self.patches), "configure_args": list(self.configure_args),
            "configure_s": self.configure_s, "build_s": self.build_s,
            "binary": str(self.binary),
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SourceBuild:
        return cls(
            key=str(data["key"]), root=Path(data["root"]), label=str(data["label"]),
            version=str(data["version"]), source=str(data["source"]),
            patches=tuple(data["patches"]), configure_args=tuple(data["configure_args"]),
            configure_s=float(data["configure_s"]), build_s=float(data["build_s"]),
        )  # fmt: skip


# --- inputs ------------------------------------------------------------------------------


def _hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def hash_source(src: Path) -> str:
    """sha256 of a tarball's bytes, or of a tree's relative paths, modes and contents."""
    h = hashlib.sha256()
    if src.is_file():
        h.update(b"tarball\0")
        _hash_file(h, src)
        return h.hexdigest()
    if not src.is_dir():
        raise ConfigError(f"source {src} is neither a tarball nor a directory")
    h.update(b"tree\0")
    for dirpath, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            path = Path(dirpath) / name
            rel = path.relative_to(src).as_posix()
            h.update(rel.encode() + b"\0")
            if path.is_symlink():
                h.update(b"link\0" + os.readlink(path).encode() + b"\0")
            else:
                h.update(b"x" if os.access(path, os.X_OK) else b"-")
                _hash_file(h, path)
    return h.hexdigest()


def build_key(source_hash: str, patches: Sequence[Path], configure_args: Sequence[str]) -> str:
    """The cache key of a build: source + patches (in order) + configure arguments."""
    h = hashlib.sha256(f"format {BUILD_FORMAT}\0source {source_hash}\0".encode())
    for patch in patches:
        ph = hashlib.sha256()
        _hash_file(ph, patch)
        h.update(f"patch {ph.hexdigest()}\0".encode())
    for arg in configure_args:
        h.update(f"arg {arg}\0".encode())
    return h.hexdigest()


def configure_args(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The default arguments plus ``extra``; a target list other than x86_64-softmmu is refused."""
    extra = tuple(extra)
    for arg in extra:
        if arg.startswith("--target-list") and arg != "--target-list=x86_64-softmmu":
            raise ConfigError(f"{arg}: only --target-list=x86_64-softmmu is supported")
    return DEFAULT_CONFIGURE_ARGS + tuple(a for a in extra if a not in DEFAULT_CONFIGURE_ARGS)


def label_for(version: str, key: str) -> str:
    """The registered label: ``src:10.0.2+1a2b3c4d``."""
    return f"src:{version}+{key[:8]}"


def builds_root() -> Path:
    return cache_root() / "source-builds"


# --- host dependencies -------------------------------------------------------------------


def missing_build_deps(packages: Iterable[str] = BUILD_DEPS) -> list[str]:
    """The packages of ``packages`` dpkg does not report as installed."""
    missing = []
    for pkg in packages:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0 or not proc.stdout.startswith("install ok installed"):
            missing.append(pkg)
    return missing


def install_build_deps(packages: Iterable[str] = BUILD_DEPS) -> list[str]:
    """Install the missing build dependencies through apt; returns what was installed."""
    missing = missing_build_deps(packages)
    if not missing:
        return []
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            raise HostError(
                "QEMU build dependencies missing and not root (no sudo): "
                f"apt-get install {' '.join(missing)}"
            )
        prefix = [sudo, "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("installing build dependencies: %s", " ".join(missing))
    for cmd in (
        prefix + ["apt-get", "update", "-qq"],
        prefix + ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise HostError(f"{' '.join(cmd)} timed out after {APT_TIMEOUT_S:.0f} s") from exc
        if proc.returncode != 0:
            raise HostError(
                f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
            )
    still = missing_build_deps(missing)
    if still:
        raise HostError(f"apt-get install did not install: {' '.join(still)}")
    return missing


def tools_python() -> Path:
    """A virtualenv holding :data:`TOOLS_REQUIREMENTS` (Meson), created once; its python."""
    venv = cache_root() / "source-builds" / "tools-venv"
    stamp = venv / ".requirements"
    wanted = "\n".join(TOOLS_REQUIREMENTS)
    py = venv / "bin" / "python3"
    if py.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return py
    ensure_dir(venv.parent)
    for cmd in (
        ["python3", "-m", "venv", "--clear", str(venv)],
        [str(py), "-m", "pip", "install", "-q", *TOOLS_REQUIREMENTS],
    ):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as exc:
            raise HostError(f"{' '.join(cmd)} timed out") from exc
        if proc.returncode != 0:
            raise HostError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    stamp.write_text(wanted)
    return py


# --- building ----------------------------------------------------------------------------


def _unpack_source(src: Path, dest: Path) -> None:
    """Put the source in ``dest``: a tarball's single top directory, or a copy of a tree."""
    if src.is_dir():
        shutil.copytree(src, dest, symlinks=True,
                        ignore=shutil.ignore_patterns(*_SKIP_DIRS))  # fmt: skip
        return
    tmp = dest.parent / ".unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    ensure_dir(tmp)
    # GNU tar (xz, gz, bz2, zst by suffix) is several times faster than tarfile on xz
    try:
        proc = subprocess.run(["tar", "-xf", str(src), "-C", str(tmp), "--no-same-owner"],
                              capture_output=True, text=True, timeout=1800)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise ProvisionError(f"unpacking {src} timed out") from exc
    if proc.returncode != 0:
        raise ProvisionError(f"cannot unpack source tarball {src}: tar exited "
                             f"{proc.returncode}: {proc.stderr.strip()[-500:]}")  # fmt: skip
    tops = sorted(p.name for p in tmp.iterdir())
    if len(tops) != 1 or not (tmp / tops[0]).is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ProvisionError(f"{src}: expected one top-level directory, found {tops[:5]}")
    (tmp / tops[0]).rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)


_EDK2_GUARD = "if unpack_edk2_blobs\n"


def apply_fixups(tree: Path) -> list[str]:
    """Adapt a DFSG-stripped tree (Debian's ``+ds`` tarball) so it configures; returns notes.

    The tarball drops ``pc-bios/edk2-*.fd.bz2`` but ``pc-bios/meson.build`` still unpacks
    them whenever bzip2 exists; the unpack is skipped when the blobs are absent (OVMF comes
    from the firmware builds anyway).
    """
    notes: list[str] = []
    meson_build = tree / "pc-bios" / "meson.build"
    if (tree / "pc-bios" / "edk2-x86_64-code.fd.bz2").exists() or not meson_build.is_file():
        return notes
    text = meson_build.read_text()
    if _EDK2_GUARD in text:
        meson_build.write_text(text.replace(
            _EDK2_GUARD, "if unpack_edk2_blobs and fs.exists('edk2-x86_64-code.fd.bz2')\n", 1))
        notes.append("pc-bios/meson.build: edk2 blob unpack skipped (blobs absent: DFSG tarball)")
    return notes


def source_version(tree: Path) -> str:
    """The upstream version in the tree's ``VERSION`` file."""
    try:
        text = (tree / "VERSION").read_text().strip()
    except OSError as exc:
        raise ProvisionError(f"{tree} has no VERSION file: is it a QEMU source tree?") from exc
    if not re.match(r"^\d+\.\d+\.\d+", text):
        raise ProvisionError(f"{tree / 'VERSION'}: unexpected content {text[:40]!r}")
    return text


def _run_logged(cmd: Sequence[str], cwd: Path, logfile: Path, timeout: float, what: str,
                env: dict[str, str] | None = None) -> None:
    with logfile.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}  (cwd {cwd})\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout, env=env)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise ProvisionError(f"{what} timed out after {timeout:.0f} s; log: {logfile}") from exc
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-25:]
        raise ProvisionError(
            f"{what} exited {proc.returncode}: {' '.join(cmd)}\nlog: {logfile}\n  "
            + "\n  ".join(tail)
        )


def find_cached(key: str) -> SourceBuild | None:
    """The completed build with cache key ``key``, or None."""
    meta = builds_root() / key / "build.json"
    try:
        build = SourceBuild.from_json(json.loads(meta.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return build if build.binary.is_file() else None


def cached_builds() -> list[SourceBuild]:
    """Every completed source build in the cache."""
    root = builds_root()
    if not root.is_dir():
        return []
    found = [find_cached(p.name) for p in sorted(root.iterdir()) if p.is_dir()]
    return [b for b in found if b is not None]


def build_qemu(
    src: Path,
    patches: Sequence[Path] = (),
    extra_configure_args: Iterable[str] = (),
    *,
    install_deps: bool = True,
    jobs: int | None = None,
) -> SourceBuild:
    """Build (or find cached) QEMU x86_64-softmmu from ``src`` with ``patches`` applied."""
    src = Path(src).expanduser().resolve()
    patch_paths = [Path(p).expanduser().resolve() for p in patches]
    for p in patch_paths:
        if not p.is_file():
            raise ConfigError(f"patch {p} does not exist")
    args = configure_args(extra_configure_args)
    key = build_key(hash_source(src), patch_paths, args)
    cached = find_cached(key)
    if cached is not None:
        log.info("source build %s cached at %s", cached.label, cached.root)
        return cached
    if install_deps:
        install_build_deps()
    else:
        missing = missing_build_deps()
        if missing:
            raise HostError(f"QEMU build dependencies missing: {' '.join(missing)} "
                            "(run `make build-deps`)")  # fmt: skip
    python = tools_python()
    root = ensure_dir(builds_root())
    with FileLock(str(root / f".{key}.lock"), timeout=MAKE_TIMEOUT_S):
        cached = find_cached(key)
        if cached is not None:
            return cached
        return _build(src, patch_paths, args, key, python, jobs or os.cpu_count() or 1)


def _build(src: Path, patches: Sequence[Path], args: Sequence[str], key: str,
           python: Path, jobs: int) -> SourceBuild:
    root = builds_root() / key
    shutil.rmtree(root, ignore_errors=True)  # an earlier incomplete attempt
    ensure_dir(root)
    logfile = root / "build.log"
    tree = root / "src"
    _unpack_source(src, tree)
    for patch in patches:
        _run_logged(["patch", "-p1", "--batch", "--forward", "-i", str(patch)], tree, logfile,
                    120, f"applying {patch}")  # fmt: skip
    for note in apply_fixups(tree):
        log.info("fixup: %s", note)
        with logfile.open("a") as out:
            out.write(f"harness fixup: {note}\n")
    version = source_version(tree)
    build_dir = ensure_dir(root / "build")
    t0 = time.monotonic()
    _run_logged([str(tree / "configure"), f"--python={python}", *args], build_dir, logfile,
                CONFIGURE_TIMEOUT_S, "configure")  # fmt: skip
    t1 = time.monotonic()
    _run_logged(["make", f"-j{jobs}"], build_dir, logfile, MAKE_TIMEOUT_S, "make")
    t2 = time.monotonic()
    build = SourceBuild(
        key=key, root=root, label=label_for(version, key), version=version, source=str(src),
        patches=tuple(str(p) for p in patches), configure_args=tuple(args),
        configure_s=round(t1 - t0, 1), build_s=round(t2 - t1, 1),
    )  # fmt: skip
    if not build.binary.is_file():
        raise ProvisionError(f"make finished but {build.binary} is missing; log: {logfile}")
    tmp = root / "build.json.tmp"
    tmp.write_text(json.dumps(build.to_json(), indent=2) + "\n")
    tmp.replace(root / "build.json")
    log.info("built %s in %.0f s (configure %.0f s)", build.label, build.build_s, build.configure_s)
    return build
