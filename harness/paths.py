"""Where the harness keeps things on disk.

Everything fetched or built (Debian packages, unpacked builds, guest images, saved
guest states) lives under one cache root shared by every checkout and every xdist
worker on the machine, so a second run does no work.  ``HARNESS_CACHE`` moves it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(str(importlib.resources.files("harness")))
REPO_ROOT = PACKAGE_DIR.parent
DATA_DIR = PACKAGE_DIR / "data"
# A wheel (or a non-editable install) carries copies of the checkout's top-level data
# directories under harness/_shipped/ (setup.py's build step puts them there); an editable
# install and a checkout read the top-level directories themselves.
SHIPPED_DIR = PACKAGE_DIR / "_shipped"
NIGHTLY_SUITE_DIR = PACKAGE_DIR / "nightly" / "suite"


def _data_dir(name: str) -> Path:
    shipped = SHIPPED_DIR / name
    return shipped if shipped.is_dir() else REPO_ROOT / name


FIRMWARE_DIR = _data_dir("firmware")
GUESTS_DIR = _data_dir("guests")


@functools.cache
def checkout() -> Path | None:
    """The source checkout this package runs from (an editable install), or None for an
    installed package: what only a checkout has (its ``tests/``) is needed for the
    nightly's pytest rows."""
    pyproject = REPO_ROOT / "pyproject.toml"
    if (REPO_ROOT / "tests").is_dir() and pyproject.is_file() and (
        'name = "qemu-survival-harness"' in pyproject.read_text(errors="replace")
    ):
        return REPO_ROOT
    return None


def cache_root() -> Path:
    """The cache root: ``$HARNESS_CACHE`` or ``~/.cache/qemu-harness``."""
    env = os.environ.get("HARNESS_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return (base / "qemu-harness").resolve()


def ensure_dir(path: Path, mode: int = 0o755) -> Path:
    """Create ``path`` (and parents) if needed and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    return path


# --- the run's registry file (builds registered for a run: see harness.inventory.registry) ---------

REGISTRY_ENV = "HARNESS_REGISTRY"
REGISTRY_FORMAT = 1


def registry_path() -> Path | None:
    """The registry file of this run (``$HARNESS_REGISTRY``), if any."""
    env = os.environ.get(REGISTRY_ENV)
    return Path(env) if env else None


def read_registry(path: Path) -> dict[str, Any]:
    """The registry file's records (``qemu``, ``firmware``); an absent file is empty."""
    from harness.errors import ConfigError

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": REGISTRY_FORMAT, "qemu": [], "firmware": []}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"registry file {path} ({REGISTRY_ENV}) is unreadable: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != REGISTRY_FORMAT:
        raise ConfigError(f"registry file {path} ({REGISTRY_ENV}): not a format-{REGISTRY_FORMAT} registry")
    data.setdefault("qemu", [])
    data.setdefault("firmware", [])
    return data


def registered_records(path: Path, kind: str) -> list[dict[str, Any]]:
    """The ``kind`` records (``qemu``, ``firmware``) of a registry file, none when it is
    unreadable: what to forget of a file that may be gone or damaged."""
    from harness.errors import ConfigError

    try:
        return list(read_registry(path)[kind])
    except ConfigError:
        return []


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(mtime, size) of a file, None when absent: whether a file changed since last read."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's contents, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
