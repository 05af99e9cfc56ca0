"""Debian's x86 kernel with its payload recompressed: the same kernel, unpacked 30x faster.

Debian's amd64 ``vmlinuz`` carries the kernel (an ELF image plus its relocation table) XZ
compressed.  Under TCG the boot wrapper's XZ decoder is the longest single step of a cold
boot: 4.5-6 s of a 20 s boot to the agent on this machine (sampled ``RIP`` in the
wrapper's range), where LZ4 decodes the same 66 MB natively in 0.04 s against XZ's 1.2 s.

A kernel's compression is chosen when its boot wrapper is built, so :func:`repack_lz4`
builds only that wrapper (``arch/x86/boot``, the EFI stub library) from the matching
``linux-source`` package with Debian's own config, ``KERNEL_LZ4`` instead of
``KERNEL_XZ``, around the payload taken out of Debian's image.  Nothing of the kernel
proper is rebuilt: the wrapper needs four addresses of it (``VO_*``, read from the
payload's section headers since Debian's ``System.map`` is a placeholder) and its
relocation table (the payload's tail, handed to kbuild in place of the ``relocs`` tool,
which needs the unstripped ``vmlinux``).  The result is checked before use: the new
image's payload must unpack to Debian's payload byte for byte.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import os
import platform
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from harness.errors import ImageBuildError, ProvisionError
from harness.images.tools import run_tool
from harness.inventory.catalog import PackageRef
from harness.inventory.provision import (
    AptArchive,
    deb_field,
    staging,
    unpack,
    verify_prefix,
    write_manifest,
)
from harness.paths import ensure_dir, file_sha256

log = logging.getLogger(__name__)

BZIMAGE = "bzImage"
BUILD_TIMEOUT = 1800.0
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class BzImage:
    """What the wrapper of an x86 ``bzImage`` says about its payload (boot protocol 2.08+)."""

    payload: bytes  # the compressed kernel, with the 4-byte size kbuild appends
    version: str  # the setup header's kernel version string

    @property
    def output_len(self) -> int:
        return int(struct.unpack_from("<I", self.payload, len(self.payload) - 4)[0])


def read_bzimage(data: bytes, what: str) -> BzImage:
    """The payload and version string of an x86 ``bzImage`` (``what`` names it in errors)."""
    if len(data) < 0x270 or data[0x202:0x206] != b"HdrS":
        raise ImageBuildError(f"{what}: not an x86 bzImage (no 'HdrS' setup header)")
    if struct.unpack_from("<H", data, 0x206)[0] < 0x208:
        raise ImageBuildError(f"{what}: boot protocol older than 2.08 names no payload")
    setup_sects = data[0x1F1] or 4
    start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", data, 0x248)
    payload = data[start + offset : start + offset + length]
    if len(payload) != length or length < 8:
        raise ImageBuildError(f"{what}: payload at {start + offset:#x}+{length} runs past the file")
    vofs = struct.unpack_from("<H", data, 0x20E)[0]
    version = data[vofs + 0x200 : vofs + 0x200 + 256].split(b"\0")[0].decode("ascii", "replace")
    return BzImage(payload, version)


def unpack_xz(image: BzImage, what: str) -> bytes:
    """The uncompressed payload of an XZ-compressed kernel (checked against its size)."""
    if not image.payload.startswith(XZ_MAGIC):
        raise ImageBuildError(f"{what}: payload is not XZ (starts {image.payload[:6].hex()})")
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image.payload[:-4])
    except lzma.LZMAError as exc:
        raise ImageBuildError(f"{what}: XZ payload does not unpack: {exc}") from exc
    if len(out) != image.output_len:
        raise ImageBuildError(f"{what}: payload unpacks to {len(out)} bytes, its trailer says {image.output_len}")
    return out


@dataclass(frozen=True)
class Payload:
    """A kernel payload split as kbuild made it: ``vmlinux.bin`` + ``vmlinux.relocs``."""

    elf: bytes
    relocs: bytes
    sections: Mapping[str, tuple[int, int]]  # name -> (address, size)

    def vo_placements(self) -> dict[str, tuple[str, int]]:
        """The four addresses of the kernel the wrapper is built with (``voffset.h``), as
        (section, offset in it) the way arch/x86/kernel/vmlinux.lds.S places them:
        ``_text``, ``__start_rodata`` and ``__bss_start`` open their sections, and
        ``_end`` is the page after ``.brk``."""
        need = (".text", ".rodata", ".bss", ".brk")
        missing = [n for n in need if n not in self.sections]
        if missing:
            raise ImageBuildError(f"kernel payload has no {', '.join(missing)} section")
        brk, brk_size = self.sections[".brk"]
        return {
            "_text": (".text", 0),
            "__start_rodata": (".rodata", 0),
            "__bss_start": (".bss", 0),
            "_end": (".brk", ((brk + brk_size + 0xFFF) & ~0xFFF) - brk),
        }

    def vo_symbols(self) -> dict[str, int]:
        """:meth:`vo_placements` as absolute addresses."""
        return {name: self.sections[sec][0] + off for name, (sec, off) in self.vo_placements().items()}


def split_payload(payload: bytes) -> Payload:
    """The ELF image (up to the end of its section header table, where ``objcopy -S``
    leaves it) and the relocation table kbuild appended to it."""
    if payload[:4] != b"\x7fELF" or payload[4] != 2 or payload[5] != 1:
        raise ImageBuildError("kernel payload is not a little-endian ELF64 image")
    shoff = struct.unpack_from("<Q", payload, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", payload, 0x3A)
    end = shoff + shentsize * shnum
    if shentsize != 64 or not 0 < end <= len(payload) or shstrndx >= shnum:
        raise ImageBuildError(f"kernel payload's section headers are not where its ELF header says ({shoff:#x})")
    headers = [struct.unpack_from("<IIQQQQIIQQ", payload, shoff + i * 64) for i in range(shnum)]
    strtab_off, strtab_size = headers[shstrndx][4], headers[shstrndx][5]
    strtab = payload[strtab_off : strtab_off + strtab_size]
    sections = {}
    for h in headers:
        name = strtab[h[0] : strtab.index(b"\0", h[0])].decode("ascii", "replace")
        if name:
            sections[name] = (h[3], h[5])
    relocs = payload[end:]
    if len(relocs) % 4 or len(relocs) < 8:
        raise ImageBuildError(f"kernel payload's relocation table is {len(relocs)} bytes, not whole 32-bit entries")
    return Payload(payload[:end], relocs, sections)


@dataclass(frozen=True)
class KernelVersion:
    """The setup header's ``RELEASE (USER@HOST) UTS_VERSION`` string, split."""

    release: str
    user: str
    host: str
    uts_version: str


def parse_version(text: str) -> KernelVersion:
    m = re.match(r"^(\S+) \(([^@()\s]+)@([^()\s]+)\) (#.+)$", text)
    if not m:
        raise ImageBuildError(f"kernel version string {text!r} is not 'RELEASE (USER@HOST) #...'")
    return KernelVersion(*m.groups())


def source_package(release: str) -> str:
    """``6.1.0-50-amd64`` -> ``linux-source-6.1`` (Debian's source of that kernel)."""
    m = re.match(r"^(\d+\.\d+)[.-]", release)
    if not m:
        raise ImageBuildError(f"kernel release {release!r} names no major.minor version")
    return f"linux-source-{m.group(1)}"


def ensure_lz4(vmlinuz: Path, config: Path, version: str, suite: str, archive: AptArchive,
               cache: Path) -> Path:  # fmt: skip
    """Debian's ``vmlinuz`` (package version ``version``) with an LZ4 payload, built once
    per input into ``cache``; returns the image's path."""
    key = hashlib.sha256(
        "\0".join([file_sha256(vmlinuz), file_sha256(config), version, file_sha256(Path(__file__))]).encode()
    ).hexdigest()[:16]
    final = cache / f"lz4-{key}"
    if verify_prefix(final) is None:
        return final / BZIMAGE
    ensure_dir(cache)
    with FileLock(str(final) + ".lock", timeout=BUILD_TIMEOUT):
        if verify_prefix(final) is None:
            return final / BZIMAGE
        started = time.monotonic()
        with staging(final) as tmp:
            info = repack_lz4(vmlinuz, config, version, suite, archive, tmp)
            write_manifest(tmp, {"kind": "kernel", **info})
        log.info("kernel %s repacked with LZ4 in %.0f s", info["release"], time.monotonic() - started)
    return final / BZIMAGE


def repack_lz4(vmlinuz: Path, config: Path, version: str, suite: str, archive: AptArchive,
               out: Path) -> dict[str, Any]:  # fmt: skip
    """Build ``out/bzImage``: Debian's kernel payload in a boot wrapper built with LZ4."""
    original = read_bzimage(vmlinuz.read_bytes(), str(vmlinuz))
    payload = unpack_xz(original, str(vmlinuz))
    parts = split_payload(payload)
    kv = parse_version(original.version)
    src_pkg = source_package(kv.release)
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=out.parent) as tmpdir:
        work = Path(tmpdir)
        try:
            debs = archive.download([PackageRef(src_pkg, suite, version)], work / "deb")
        except ProvisionError as exc:
            raise ImageBuildError(
                f"{src_pkg} {version} (the source of {vmlinuz.name}) cannot be fetched: {exc}; "
                "if the archive has moved on, `harness images build --refresh` takes its current kernel"
            ) from exc
        got = deb_field(debs[0], "Version")
        if got != version:
            raise ImageBuildError(f"{debs[0].name} is version {got}, the kernel is {version}")
        unpack(debs, work / "pkg")
        tarballs = sorted((work / "pkg/usr/src").glob(f"{src_pkg}.tar.*"))
        if not tarballs:
            raise ImageBuildError(f"{debs[0].name} holds no usr/src/{src_pkg}.tar.*")
        src = work / "src"
        ensure_dir(src)
        run_tool(["tar", "-xf", tarballs[0], "-C", src, "--strip-components=1"], timeout=BUILD_TIMEOUT)
        shutil.rmtree(work / "pkg")
        shutil.rmtree(work / "deb")
        _build_wrapper(src, config, parts, kv, work)
        built = (src / "arch/x86/boot/bzImage").read_bytes()
    check_lz4(built, payload)
    (out / BZIMAGE).write_bytes(built)
    return {
        "release": kv.release,
        "source": f"{src_pkg} {version}",
        "original_sha256": file_sha256(vmlinuz),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "compression": "lz4",
    }


def _build_wrapper(src: Path, config: Path, parts: Payload, kv: KernelVersion, work: Path) -> None:
    """kbuild, asked for ``arch/x86/boot/bzImage`` alone, around the given payload."""
    if platform.machine() != "x86_64":
        raise ImageBuildError(f"repacking an x86 kernel needs an x86_64 host compiler; this host is {platform.machine()}")
    # a parent make's jobserver and an ARCH/CROSS_COMPILE of the caller's are not this build's
    skip = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES", "ARCH", "CROSS_COMPILE", "O", "KBUILD_OUTPUT"}
    env = {k: v for k, v in os.environ.items() if k not in skip}
    env.update({"LC_ALL": "C", "KBUILD_BUILD_TIMESTAMP": "", "KBUILD_BUILD_USER": kv.user,
                "KBUILD_BUILD_HOST": kv.host})  # fmt: skip
    jobs = f"-j{os.cpu_count() or 1}"
    make = ["make", "-s", jobs, f"KERNELRELEASE={kv.release}"]

    def step(*argv: str | Path) -> None:
        run_tool(argv, cwd=src, env=env, timeout=BUILD_TIMEOUT)

    shutil.copyfile(config, src / ".config")
    # the payload's compression, and nothing a wrapper build does not reach (certificates
    # and BTF belong to the kernel proper, which is not rebuilt)
    step("scripts/config", "--disable", "KERNEL_XZ", "--enable", "KERNEL_LZ4",
         "--set-str", "SYSTEM_TRUSTED_KEYS", "", "--set-str", "SYSTEM_REVOCATION_KEYS", "",
         "--disable", "DEBUG_INFO_BTF")  # fmt: skip
    step(*make, "olddefconfig")
    if "CONFIG_KERNEL_LZ4=y" not in (src / ".config").read_text().splitlines():
        raise ImageBuildError(f"{config}: this kernel's Kconfig does not offer KERNEL_LZ4")
    step(*make, "prepare")
    # what the full build would have generated before the boot wrapper needs it
    step(*make, "drivers/firmware/efi/libstub/")
    step(*make, "arch/x86/kernel/cpu/capflags.o")
    tables = run_tool(["awk", "-f", "arch/x86/tools/gen-insn-attr-x86.awk", "arch/x86/lib/x86-opcode-map.txt"],
                      cwd=src, env=env)  # fmt: skip
    (src / "arch/x86/lib/inat-tables.c").write_bytes(tables)
    (src / "include/generated/utsversion.h").write_text(f'#define UTS_VERSION "{kv.uts_version}"\n')
    # the payload as kbuild's `vmlinux`: `objcopy -S` gives back the payload's ELF, and the
    # symbols voffset.h is made from are added (absolute addresses by section offsets)
    (work / "vmlinux.bin").write_bytes(parts.elf)
    add: list[str] = []
    for name, (section, offset) in parts.vo_placements().items():
        add += ["--add-symbol", f"{name}={section}:{offset:#x},global"]
    step("objcopy", *add, work / "vmlinux.bin", src / "vmlinux")
    (work / "vmlinux.relocs").write_bytes(parts.relocs)
    relocs = work / "relocs"
    relocs.write_text(f'#!/bin/sh\n[ "$1" = --abs-relocs ] && exit 0\nexec cat "{work / "vmlinux.relocs"}"\n')
    relocs.chmod(0o755)
    extra = work / "wrapper.mk"
    extra.write_text("harness-bzimage: prepare\n\t$(Q)$(MAKE) $(build)=arch/x86/boot arch/x86/boot/bzImage\n")
    step(*make, "-f", "Makefile", "-f", extra, f"CMD_RELOCS={relocs}", "harness-bzimage")


def check_lz4(built: bytes, payload: bytes) -> None:
    """The new image's payload must be LZ4 (legacy frames, as the kernel's decoder reads
    them) and unpack to exactly Debian's payload."""
    image = read_bzimage(built, "the rebuilt bzImage")
    if not image.payload.startswith(LZ4_LEGACY_MAGIC):
        raise ImageBuildError(f"the rebuilt bzImage's payload is not LZ4 (starts {image.payload[:4].hex()})")
    out = run_tool(["lz4", "-d", "-c"], stdin=image.payload[:-4], timeout=300)
    if out != payload:
        raise ImageBuildError(
            f"the rebuilt bzImage's payload unpacks to {len(out)} bytes that differ from Debian's {len(payload)}"
        )
