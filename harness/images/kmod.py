"""Kernel modules for the initramfs: modinfo parsing, dependencies, load order."""

from __future__ import annotations

import logging
import lzma
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ImageBuildError

log = logging.getLogger(__name__)

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


