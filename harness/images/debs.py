"""The ``.deb`` set of a recipe: resolved once, kept, named by its files' digests."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ImageBuildError

log = logging.getLogger(__name__)

DEBS_JSON = "debs.json"

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


def read_debset(dest: Path) -> DebSet | None:
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


