"""Image recipes (``guests/recipes/<name>.toml``): what goes into a guest image, as data."""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import CatalogError, ConfigError
from harness.paths import GUESTS_DIR

#: what a recipe's ``[kernel] repack`` may name besides "none" (harness.images.kernel builds it)
REPACKS = ("lz4",)

log = logging.getLogger(__name__)

RECIPES_DIR = GUESTS_DIR / "recipes"
AGENT_DIR = GUESTS_DIR / "agent"


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
    kernel_repack: str | None = None  # "lz4": the kernel's payload recompressed (harness.images.kernel)


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
    repack = _get(top, data, "kernel.repack", str, default="none")
    if repack != "none" and repack not in REPACKS:
        raise CatalogError(top, f"field 'kernel.repack' must be {' or '.join(map(repr, REPACKS))} or 'none', got {repack!r}")
    if repack != "none" and _get(top, data, "arch", str) != "x86_64":
        raise CatalogError(top, f"field 'kernel.repack' = {repack!r} is for x86_64 kernels only")
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
        kernel_repack=None if repack == "none" else repack,
        **layout,
    )


