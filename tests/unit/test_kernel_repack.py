"""The pure parts of harness.images.kernel: reading a bzImage's header and payload,
splitting the payload as kbuild made it, the addresses the wrapper is built with."""

from __future__ import annotations

import lzma
import struct

import pytest

from harness.errors import ImageBuildError
from harness.images.kernel import (
    parse_version,
    read_bzimage,
    source_package,
    split_payload,
    unpack_xz,
)

VERSION = "6.1.0-50-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.176-1 (2026-07-02)"


def bzimage(payload: bytes, version: str = VERSION, setup_sects: int = 3) -> bytes:
    """A setup header as boot protocol 2.15 lays it out, the version string in the setup
    code, the payload after it."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<H", setup, 0x20E, 0x400 - 0x200)
    setup[0x400 : 0x400 + len(version) + 1] = version.encode() + b"\0"
    struct.pack_into("<II", setup, 0x248, 0x100, len(payload))
    return bytes(setup) + b"\xcc" * 0x100 + payload + b"\xcc" * 64


def elf_with_sections(sections: list[tuple[str, int, int]], body: bytes = b"\x90" * 64) -> bytes:
    """An ELF64 header, ``body``, a section-name table and the section headers last."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n, _, _ in sections) + b".shstrtab\0"
    strtab_off = 64 + len(body)
    shoff = strtab_off + len(names)
    shoff += -shoff % 8
    headers = [bytes(64)]
    pos = 1
    for name, addr, size in sections:
        headers.append(struct.pack("<IIQQQQIIQQ", pos, 1, 3, addr, 64, size, 0, 0, 4096, 0))
        pos += len(name) + 1
    headers.append(struct.pack("<IIQQQQIIQQ", pos, 3, 0, 0, strtab_off, len(names), 0, 0, 1, 0))
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, 64, shoff, 0, 64, 56, 0, 64,
                                 len(headers), len(headers) - 1)  # fmt: skip
    data = header + body + names
    return data + bytes(shoff - len(data)) + b"".join(headers)


KERNEL_SECTIONS = [
    (".text", 0xFFFFFFFF81000000, 0xE01D32),
    (".rodata", 0xFFFFFFFF82000000, 0x45C4D6),
    (".bss", 0xFFFFFFFF8330D000, 0x10F3000),
    (".brk", 0xFFFFFFFF84400000, 0x30000),
]


def test_payload_splits_at_the_section_headers_and_names_the_wrapper_addresses() -> None:
    elf = elf_with_sections(KERNEL_SECTIONS)
    relocs = struct.pack("<5I", 0, 0x1000010, 0, 0x1000020, 0)
    parts = split_payload(elf + relocs)
    assert (parts.elf, parts.relocs) == (elf, relocs)
    assert parts.vo_symbols() == {
        "_text": 0xFFFFFFFF81000000,
        "__start_rodata": 0xFFFFFFFF82000000,
        "__bss_start": 0xFFFFFFFF8330D000,
        "_end": 0xFFFFFFFF84430000,  # .brk's end, page-aligned
    }


def test_a_payload_without_whole_relocations_or_sections_is_refused() -> None:
    elf = elf_with_sections(KERNEL_SECTIONS)
    with pytest.raises(ImageBuildError, match="relocation table is 3 bytes"):
        split_payload(elf + b"\0\0\0")
    with pytest.raises(ImageBuildError, match="not a little-endian ELF64"):
        split_payload(b"\x7fELF\x01\x01" + bytes(100))
    no_brk = split_payload(elf_with_sections(KERNEL_SECTIONS[:3]) + bytes(8))
    with pytest.raises(ImageBuildError, match=r"no \.brk section"):
        no_brk.vo_symbols()


def test_bzimage_payload_and_version_are_read_from_the_setup_header() -> None:
    raw = b"kernel" * 1000
    xz = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    image = read_bzimage(bzimage(xz + struct.pack("<I", len(raw))), "vmlinuz")
    assert image.version == VERSION
    assert image.output_len == len(raw)
    assert unpack_xz(image, "vmlinuz") == raw
    lying = read_bzimage(bzimage(xz + struct.pack("<I", len(raw) + 1)), "vmlinuz")
    with pytest.raises(ImageBuildError, match="its trailer says"):
        unpack_xz(lying, "vmlinuz")


def test_not_a_bzimage_is_named() -> None:
    with pytest.raises(ImageBuildError, match=r"vmlinuz-x: not an x86 bzImage"):
        read_bzimage(bytes(4096), "vmlinuz-x")
    short = bytearray(bzimage(b"\xfd7zXZ\x00" + bytes(10)))
    struct.pack_into("<I", short, 0x24C, 10**7)
    with pytest.raises(ImageBuildError, match="runs past the file"):
        read_bzimage(bytes(short), "vmlinuz")
    gz = read_bzimage(bzimage(b"\x1f\x8b" + bytes(20)), "vmlinuz")
    with pytest.raises(ImageBuildError, match="payload is not XZ"):
        unpack_xz(gz, "vmlinuz")


def test_version_string_and_source_package() -> None:
    kv = parse_version(VERSION)
    assert (kv.release, kv.user, kv.host) == ("6.1.0-50-amd64", "debian-kernel", "lists.debian.org")
    assert kv.uts_version == "#1 SMP PREEMPT_DYNAMIC Debian 6.1.176-1 (2026-07-02)"
    assert source_package(kv.release) == "linux-source-6.1"
    assert source_package("6.12.48+deb13-amd64") == "linux-source-6.12"
    with pytest.raises(ImageBuildError, match="is not 'RELEASE"):
        parse_version("6.1.0 built somewhere")
    with pytest.raises(ImageBuildError, match="no major.minor"):
        source_package("six")
