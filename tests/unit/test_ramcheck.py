"""The RAM comparison's pure parts: the RAM ranges of ``info mtree -f``, the page compare,
the problem line and its signature.  The real-guest tests are in
tests/integration/test_migration.py (a changed source page is named; same-build hops)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import ramcheck, signatures
from harness.errors import MigrationError

DATA = Path(__file__).parent / "data"


def test_ram_ranges_of_a_real_q35_flat_view() -> None:
    # recorded from QEMU 10.0.2, pc-q35-10.0, 1 GiB: "memory" is the second flat view there
    ranges = ramcheck.ram_ranges((DATA / "mtree-flat-q35-10.0.2.txt").read_text())
    assert [(r.start, r.size, r.name) for r in ranges] == [
        (0, 0xC0000, "pc.ram"),
        (0x100000, 0x40000000 - 0x100000, "pc.ram"),
    ]


def test_ram_ranges_skip_other_address_spaces_and_region_kinds() -> None:
    text = """FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000fff (prio 0, ram): not-this
FlatView #1
 AS "memory", root: system
 Root memory region: system
  0000000000000000-0000000000000fff (prio 0, ram): low
  0000000000001000-0000000000001fff (prio 1, rom): a-rom
  00000000ffc00000-00000000ffffffff (prio 0, romd): system.flash0
  0000000100000000-0000000100000fff (prio 0, ram): high @0000000000001000 KVM
FlatView #2
 AS "other", root: x
  0000000000000000-0000000000000fff (prio 0, ram): nor-this
"""
    assert [(r.start, r.size, r.name) for r in ramcheck.ram_ranges(text)] == [
        (0, 0x1000, "low"), (0x100000000, 0x1000, "high")]  # fmt: skip


def test_no_ram_is_an_error_that_says_so() -> None:
    with pytest.raises(MigrationError, match="no RAM in the flat view of address space 'memory'"):
        ramcheck.ram_ranges('FlatView #0\n AS "memory", root: system\n  0-fff (prio 0, i/o): x\n')


def test_compare_files_names_guest_physical_pages(tmp_path: Path) -> None:
    size = 3 * ramcheck.CHUNK
    a, b = tmp_path / "a", tmp_path / "b"
    data = bytearray(size)
    a.write_bytes(data)
    data[5 * ramcheck.PAGE + 7] = 1  # page 5 of the first MiB
    data[ramcheck.CHUNK * 2 + ramcheck.PAGE - 1] = 2  # the last byte of the third MiB's first page
    b.write_bytes(data)
    assert ramcheck.compare_files(a, b, 0x100000) == [0x100000 + 5 * ramcheck.PAGE,
                                                       0x100000 + 2 * ramcheck.CHUNK]  # fmt: skip
    assert ramcheck.compare_files(a, a, 0) == []


def test_compare_files_refuses_dumps_of_different_sizes(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"\0" * 4096)
    (tmp_path / "b").write_bytes(b"\0" * 8192)
    with pytest.raises(MigrationError, match="RAM dumps differ in size"):
        ramcheck.compare_files(tmp_path / "a", tmp_path / "b", 0)


def test_problem_line_is_the_signatures() -> None:
    ok = ramcheck.RamComparison(pages=262080)
    assert ok.ok and ok.problem() is None
    bad = ramcheck.RamComparison(pages=262080, differing=[0x3E01F000 + i * 0x1000 for i in range(11)])
    line = bad.problem()
    assert line is not None and "11 of 262080 pages" in line and "0x3e01f000" in line and "and 3 more" in line
    sig = signatures.classify(line)
    assert sig is not None and sig.name == "guest-ram-differs"
    assert bad.to_json()["differing"] == 11 and len(bad.to_json()["first"]) == ramcheck.SHOWN



def test_verify_ram_with_postcopy_is_refused_before_the_guest_is_touched() -> None:
    from harness import migration
    from harness.errors import ConfigError

    class NoGuest:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"live() touched the guest ({name}) before refusing")

    with pytest.raises(ConfigError, match="verify_ram compares RAM at a precopy switchover"):
        migration.live(NoGuest(), verify_ram=True, postcopy=True)  # type: ignore[arg-type]
