"""Guest images: building them from Debian packages and caching them by their inputs.

A recipe (``guests/recipes/<name>.toml``, data) names a Debian suite, the packages to
take files from, the kernel modules to ship and what else goes in; the agent
(``guests/agent/``) is the image's ``/init`` and ``agent`` command.  Building needs no
root and no mounts: the initramfs is a newc cpio written here, the UKI is the
systemd-boot stub with sections added by ``objcopy``, the ESP is made with
``mkfs.vfat -C`` + ``mtools`` and a payload disk with ``mke2fs -d``.

An image lives in ``<cache>/images/<name>-<inputs hash>/``; the hash covers the recipe
files, the agent files, this module, and the exact ``.deb`` files (and, for nested
images, the QEMU/OVMF builds and the L2 image) used.  It is built in a temporary sibling
and renamed into place with a manifest of file sizes (as provisioned prefixes are), so a
partial or corrupt entry is rebuilt instead of used.  A file lock per image serialises
builders (pytest-xdist workers).

The ``.deb`` set of a recipe is resolved once and kept under ``<cache>/images/debs/``;
``ensure_image(..., refresh=True)`` (``harness images build --refresh``) resolves it
again against the archive, and a new package version then changes the hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from filelock import FileLock

from harness.catalog import PackageRef
from harness.errors import CatalogError, ConfigError, ImageBuildError, ProvisionError
from harness.paths import GUESTS_DIR, cache_root, ensure_dir
from harness.provision import (
    AptArchive,
    deb_field,
    staging,
    unpack,
    verify_prefix,
    write_manifest,
)

log = logging.getLogger(__name__)

RECIPES_DIR = GUESTS_DIR / "recipes"
AGENT_DIR = GUESTS_DIR / "agent"
IMAGE_JSON = "image.json"
DEBS_JSON = "debs.json"
AGENT_PROTOCOL = 1
LOCK_TIMEOUT = 1800.0
TOOL_TIMEOUT = 600.0

# Output files inside an image directory.
ESP_IMG = "esp.img"
UKI = "uki.efi"
KERNEL = "vmlinuz"
INITRD = "initrd.img"
DATA_IMG = "data.img"
HOST_KEY_PUB = "host_key.pub"
HOST_KEY_DROPBEAR = "dropbear_host_key"
CLIENT_KEY = "client_key"
CLIENT_KEY_PUB = "client_key.pub"


# --- recipes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NestedPayload:
    """What a nested (L1) image carries for running L2."""

    qemu: str
    qemu_files: tuple[str, ...]
    firmware: str
    firmware_files: tuple[str, str]
    l2_image: str
    data_label: str


@dataclass(frozen=True)
class CrossTools:
    """Host-architecture packages that build an image for a foreign architecture: binutils
    that know the target's PE format and a user-mode emulator to run target binaries."""

    suite: str
    debs: tuple[str, ...]
    objcopy: str
    objdump: str
    emulator: str


@dataclass(frozen=True)
class Recipe:
    """A guest image recipe, merged with the recipe it extends."""

    name: str
    files: tuple[Path, ...]  # every recipe file it was read from (base first)
    arch: str
    deb_arch: str
    suite: str
    description: str
    cmdline: str
    kernel_meta: str
    debs: tuple[str, ...]
    busybox: str
    stub: str
    binaries: tuple[str, ...]
    boot_modules: tuple[str, ...]
    extra_modules: tuple[str, ...]
    hooks: tuple[str, ...]
    esp_size_mb: int
    nested: NestedPayload | None = None
    # Target layout; the defaults are x86_64's (recipes for other architectures set them).
    libdir: str = "lib/x86_64-linux-gnu"
    loader: str = "lib64/ld-linux-x86-64.so.2"
    boot_file: str = "BOOTX64.EFI"
    tools: CrossTools | None = None  # None: the host's own tools build the image


def list_images(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """Names of the recipes under ``guests/recipes``."""
    return sorted(p.stem for p in recipes_dir.glob("*.toml"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise CatalogError(path, "recipe file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CatalogError(path, f"not valid TOML: {exc}") from exc


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge, lists add up, scalars replace."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = _merge(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            out[key] = old + [v for v in value if v not in old]
        else:
            out[key] = value
    return out


def _get(path: Path, table: Mapping[str, Any], dotted: str, kind: type, default: Any = None) -> Any:
    value: Any = table
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            if default is not None:
                return default
            raise CatalogError(path, f"missing field {dotted!r}")
        value = value[part]
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise CatalogError(path, f"field {dotted!r} must be a list of strings")
        return tuple(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise CatalogError(path, f"field {dotted!r} must be {kind.__name__}")
    return value


def load_recipe(name: str, recipes_dir: Path = RECIPES_DIR) -> Recipe:
    """Read recipe ``name`` (and the chain of recipes it extends)."""
    chain: list[Path] = []
    data: dict[str, Any] = {}
    current: str | None = name
    while current is not None:
        path = recipes_dir / f"{current}.toml"
        if not path.is_file():
            if current == name:
                raise ConfigError(
                    f"no image recipe {name!r}; available: {', '.join(list_images(recipes_dir))}"
                )
            raise CatalogError(chain[-1], f"extends unknown recipe {current!r}")
        if path in chain:
            raise CatalogError(path, "recipes extend each other in a cycle")
        chain.append(path)
        table = _read_toml(path)
        data = _merge(table, data) if data else table
        parent = table.get("extends")
        if parent is not None and not isinstance(parent, str):
            raise CatalogError(path, "field 'extends' must be a recipe name")
        current = parent
    data.pop("extends", None)
    top = chain[0]
    nested = None
    if "nested" in data:
        fw_files = _get(top, data, "nested.firmware_files", list)
        if len(fw_files) != 2:
            raise CatalogError(top, "nested.firmware_files must be [CODE, VARS]")
        nested = NestedPayload(
            qemu=_get(top, data, "nested.qemu", str),
            qemu_files=_get(top, data, "nested.qemu_files", list),
            firmware=_get(top, data, "nested.firmware", str),
            firmware_files=(fw_files[0], fw_files[1]),
            l2_image=_get(top, data, "nested.l2_image", str),
            data_label=_get(top, data, "nested.data_label", str),
        )
        if nested.l2_image == name:
            raise CatalogError(top, "an image cannot be its own L2")
    esp_mb = _get(top, data, "esp.size_mb", int, default=0)
    if esp_mb < 0:
        raise CatalogError(top, "esp.size_mb must be >= 0")
    tools = None
    if "tools" in data:
        tools = CrossTools(
            suite=_get(top, data, "tools.suite", str),
            debs=_get(top, data, "tools.debs", list),
            objcopy=_get(top, data, "tools.objcopy", str),
            objdump=_get(top, data, "tools.objdump", str),
            emulator=_get(top, data, "tools.emulator", str),
        )
    layout = {
        "libdir": _get(top, data, "files.libdir", str, default=Recipe.libdir),
        "loader": _get(top, data, "files.loader", str, default=Recipe.loader),
        "boot_file": _get(top, data, "esp.boot_file", str, default=Recipe.boot_file),
    }
    for key, value in layout.items():
        if not re.match(r"^[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*$", value) or ".." in value:
            raise CatalogError(top, f"field {key!r} must be a relative path, got {value!r}")
    return Recipe(
        name=name,
        files=tuple(reversed(chain)),
        arch=_get(top, data, "arch", str),
        deb_arch=_get(top, data, "deb_arch", str),
        suite=_get(top, data, "suite", str),
        description=_get(top, data, "description", str, default=""),
        cmdline=_get(top, data, "cmdline", str),
        kernel_meta=_get(top, data, "kernel.meta", str),
        debs=_get(top, data, "packages.debs", list),
        busybox=_get(top, data, "files.busybox", str),
        stub=_get(top, data, "files.stub", str),
        binaries=_get(top, data, "files.binaries", list, default=()),
        boot_modules=_get(top, data, "modules.boot", list, default=()),
        extra_modules=_get(top, data, "modules.extra", list, default=()),
        hooks=_get(top, data, "agent.hooks", list, default=()),
        esp_size_mb=esp_mb,
        nested=nested,
        tools=tools,
        **layout,
    )


# --- the image -------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """A built guest image: the files a VM spec points at, and how to reach the guest."""

    name: str
    arch: str
    root: Path
    esp: Path  # raw ESP disk image (FAT, \\EFI\\BOOT\\BOOTX64.EFI = the UKI)
    uki: Path
    kernel: Path
    initrd: Path
    cmdline: str  # base kernel command line, also embedded in the UKI
    data_disk: Path | None  # second disk (nested-l1: QEMU + L2 payload), or None
    host_key: str  # pinned public host key line: "ssh-ed25519 AAAA..."
    client_key: Path  # OpenSSH-format private key for root (paramiko loads it)
    inputs_hash: str
    kernel_version: str = ""
    packages: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly description (``harness images show --json``)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "root": str(self.root),
            "esp": str(self.esp),
            "uki": str(self.uki),
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "cmdline": self.cmdline,
            "data_disk": str(self.data_disk) if self.data_disk else None,
            "host_key": self.host_key,
            "client_key": str(self.client_key),
            "inputs_hash": self.inputs_hash,
            "kernel_version": self.kernel_version,
            "packages": dict(self.packages),
        }


def images_dir() -> Path:
    """Where built images are cached."""
    return cache_root() / "images"


def read_image(root: Path) -> Image:
    """The :class:`Image` stored in a complete image directory."""
    try:
        meta = json.loads((root / IMAGE_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise ImageBuildError(f"{root / IMAGE_JSON} unreadable: {exc}") from exc
    data_disk = root / DATA_IMG if meta.get("data_disk") else None
    return Image(
        name=meta["name"],
        arch=meta["arch"],
        root=root,
        esp=root / ESP_IMG,
        uki=root / UKI,
        kernel=root / KERNEL,
        initrd=root / INITRD,
        cmdline=meta["cmdline"],
        data_disk=data_disk,
        host_key=meta["host_key"],
        client_key=root / CLIENT_KEY,
        inputs_hash=meta["inputs_hash"],
        kernel_version=meta.get("kernel_version", ""),
        packages=meta.get("packages", {}),
    )


def recipe_for(name: str, arch: str | None = None, recipes_dir: Path = RECIPES_DIR) -> Recipe:
    """Recipe ``name`` for ``arch`` (None: whatever arch it is for).

    When ``name`` is for another architecture, its variant ``<name>-<arch>`` (say
    ``minimal-aarch64``) is used if one exists, so specs say ``image="minimal"`` on
    every architecture."""
    recipe = load_recipe(name, recipes_dir)
    if arch is None or recipe.arch == arch:
        return recipe
    variant = f"{name}-{arch}"
    if (recipes_dir / f"{variant}.toml").is_file():
        found = load_recipe(variant, recipes_dir)
        if found.arch == arch:
            return found
        raise ConfigError(f"image recipe {variant!r} is for {found.arch}, not {arch}")
    raise ConfigError(
        f"image recipe {name!r} is for {recipe.arch}, not {arch}, and there is no "
        f"{variant!r} recipe"
    )


def ensure_image(name: str, arch: str | None = None, *, refresh: bool = False) -> Image:
    """The image ``name`` for ``arch``, built (under a file lock) when absent or stale.

    ``arch`` None takes the recipe as it is; another architecture than the recipe's
    takes its ``<name>-<arch>`` variant (:func:`recipe_for`).  Returns at once when a
    complete image with the same inputs is cached.  ``refresh`` re-resolves the recipe's
    packages against Debian's archive first.
    """
    return Builder(recipe_for(name, arch)).ensure(refresh=refresh)


# --- .deb sets -------------------------------------------------------------------------


@dataclass(frozen=True)
class DebSet:
    """The exact .deb files a recipe uses (resolved once, then reused)."""

    dir: Path
    kernel_package: str
    debs: Mapping[str, Mapping[str, Any]]  # file name -> package, version, sha256, size

    def paths(self) -> list[Path]:
        return [self.dir / name for name in sorted(self.debs)]

    def identity(self) -> list[str]:
        return [f"{n}:{d['sha256']}" for n, d in sorted(self.debs.items())]

    def versions(self) -> dict[str, str]:
        return {str(d["package"]): str(d["version"]) for d in self.debs.values()}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_debset(dest: Path) -> DebSet | None:
    """The deb set recorded in ``dest``, or None when missing or not intact."""
    try:
        data = json.loads((dest / DEBS_JSON).read_text())
        debs = data["debs"]
        for fname, info in debs.items():
            if (dest / fname).stat().st_size != info["size"]:
                return None
        return DebSet(dest, str(data["kernel_package"]), debs)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kernel_package_of(meta_depends: str) -> str:
    """``linux-image-6.1.0-50-amd64 (= 6.1.176-1)`` -> ``linux-image-6.1.0-50-amd64``."""
    for alternative in meta_depends.split(","):
        name = alternative.split("|")[0].strip().split(" ")[0]
        if name.startswith("linux-image-"):
            return name
    raise ImageBuildError(f"the kernel meta package depends on no linux-image-*: {meta_depends!r}")


def kernel_release_of(package: str) -> str:
    """``linux-image-6.1.0-50-amd64`` -> ``6.1.0-50-amd64``."""
    if not package.startswith("linux-image-"):
        raise ImageBuildError(f"{package!r} is not a linux-image-* package")
    return package[len("linux-image-") :]


# --- kernel modules --------------------------------------------------------------------


def normalize_module(name: str) -> str:
    return name.replace("-", "_")


def modinfo_fields(ko: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 kernel module's ``.modinfo`` section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise ImageBuildError("not a little-endian ELF64 kernel module")
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name = struct.unpack_from("<I", ko, base)[0]
        offset, size = struct.unpack_from("<QQ", ko, base + 0x18)
        return name, offset, size

    _n, str_off, _s = section(shstrndx)
    out: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = ko.index(b"\0", str_off + name_off)
        if ko[str_off + name_off : end] != b".modinfo":
            continue
        for item in ko[offset : offset + size].split(b"\0"):
            key, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                out.setdefault(key, []).append(value)
        return out
    raise ImageBuildError("kernel module has no .modinfo section")


def module_depends(ko: bytes) -> list[str]:
    """The modules a module needs loaded first (its ``depends=``)."""
    deps: list[str] = []
    for value in modinfo_fields(ko).get("depends", []):
        deps += [normalize_module(d) for d in value.split(",") if d]
    return deps


def load_order(wanted: Iterable[str], depends: Mapping[str, Sequence[str]]) -> list[str]:
    """Every module ``wanted`` needs, each after its dependencies (depth first, stable).

    Raises :class:`ImageBuildError` for an unknown module or a dependency cycle.
    """
    order: list[str] = []
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in path:
            raise ImageBuildError(f"module dependency cycle: {' -> '.join((*path, name))}")
        if name not in depends:
            via = f" (needed by {path[-1]})" if path else ""
            raise ImageBuildError(f"kernel module {name!r} not found in the kernel package{via}")
        for dep in depends[name]:
            visit(dep, (*path, name))
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(normalize_module(name), ())
    return order


@dataclass(frozen=True)
class ModuleIndex:
    """The loadable modules of an unpacked kernel package."""

    files: Mapping[str, Path]  # normalized name -> .ko / .ko.xz
    builtin: frozenset[str]

    @classmethod
    def scan(cls, moddir: Path) -> ModuleIndex:
        files: dict[str, Path] = {}
        for path in (moddir / "kernel").rglob("*.ko*"):
            stem = path.name.split(".ko")[0]
            files[normalize_module(stem)] = path
        builtin: set[str] = set()
        builtin_list = moddir / "modules.builtin"
        if builtin_list.is_file():
            for line in builtin_list.read_text().splitlines():
                builtin.add(normalize_module(Path(line.strip()).name.split(".ko")[0]))
        return cls(files, frozenset(builtin))

    def read(self, name: str) -> bytes:
        path = self.files[name]
        data = path.read_bytes()
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".ko"):
            return data
        raise ImageBuildError(f"{path}: unsupported module compression")

    def closure(self, wanted: Iterable[str]) -> tuple[list[str], dict[str, list[str]]]:
        """Load order of ``wanted`` (built-in ones dropped) and each module's depends."""
        wanted = [normalize_module(w) for w in wanted]
        depends: dict[str, list[str]] = {}
        pending = [w for w in wanted if w not in self.builtin]
        while pending:
            name = pending.pop()
            if name in depends:
                continue
            if name not in self.files:
                raise ImageBuildError(f"kernel module {name!r} not found in the kernel package")
            depends[name] = module_depends(self.read(name))
            pending += depends[name]
        return load_order([w for w in wanted if w not in self.builtin], depends), depends


# --- initramfs (newc cpio, written here: device nodes and owners need no root) ----------


class CpioWriter:
    """Writes a newc ("070701") cpio archive with root-owned entries and fixed times."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (
            self._ino,
            mode,
            0,
            0,
            nlink,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded)
        self._out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def add_tree(self, root: Path) -> None:
        """Every entry under ``root`` (sorted, so archives are reproducible)."""
        paths = sorted(root.rglob("*"), key=lambda p: str(p.relative_to(root)))
        for path in paths:
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                self._entry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
            elif stat.S_ISDIR(st.st_mode):
                self._entry(rel, stat.S_IFDIR | stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                self._entry(rel, stat.S_IFREG | stat.S_IMODE(st.st_mode), path.read_bytes())
            else:
                raise ImageBuildError(f"{path}: unsupported file type in the initramfs tree")

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> None:
        self._entry("TRAILER!!!", 0)


# --- tools -----------------------------------------------------------------------------


def make_esp(uki: Path, dest: Path, boot_file: str, size_mb: int) -> None:
    """A FAT ESP disk image holding ``uki`` as the removable-media boot file."""
    dest.unlink(missing_ok=True)
    run_tool(["mkfs.vfat", "-C", "-n", "HARNESS-ESP", dest, str(size_mb * 1024)])
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    run_tool(["mmd", "-i", dest, "::/EFI", "::/EFI/BOOT"], env=env)
    run_tool(["mcopy", "-i", dest, uki, f"::/EFI/BOOT/{boot_file}"], env=env)


#: The removable-media boot file per guest architecture (UEFI spec 3.5.1.1).
BOOT_FILES = {"x86_64": "BOOTX64.EFI", "aarch64": "BOOTAA64.EFI"}


def write_plain_key(key: Path, dest: Path, passphrase: bytes | None) -> None:
    """``key`` (PEM, perhaps encrypted) unencrypted at ``dest`` (mode 0600), for tools that
    would prompt for the passphrase."""
    from cryptography.hazmat.primitives import serialization

    try:
        pkey = serialization.load_pem_private_key(key.read_bytes(), password=passphrase)
    except (OSError, ValueError, TypeError) as exc:
        raise ImageBuildError(f"signing key {key}: cannot load it ({exc})") from exc
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))  # fmt: skip


def signed_esp(image: Image, key: Path, cert: Path, passphrase: bytes | None = None) -> Path:
    """``image``'s ESP with its UKI signed (sbsign) by ``key``/``cert``, for a Secure Boot
    varstore that enrolls that certificate; built once per image and certificate.  An
    encrypted key is decrypted with ``passphrase`` into the private work directory."""
    fp = hashlib.sha256(cert.read_bytes()).hexdigest()[:12]
    out = image.root / f"signed-{fp}"
    esp = out / ESP_IMG
    if esp.is_file():
        return esp
    with FileLock(str(out) + ".lock", timeout=LOCK_TIMEOUT):
        if esp.is_file():
            return esp
        work = Path(tempfile.mkdtemp(prefix=".signed-", dir=image.root))
        try:
            uki = work / UKI
            plain = work / "signing.key"
            write_plain_key(key, plain, passphrase)
            run_tool(["sbsign", "--key", plain, "--cert", cert, "--output", uki, image.uki])
            plain.unlink()
            size_mb = (image.esp.stat().st_size + (1 << 20) - 1) >> 20
            make_esp(uki, work / ESP_IMG, BOOT_FILES.get(image.arch, "BOOTX64.EFI"), size_mb)
            (work / "cert.pem").write_bytes(cert.read_bytes())
            shutil.rmtree(out, ignore_errors=True)  # a half-made one from a killed run
            os.replace(work, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return esp


def run_tool(
    cmd: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = TOOL_TIMEOUT,
) -> bytes:
    """Run a build tool; its failure becomes an :class:`ImageBuildError`."""
    argv = [str(c) for c in cmd]
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=dict(env) if env else None, input=stdin,
            capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{argv[0]} not found: install the host packages (`make host-packages`)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{' '.join(argv)} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(argv)} failed with exit code {proc.returncode}: "
            + proc.stderr.decode(errors="replace").strip()[-1500:]
        )
    return proc.stdout


def elf_needed(binary: Path) -> list[str]:
    """The DT_NEEDED sonames of an ELF file (``objdump -p``)."""
    out = run_tool(["objdump", "-p", binary]).decode()
    return re.findall(r"^\s*NEEDED\s+(\S+)", out, re.M)


def ldd_libraries(binary: Path, library_path: Sequence[Path]) -> dict[str, Path]:
    """soname -> file of every library ``binary`` loads, as the host's ldd resolves them
    with ``library_path`` first (the loader appears under its own file name)."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(p) for p in library_path))
    out = run_tool(["ldd", binary], env=env).decode()
    libs: dict[str, Path] = {}
    for line in out.splitlines():
        line = line.strip()
        match = re.match(r"^(\S+) => (/\S+) \(0x", line)
        if match:
            libs[match.group(1)] = Path(match.group(2))
            continue
        if "not found" in line:
            raise ImageBuildError(f"ldd {binary}: {line}")
        match = re.match(r"^(/\S+) \(0x", line)
        if match:
            loader = Path(match.group(1))
            libs[loader.name] = loader
    return libs


# --- the builder -----------------------------------------------------------------------


def _inside(root: Path, rel: str) -> Path:
    """``root/rel`` resolved with symlinks interpreted inside ``root`` (a chroot view)."""
    path = root
    parts = [p for p in rel.split("/") if p]
    hops = 0
    while parts:
        part = parts.pop(0)
        nxt = path / part
        if nxt.is_symlink():
            hops += 1
            if hops > 40:
                raise ImageBuildError(f"symlink loop under {root} at {rel}")
            target = os.readlink(nxt)
            if target.startswith("/"):
                path = root
            parts = [p for p in target.split("/") if p] + parts
        elif part == "..":
            path = path.parent if path != root else root
        else:
            path = nxt
    return path


@dataclass
class Builder:
    """Builds (or finds cached) one recipe's image."""

    recipe: Recipe

    @property
    def name(self) -> str:
        return self.recipe.name

    def lock(self) -> FileLock:
        ensure_dir(images_dir())
        return FileLock(str(images_dir() / f".{self.name}.lock"), timeout=LOCK_TIMEOUT)

    # inputs ---------------------------------------------------------------------------

    def debset(self, refresh: bool = False) -> DebSet:
        """The recipe's .deb files, downloaded (once) into the image cache."""
        r = self.recipe
        listing = json.dumps([r.suite, r.deb_arch, r.kernel_meta, sorted(r.debs)]).encode()
        # Keyed by the package listing alone: recipes with the same packages share them.
        dest = images_dir() / "debs" / hashlib.sha256(listing).hexdigest()[:16]
        found = None if refresh else _read_debset(dest)
        if found is not None:
            return found
        with FileLock(str(dest) + ".lock", timeout=LOCK_TIMEOUT):
            found = None if refresh else _read_debset(dest)
            if found is not None:
                return found
            return self._download(dest)

    def _download(self, dest: Path) -> DebSet:
        from harness import catalog
        from harness.provision import Provisioner

        r = self.recipe
        if r.suite not in catalog.default().suites():
            raise ConfigError(
                f"recipe {r.name}: suite {r.suite!r} is not one the catalogue provisions "
                f"({', '.join(sorted(catalog.default().suites()))})"
            )
        archive = Provisioner(catalog.default()).archive()
        if r.deb_arch != archive.arch:
            archive = self._foreign_archive(archive)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            meta = archive.download([PackageRef(r.kernel_meta, r.suite)], tmp / "meta")
            kpkg = kernel_package_of(deb_field(meta[0], "Depends"))
            refs = [PackageRef(kpkg, r.suite)] + [PackageRef(n, r.suite) for n in r.debs]
            debs = archive.download(refs, tmp)
        except ProvisionError as exc:
            raise ImageBuildError(f"recipe {r.name}: fetching packages failed: {exc}") from exc
        shutil.rmtree(tmp / "meta", ignore_errors=True)
        record = {
            d.name: {
                "package": deb_field(d, "Package"),
                "version": deb_field(d, "Version"),
                "sha256": _sha256_file(d),
                "size": d.stat().st_size,
            }
            for d in debs
        }
        (tmp / DEBS_JSON).write_text(json.dumps({"kernel_package": kpkg, "debs": record}, indent=1))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        log.info("image %s: resolved %d packages (kernel %s)", r.name, len(record), kpkg)
        return DebSet(dest, kpkg, record)

    def _foreign_archive(self, host: AptArchive) -> AptArchive:
        """The recipe's suite for its (non-host) Debian architecture: own private lists."""
        r = self.recipe
        archive = AptArchive(host.root.with_name(f"{host.root.name}-{r.deb_arch}"), (r.suite,),
                             mirror=host.mirror, arch=r.deb_arch)  # fmt: skip
        try:
            archive.update()
        except ProvisionError as exc:
            raise ImageBuildError(f"recipe {r.name}: apt lists for {r.deb_arch}: {exc}") from exc
        return archive

    def tools(self) -> Path | None:
        """The unpacked cross-build tools of the recipe (provisioned once), or None."""
        tools = self.recipe.tools
        if tools is None:
            return None
        from harness import catalog
        from harness.provision import Provisioner

        listing = json.dumps([tools.suite, sorted(tools.debs)]).encode()
        dest = images_dir() / "tools" / hashlib.sha256(listing).hexdigest()[:16]
        if verify_prefix(dest) is None:
            return dest
        with FileLock(str(dest) + ".lock", timeout=LOCK_TIMEOUT):
            if verify_prefix(dest) is None:
                return dest
            archive = Provisioner(catalog.default()).archive()
            work = dest.with_name(dest.name + ".debs")
            shutil.rmtree(work, ignore_errors=True)
            try:
                debs = archive.download([PackageRef(n, tools.suite) for n in tools.debs], work)
            except ProvisionError as exc:
                raise ImageBuildError(f"recipe {self.name}: fetching tools failed: {exc}") from exc
            with staging(dest) as tmp:
                unpack(debs, tmp)
                for rel in (tools.objcopy, tools.objdump, tools.emulator):
                    if not (tmp / rel).is_file():
                        raise ImageBuildError(
                            f"recipe {self.name}: tool {rel} is in none of {', '.join(tools.debs)}"
                        )
                write_manifest(tmp, {"kind": "tools", "packages": {
                    deb_field(d, "Package"): deb_field(d, "Version") for d in debs}})  # fmt: skip
            shutil.rmtree(work, ignore_errors=True)
        return dest

    def agent_files(self) -> list[Path]:
        return sorted(p for p in AGENT_DIR.rglob("*") if p.is_file())

    def inputs_hash(self, debs: DebSet, extra: Sequence[str] = ()) -> str:
        """sha256 over recipe files, agent files, this module, the debs and ``extra``."""
        digest = hashlib.sha256()

        def add(label: str, data: bytes) -> None:
            digest.update(f"{label}\0{len(data)}\0".encode())
            digest.update(data)

        for path in self.recipe.files:
            add(f"recipe:{path.name}", path.read_bytes())
        for path in self.agent_files():
            add(f"agent:{path.relative_to(AGENT_DIR)}", path.read_bytes())
        add("builder", Path(__file__).read_bytes())
        add("debs", "\n".join(debs.identity()).encode())
        for item in extra:
            add("extra", item.encode())
        return digest.hexdigest()

    # ensure ---------------------------------------------------------------------------

    def ensure(self, refresh: bool = False) -> Image:
        debs = self.debset(refresh=refresh)
        extra, context = self._nested_inputs()
        tools = self.tools()
        if tools is not None:
            from harness.provision import read_manifest

            pkgs = (read_manifest(tools) or {}).get("packages")
            extra = [*extra, "tools:" + json.dumps(pkgs, sort_keys=True)]
            context = {**context, "tools": tools}
        digest = self.inputs_hash(debs, extra)
        final = images_dir() / f"{self.name}-{digest[:16]}"
        if verify_prefix(final) is None:
            return read_image(final)
        with self.lock():
            problem = verify_prefix(final)
            if problem is None:
                return read_image(final)
            log.info("building image %s (%s)", self.name, problem)
            started = time.monotonic()
            with staging(final) as tmp:
                self._build(tmp, debs, digest, context)
            log.info("image %s built in %.1f s: %s", self.name, time.monotonic() - started, final)
        return read_image(final)

    def _nested_inputs(self) -> tuple[list[str], dict[str, Any]]:
        nested = self.recipe.nested
        if nested is None:
            return [], {}
        from harness import catalog
        from harness.provision import Provisioner, read_manifest

        l2 = ensure_image(nested.l2_image, self.recipe.arch)
        prov = Provisioner(catalog.default())
        try:
            qemu_prefix = prov.ensure_qemu(
                catalog.default().qemu_entry(nested.qemu, self.recipe.arch)
            )
            fw_prefix = prov.ensure_firmware(
                catalog.default().firmware_entry(nested.firmware, self.recipe.arch)
            )
        except ProvisionError as exc:
            raise ImageBuildError(f"recipe {self.name}: provisioning failed: {exc}") from exc
        libs = self._qemu_libraries(qemu_prefix, nested)
        extra = [
            f"l2:{l2.name}:{l2.inputs_hash}:{l2.host_key}",
            "qemu:"
            + json.dumps((read_manifest(qemu_prefix) or {}).get("packages"), sort_keys=True),
            "firmware:"
            + json.dumps((read_manifest(fw_prefix) or {}).get("packages"), sort_keys=True),
            "libs:" + ",".join(f"{k}={v}:{v.stat().st_size}" for k, v in sorted(libs.items())),
        ]
        return extra, {"l2": l2, "qemu_prefix": qemu_prefix, "fw_prefix": fw_prefix, "libs": libs}

    @staticmethod
    def _qemu_libraries(prefix: Path, nested: NestedPayload) -> dict[str, Path]:
        libpath = [prefix / "usr/lib/x86_64-linux-gnu", prefix / "lib/x86_64-linux-gnu"]
        binary = prefix / "usr/bin/qemu-system-x86_64"
        if not binary.is_file():
            raise ImageBuildError(f"{binary} missing: is the QEMU prefix complete?")
        libs = ldd_libraries(binary, libpath)
        for rel in nested.qemu_files:
            if rel.endswith(".so"):
                libs.update(ldd_libraries(prefix / rel, libpath))
        return libs

    # build ----------------------------------------------------------------------------

    def _build(self, out: Path, debs: DebSet, digest: str, context: Mapping[str, Any]) -> None:
        r = self.recipe
        work = out / ".work"
        pkgs = work / "pkgs"
        ensure_dir(pkgs)
        t0 = time.monotonic()
        unpack(debs.paths(), pkgs)
        log.info(
            "image %s: unpacked %d packages in %.1f s",
            r.name,
            len(debs.debs),
            time.monotonic() - t0,
        )
        kver = kernel_release_of(debs.kernel_package)
        vmlinuz = pkgs / "boot" / f"vmlinuz-{kver}"
        if not vmlinuz.is_file():
            raise ImageBuildError(f"{debs.kernel_package} has no boot/vmlinuz-{kver}")

        l2: Image | None = context.get("l2")
        if l2 is not None:
            # L1 and L2 answer with the same keys: the harness pins one host key.
            for name in (HOST_KEY_DROPBEAR, HOST_KEY_PUB, CLIENT_KEY, CLIENT_KEY_PUB):
                shutil.copy2(l2.root / name, out / name)
            host_key = l2.host_key
        else:
            host_key = self._make_keys(out, pkgs, context.get("tools"))

        root = work / "root"
        self._rootfs(root, pkgs, kver, out, context.get("tools"))
        initrd = out / INITRD
        self._initramfs(root, initrd)
        shutil.copy2(vmlinuz, out / KERNEL)
        self._uki(pkgs / r.stub, out / KERNEL, initrd, out / UKI, work, context.get("tools"))
        self._esp(out / UKI, out / ESP_IMG)
        data_disk = False
        if r.nested is not None:
            self._data_disk(out / DATA_IMG, work / "data", context)
            data_disk = True
        shutil.rmtree(work)
        meta = {
            "name": r.name,
            "arch": r.arch,
            "cmdline": r.cmdline,
            "inputs_hash": digest,
            "host_key": host_key,
            "kernel_version": kver,
            "packages": debs.versions(),
            "data_disk": data_disk,
            "agent": AGENT_PROTOCOL,
            "recipe_files": [str(p) for p in r.files],
        }
        (out / IMAGE_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))
        write_manifest(out, {"kind": "image", "name": r.name, "inputs_hash": digest})

    def _tool(self, tools: Path | None, which: str) -> tuple[list[str | Path], dict[str, str] | None]:
        """argv prefix and environment of build tool ``which`` (objcopy, objdump, emulator):
        the host's own, or the recipe's cross tool (its private libraries first)."""
        if tools is None or self.recipe.tools is None:
            return ([which] if which != "emulator" else []), None
        rel = getattr(self.recipe.tools, which)
        libs = [tools / "usr/lib/x86_64-linux-gnu", tools / "lib/x86_64-linux-gnu"]
        env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in libs if d.is_dir()))
        return [tools / rel], env

    def _lib_dirs(self) -> tuple[str, ...]:
        """Where the target's libraries may be in the unpacked packages."""
        libdir = self.recipe.libdir
        return (libdir, f"usr/{libdir}", "lib64", "lib", "usr/lib")

    def _make_keys(self, out: Path, pkgs: Path, tools: Path | None = None) -> str:
        """Host key (dropbear format, made by the packaged dropbearkey) and client key."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write_secret(out / CLIENT_KEY, private)
        (out / CLIENT_KEY_PUB).write_bytes(public + b" harness-client\n")

        loader = _inside(pkgs, self.recipe.loader)
        libpath = ":".join(str(pkgs / d) for d in self._lib_dirs()[:2])
        keygen = pkgs / "usr/bin/dropbearkey"
        hostkey = out / HOST_KEY_DROPBEAR
        emu, env = self._tool(tools, "emulator")  # runs a foreign dropbearkey
        run_tool([*emu, loader, "--library-path", libpath, keygen, "-t", "ed25519", "-f", hostkey],
                 env=env)  # fmt: skip
        os.chmod(hostkey, 0o600)
        text = run_tool([*emu, loader, "--library-path", libpath, keygen, "-y", "-f", hostkey],
                        env=env).decode()  # fmt: skip
        match = re.search(r"^(ssh-ed25519 \S+)", text, re.M)
        if not match:
            raise ImageBuildError(f"dropbearkey -y printed no ssh-ed25519 key: {text!r}")
        (out / HOST_KEY_PUB).write_text(match.group(1) + "\n")
        return match.group(1)

    def _rootfs(self, root: Path, pkgs: Path, kver: str, out: Path,
                tools: Path | None = None) -> None:
        r = self.recipe
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", r.libdir, str(Path(r.loader).parent),
                  "etc/harness/boot.d", "etc/dropbear", "proc", "sys", "dev", "run", "tmp",
                  "root", "var/log", "usr/lib/harness", "data", "mnt"):  # fmt: skip
            ensure_dir(root / d)
        os.chmod(root / "root", 0o700)
        os.chmod(root / "tmp", 0o1777)

        busybox = root / "bin/busybox"
        shutil.copy2(_inside(pkgs, r.busybox), busybox)
        for rel in r.binaries:
            self._install_binary(root, pkgs, rel)
        emu, env = self._tool(tools, "emulator")  # runs a foreign busybox
        applets = run_tool([*emu, busybox, "--list-full"], env=env).decode().split()
        for applet in applets:
            link = root / applet
            if link.exists() or link.is_symlink() or applet in ("linuxrc",):
                continue
            ensure_dir(link.parent)
            link.symlink_to("/bin/busybox")

        moddir = pkgs / "lib/modules" / kver
        index = ModuleIndex.scan(moddir)
        boot, boot_deps = index.closure(r.boot_modules)
        extra, extra_deps = index.closure(r.extra_modules)
        deps = {**boot_deps, **extra_deps}
        target = ensure_dir(root / "lib/modules" / kver)
        for name in deps:
            (target / f"{name}.ko").write_bytes(index.read(name))
        (target / "deps").write_text(
            "".join(f"{n}: {' '.join(d)}\n" for n, d in sorted(deps.items()))
        )
        (root / "etc/harness/modules.boot").write_text("".join(f"{n}\n" for n in boot))
        (root / "etc/harness/kver").write_text(kver + "\n")
        (root / "etc/harness/image").write_text(r.name + "\n")
        if r.nested is not None:
            (root / "etc/harness/data_label").write_text(r.nested.data_label + "\n")

        _install(AGENT_DIR / "init", root / "init", 0o755)
        _install(AGENT_DIR / "agent", root / "usr/bin/agent", 0o755)
        _install(AGENT_DIR / "lib.sh", root / "usr/lib/harness/lib.sh", 0o644)
        for hook in r.hooks:
            src = AGENT_DIR / "boot.d" / hook
            if not src.is_file():
                raise ImageBuildError(f"recipe {r.name}: agent hook {src} missing")
            _install(src, root / "etc/harness/boot.d" / hook, 0o644)

        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\ntty:x:5:\n")
        _write_secret(root / "etc/shadow", b"root:*:19000:0:99999:7:::\n")
        (root / "etc/shells").write_text("/bin/sh\n")
        (root / "etc/hosts").write_text(f"127.0.0.1 localhost {r.name}\n")
        (root / "etc/os-release").write_text(self._os_release())
        (root / "var/log/lastlog").write_bytes(b"")
        ensure_dir(root / "root/.ssh", 0o700)
        os.chmod(root / "root/.ssh", 0o700)
        _write_secret(root / "root/.ssh/authorized_keys", (out / CLIENT_KEY_PUB).read_bytes())
        _write_secret(
            root / "etc/dropbear/dropbear_ed25519_host_key", (out / HOST_KEY_DROPBEAR).read_bytes()
        )

    def _install_binary(self, root: Path, pkgs: Path, rel: str) -> None:
        """Copy ``rel`` from the packages and every library it needs (recursively)."""
        src = _inside(pkgs, rel)
        if not src.is_file():
            raise ImageBuildError(f"recipe {self.name}: {rel} is in none of its packages")
        _install(src, root / rel, 0o755)
        pending = [src]
        seen: set[str] = set()
        while pending:
            for soname in elf_needed(pending.pop()):
                if soname in seen:
                    continue
                seen.add(soname)
                lib = self._find_lib(pkgs, soname, rel)
                _install(lib, root / self.recipe.libdir / soname, 0o755)
                pending.append(lib)
        rloader, libdir = self.recipe.loader, self.recipe.libdir
        loader = _inside(pkgs, rloader)
        if not loader.is_file():
            raise ImageBuildError(f"recipe {self.name}: no {rloader} (add libc6)")
        name = Path(rloader).name
        if not (root / rloader).exists() and not (root / rloader).is_symlink():
            _install(loader, root / libdir / name, 0o755)
            (root / rloader).symlink_to(f"/{libdir}/{name}")

    def _find_lib(self, pkgs: Path, soname: str, needed_by: str) -> Path:
        for d in self._lib_dirs():
            path = _inside(pkgs, f"{d}/{soname}")
            if path.is_file():
                return path
        raise ImageBuildError(
            f"recipe {self.name}: {needed_by} needs {soname}, which none of its packages "
            f"ship; add the package to [packages] debs in {self.recipe.files[-1]}"
        )

    def _os_release(self) -> str:
        return (
            f'ID=harness\nNAME="harness {self.recipe.name}"\n'
            f'PRETTY_NAME="harness guest {self.recipe.name}"\nVERSION_ID="{AGENT_PROTOCOL}"\n'
        )

    def _initramfs(self, root: Path, dest: Path) -> None:
        raw = dest.with_suffix(".cpio")
        with raw.open("wb") as fh:
            writer = CpioWriter(fh)
            writer.add_tree(root)
            writer.add_chardev("dev/console", 5, 1)
            writer.add_chardev("dev/null", 1, 3, 0o666)
            writer.finish()
        # zstd: the fastest of the kernel's decompressors, which matters under TCG.
        run_tool(["zstd", "-q", "-f", "-12", "-T0", "--no-check", raw, "-o", dest])
        raw.unlink()

    def _uki(self, stub: Path, kernel: Path, initrd: Path, dest: Path, work: Path,
             tools: Path | None = None) -> None:
        """The stub plus .osrel/.cmdline/.initrd/.linux sections, each placed after the
        stub's image on a page boundary (the stub finds them by name in memory)."""
        if not stub.is_file():
            raise ImageBuildError(f"recipe {self.name}: EFI stub {stub} missing")
        osrel = work / "osrel"
        osrel.write_text(self._os_release())
        cmdline = work / "cmdline"
        cmdline.write_bytes(self.recipe.cmdline.encode() + b"\0")
        objdump, env = self._tool(tools, "objdump")
        headers = run_tool([*objdump, "-p", "-h", stub], env=env).decode()
        end = pe_image_end(headers)
        objcopy, env = self._tool(tools, "objcopy")
        args: list[str | Path] = [*objcopy]
        vma = _align(end, 0x1000)
        for section, path in (
            (".osrel", osrel),
            (".cmdline", cmdline),
            (".initrd", initrd),
            (".linux", kernel),
        ):
            args += [
                "--add-section",
                f"{section}={path}",
                "--change-section-vma",
                f"{section}={vma:#x}",
            ]
            vma = _align(vma + path.stat().st_size, 0x1000)
        run_tool([*args, stub, dest], env=env)

    def _esp(self, uki: Path, dest: Path) -> None:
        size_mb = self.recipe.esp_size_mb or (uki.stat().st_size >> 20) + 8
        if (size_mb << 20) < uki.stat().st_size + (1 << 20):
            raise ImageBuildError(f"recipe {self.name}: esp.size_mb={size_mb} cannot hold the UKI")
        make_esp(uki, dest, self.recipe.boot_file, size_mb)

    def _data_disk(self, dest: Path, data: Path, context: Mapping[str, Any]) -> None:
        """QEMU (binary, libraries, blobs), OVMF and the L2 image on an ext2 disk."""
        nested = self.recipe.nested
        assert nested is not None
        qemu: Path = context["qemu_prefix"]
        fw: Path = context["fw_prefix"]
        l2: Image = context["l2"]
        libs: Mapping[str, Path] = context["libs"]
        _install(qemu / "usr/bin/qemu-system-x86_64", data / "qemu/bin/qemu-system-x86_64", 0o755)
        for soname, path in libs.items():
            _install(path.resolve(), data / "qemu/lib" / soname, 0o755)
        for rel in nested.qemu_files:
            src = (qemu / rel).resolve()
            if not src.is_file():
                raise ImageBuildError(f"recipe {self.name}: {rel} not in QEMU {nested.qemu}")
            sub = "qemu/lib/qemu" if rel.endswith(".so") else "qemu/share"
            _install(src, data / sub / Path(rel).name, 0o644)
        code, vars_ = nested.firmware_files
        for rel, name in ((code, "OVMF_CODE_4M.fd"), (vars_, "OVMF_VARS_4M.fd")):
            src = fw / rel
            if not src.is_file():
                raise ImageBuildError(f"recipe {self.name}: {rel} not in OVMF {nested.firmware}")
            _install(src, data / "ovmf" / name, 0o644)
        for src, name in ((l2.kernel, "vmlinuz"), (l2.initrd, "initrd.img"), (l2.esp, "esp.img")):
            _install(src, data / "l2" / name, 0o644)
        (data / "l2/cmdline").write_text(l2.cmdline + "\n")
        (data / "l2/image").write_text(f"{l2.name} {l2.inputs_hash}\n")
        used = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
        size_kb = (used * 11 // 10 >> 10) + 16384
        run_tool(["mke2fs", "-q", "-F", "-t", "ext2", "-L", nested.data_label, "-d", data,
                  dest, f"{size_kb}k"])  # fmt: skip


def pe_image_end(objdump_output: str) -> int:
    """End of a PE image (ImageBase-relative): SizeOfImage, or the last section's end."""
    size = re.search(r"^SizeOfImage\s+([0-9a-fA-F]+)", objdump_output, re.M)
    base = re.search(r"^ImageBase\s+([0-9a-fA-F]+)", objdump_output, re.M)
    end = int(size.group(1), 16) if size else 0
    image_base = int(base.group(1), 16) if base else 0
    for match in re.finditer(
        r"^\s*\d+\s+\S+\s+([0-9a-fA-F]{8,})\s+([0-9a-fA-F]{8,})\s", objdump_output, re.M
    ):
        sec_size, vma = int(match.group(1), 16), int(match.group(2), 16)
        end = max(end, vma - image_base + sec_size)
    if end == 0:
        raise ImageBuildError("objdump showed no PE sections for the EFI stub")
    return end + image_base


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def _install(src: Path, dest: Path, mode: int) -> None:
    ensure_dir(dest.parent)
    shutil.copyfile(src, dest)
    os.chmod(dest, mode)


def _write_secret(path: Path, data: bytes) -> None:
    ensure_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def mem_region_checksum(size_mb: int, seed: str) -> str:
    """sha256 of the region ``agent mem-fill`` writes for ``size_mb`` and ``seed``."""
    digest = hashlib.sha256(seed.encode()).hexdigest()
    filler = (digest * 63).encode()
    out = hashlib.sha256()
    for page in range(size_mb * 256):
        header = f"harness-mem seed={seed} page={page}"[:63].ljust(63) + "\n"
        out.update(header.encode() + filler)
    return out.hexdigest()
