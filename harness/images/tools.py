"""Host tools an image build runs: ESP, signing, ELF and PE inspection, file helpers."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from harness.errors import ImageBuildError
from harness.paths import ensure_dir

log = logging.getLogger(__name__)

TOOL_TIMEOUT = 600.0

# --- tools -----------------------------------------------------------------------------


def make_esp(uki: Path, dest: Path, boot_file: str, size_mb: int) -> None:
    """A FAT ESP disk image holding ``uki`` as the removable-media boot file."""
    dest.unlink(missing_ok=True)
    run_tool(["mkfs.vfat", "-C", "-n", "HARNESS-ESP", dest, str(size_mb * 1024)])
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    run_tool(["mmd", "-i", dest, "::/EFI", "::/EFI/BOOT"], env=env)
    run_tool(["mcopy", "-i", dest, uki, f"::/EFI/BOOT/{boot_file}"], env=env)


#: The removable-media boot file per guest architecture (UEFI spec 3.5.1.1).
BOOT_FILES = {"x86_64": "BOOTX64.EFI", "aarch64": "BOOTAA64.EFI"}


def write_plain_key(key: Path, dest: Path, passphrase: bytes | None) -> None:
    """``key`` (PEM, perhaps encrypted) unencrypted at ``dest`` (mode 0600), for tools that
    would prompt for the passphrase."""
    from cryptography.hazmat.primitives import serialization

    try:
        pkey = serialization.load_pem_private_key(key.read_bytes(), password=passphrase)
    except (OSError, ValueError, TypeError) as exc:
        raise ImageBuildError(f"signing key {key}: cannot load it ({exc})") from exc
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))  # fmt: skip


def run_tool(
    cmd: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = TOOL_TIMEOUT,
) -> bytes:
    """Run a build tool; its failure becomes an :class:`ImageBuildError`."""
    argv = [str(c) for c in cmd]
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=dict(env) if env else None, input=stdin,
            capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip
    except FileNotFoundError as exc:
        raise ImageBuildError(
            f"{argv[0]} not found: install the host packages (`make host-packages`)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{' '.join(argv)} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{' '.join(argv)} failed with exit code {proc.returncode}: "
            + proc.stderr.decode(errors="replace").strip()[-1500:]
        )
    return proc.stdout


def elf_needed(binary: Path) -> list[str]:
    """The DT_NEEDED sonames of an ELF file (``objdump -p``)."""
    out = run_tool(["objdump", "-p", binary]).decode()
    return re.findall(r"^\s*NEEDED\s+(\S+)", out, re.M)


def ldd_libraries(binary: Path, library_path: Sequence[Path]) -> dict[str, Path]:
    """soname -> file of every library ``binary`` loads, as the host's ldd resolves them
    with ``library_path`` first (the loader appears under its own file name)."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(p) for p in library_path))
    out = run_tool(["ldd", binary], env=env).decode()
    libs: dict[str, Path] = {}
    for line in out.splitlines():
        line = line.strip()
        match = re.match(r"^(\S+) => (/\S+) \(0x", line)
        if match:
            libs[match.group(1)] = Path(match.group(2))
            continue
        if "not found" in line:
            raise ImageBuildError(f"ldd {binary}: {line}")
        match = re.match(r"^(/\S+) \(0x", line)
        if match:
            loader = Path(match.group(1))
            libs[loader.name] = loader
    return libs




def pe_image_end(objdump_output: str) -> int:
    """End of a PE image (ImageBase-relative): SizeOfImage, or the last section's end."""
    size = re.search(r"^SizeOfImage\s+([0-9a-fA-F]+)", objdump_output, re.M)
    base = re.search(r"^ImageBase\s+([0-9a-fA-F]+)", objdump_output, re.M)
    end = int(size.group(1), 16) if size else 0
    image_base = int(base.group(1), 16) if base else 0
    for match in re.finditer(
        r"^\s*\d+\s+\S+\s+([0-9a-fA-F]{8,})\s+([0-9a-fA-F]{8,})\s", objdump_output, re.M
    ):
        sec_size, vma = int(match.group(1), 16), int(match.group(2), 16)
        end = max(end, vma - image_base + sec_size)
    if end == 0:
        raise ImageBuildError("objdump showed no PE sections for the EFI stub")
    return end + image_base


def align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def install_file(src: Path, dest: Path, mode: int) -> None:
    ensure_dir(dest.parent)
    shutil.copyfile(src, dest)
    os.chmod(dest, mode)


def write_secret(path: Path, data: bytes) -> None:
    ensure_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def mem_region_checksum(size_mb: int, seed: str) -> str:
    """MD5 of the region ``agent mem-fill`` writes for ``size_mb`` and ``seed`` (its
    checksum detects changed pages; see ``agent mem-checksum``)."""
    digest = hashlib.sha256(seed.encode()).hexdigest()
    filler = (digest * 63).encode()
    out = hashlib.md5(usedforsecurity=False)
    for page in range(size_mb * 256):
        header = f"harness-mem seed={seed} page={page}"[:63].ljust(63) + "\n"
        out.update(header.encode() + filler)
    return out.hexdigest()
