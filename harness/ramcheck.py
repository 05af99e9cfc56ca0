"""Guest RAM compared across a live migration's switchover.

A precopy migration sends every page once, then again each page the guest wrote since it
was sent, as the source's dirty tracking reports them.  A write that tracking misses leaves
the destination with a stale page: nothing in QEMU notices, and the guest finds out later
(a corrupted timer list, a crash) or never.  With ``verify_ram`` the destination is started
paused (``-S``); once the source has stopped for good (``postmigrate``) and the destination
has loaded the whole stream, both QEMUs dump the guest's RAM (QMP ``pmemsave``, the RAM
regions of the system address space as ``info mtree -f`` lists them) and the dumps are
compared page by page.  Both guests stand still then, so any difference is a page the
destination did not get.

The dumps go to a private directory in ``/dev/shm`` (twice the guest's RAM, for a moment)
and are removed whatever happens.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.errors import MigrationError

PAGE = 4096
CHUNK = 1 << 20  # compared a MiB at a time; only differing MiBs are split into pages
SHOWN = 8  # differing pages named in a problem

_RAM_LINE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): (\S+)")


class Endpoint(Protocol):
    name: str

    def qmp(self, cmd: str, **args: Any) -> Any: ...


@dataclass(frozen=True)
class RamRange:
    """A guest-physical range backed by RAM: [start, start + size)."""

    start: int
    size: int
    name: str


@dataclass
class RamComparison:
    """What the comparison found: pages compared and guest-physical addresses that differ."""

    pages: int
    differing: list[int] = field(default_factory=list)
    ranges: list[RamRange] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differing

    def problem(self) -> str | None:
        """The line a failed hop carries (the signature ``guest-ram-differs`` matches it)."""
        if self.ok:
            return None
        shown = ", ".join(f"{a:#x}" for a in self.differing[:SHOWN])
        more = f" and {len(self.differing) - SHOWN} more" if len(self.differing) > SHOWN else ""
        return (f"guest RAM differs across the hop: {len(self.differing)} of {self.pages} pages "
                f"({shown}{more}): the destination did not get the source's last writes")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"pages": self.pages, "differing": len(self.differing),
                "first": [f"{a:#x}" for a in self.differing[:SHOWN]],
                "ranges": [f"{r.start:#x}+{r.size:#x} {r.name}" for r in self.ranges]}  # fmt: skip


def ram_ranges(mtree: str) -> list[RamRange]:
    """The RAM ranges of the flat view of address space "memory" in ``info mtree -f``."""
    ranges: list[RamRange] = []
    in_memory = False
    for line in mtree.splitlines():
        if line.startswith("FlatView"):
            if ranges:
                break
            in_memory = False
        elif line.strip().startswith('AS "memory",'):
            in_memory = True
        elif in_memory:
            m = _RAM_LINE.match(line)
            if m:
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                ranges.append(RamRange(start, end - start + 1, m.group(3)))
    if not ranges:
        raise MigrationError("no RAM in the flat view of address space 'memory' ('info mtree -f'): "
                             "cannot compare guest RAM")  # fmt: skip
    return ranges


def compare_files(a: Path, b: Path, base: int) -> list[int]:
    """Guest-physical addresses (``base`` + offset) of the pages where ``a`` and ``b`` differ."""
    size = a.stat().st_size
    if b.stat().st_size != size:
        raise MigrationError(f"RAM dumps differ in size: {a} {size} bytes, {b} {b.stat().st_size}")
    if size == 0:
        return []
    out: list[int] = []
    with (a.open("rb") as fa, b.open("rb") as fb,
          mmap.mmap(fa.fileno(), 0, prot=mmap.PROT_READ) as ma, mmap.mmap(fb.fileno(), 0, prot=mmap.PROT_READ) as mb):
        for off in range(0, size, CHUNK):
            end = min(off + CHUNK, size)
            if ma[off:end] == mb[off:end]:
                continue
            out += [base + p for p in range(off, end, PAGE) if ma[p : p + PAGE] != mb[p : p + PAGE]]
    return out


def _hmp(ep: Endpoint, line: str) -> str:
    return str(ep.qmp("human-monitor-command", **{"command-line": line}))


def scratch_dir(need: int) -> Path:
    """A private directory for two dumps of ``need`` bytes each: /dev/shm when it has room."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    if free < 2 * need + (64 << 20):
        raise MigrationError(f"verify_ram needs {2 * need >> 20} MiB free in {base} for two RAM dumps; "
                             f"it has {free >> 20} MiB")  # fmt: skip
    return Path(tempfile.mkdtemp(prefix=f"hv-ramcheck-{os.getpid()}-", dir=base))


def compare(source: Endpoint, destination: Endpoint, ranges: Sequence[RamRange] | None = None) -> RamComparison:
    """Dump the guest RAM of two stopped QEMUs and compare it page by page (the ranges
    are the source's unless given; the destination has the same machine)."""
    ranges = list(ranges) if ranges is not None else ram_ranges(_hmp(source, "info mtree -f"))
    need = sum(r.size for r in ranges)
    tmp = scratch_dir(need)
    try:
        result = RamComparison(pages=need // PAGE, ranges=ranges)
        for i, r in enumerate(ranges):
            files = []
            for tag, ep in (("src", source), ("dst", destination)):
                f = tmp / f"{i}-{tag}.bin"
                ep.qmp("pmemsave", val=r.start, size=r.size, filename=str(f))
                files.append(f)
            result.differing += compare_files(files[0], files[1], r.start)
            for f in files:
                f.unlink()
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
