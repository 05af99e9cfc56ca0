"""The initramfs: a newc cpio written here (device nodes and owners need no root)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import IO

from harness.errors import ImageBuildError

log = logging.getLogger(__name__)

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


