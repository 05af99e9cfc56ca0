"""Where the harness keeps things on disk.

Everything fetched or built (Debian packages, unpacked builds, guest images, saved
guest states) lives under one cache root shared by every checkout and every xdist
worker on the machine, so a second run does no work.  ``HARNESS_CACHE`` moves it.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(__file__).resolve().parent / "data"
FIRMWARE_DIR = REPO_ROOT / "firmware"
GUESTS_DIR = REPO_ROOT / "guests"


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
