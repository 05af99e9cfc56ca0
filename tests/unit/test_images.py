"""Unit tests of harness.images: recipes, input hashing, the cache, module ordering,
modinfo parsing, the cpio writer and UKI section placement (no QEMU, no downloads)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import images
from harness.errors import CatalogError, ConfigError, ImageBuildError
from harness.images import (
    Builder,
    CpioWriter,
    DebSet,
    kernel_package_of,
    kernel_release_of,
    load_order,
    load_recipe,
    mem_region_checksum,
    modinfo_fields,
    module_depends,
    pe_image_end,
)
from harness.images import builder as image_builder
from harness.inventory import provision

DATA = Path(__file__).parent / "data" / "images"


# --- recipes ---------------------------------------------------------------------------


def test_shipped_recipes_load() -> None:
    assert {"minimal", "nested-l1"} <= set(images.list_images())
    minimal = load_recipe("minimal")
    nested = load_recipe("nested-l1")
    assert minimal.nested is None and minimal.kernel_meta == "linux-image-amd64"
    # nested-l1 extends minimal: its packages plus its own modules
    assert set(minimal.debs) <= set(nested.debs)
    assert set(minimal.boot_modules) < set(nested.boot_modules)
    assert "ext4" in nested.boot_modules and "kvm_amd" in nested.extra_modules
    assert nested.nested is not None and nested.nested.l2_image == "minimal"
    assert [p.name for p in nested.files] == ["minimal.toml", "nested-l1.toml"]


def _copy_recipes(tmp_path: Path) -> Path:
    dest = tmp_path / "recipes"
    shutil.copytree(images.RECIPES_DIR, dest)
    return dest


def test_unknown_recipe_and_bad_extends(tmp_path: Path) -> None:
    recipes = _copy_recipes(tmp_path)
    with pytest.raises(ConfigError, match="no image recipe 'nope'"):
        load_recipe("nope", recipes)
    (recipes / "a.toml").write_text('extends = "b"\n')
    (recipes / "b.toml").write_text('extends = "a"\n')
    with pytest.raises(CatalogError, match="cycle"):
        load_recipe("a", recipes)
    (recipes / "c.toml").write_text('extends = "missing"\n')
    with pytest.raises(CatalogError, match="unknown recipe 'missing'"):
        load_recipe("c", recipes)


def test_recipe_field_types_checked(tmp_path: Path) -> None:
    recipes = _copy_recipes(tmp_path)
    text = (recipes / "minimal.toml").read_text()
    (recipes / "minimal.toml").write_text(text.replace('suite = "bookworm"', "suite = 12"))
    with pytest.raises(CatalogError, match="'suite' must be str"):
        load_recipe("minimal", recipes)


def test_kernel_repack_is_checked(tmp_path: Path) -> None:
    assert load_recipe("minimal").kernel_repack == "lz4"
    assert load_recipe("nested-l1").kernel_repack == "lz4"  # inherited: L1 and L2 alike
    assert load_recipe("minimal-aarch64").kernel_repack is None
    recipes = _copy_recipes(tmp_path)
    text = (recipes / "minimal.toml").read_text()
    (recipes / "minimal.toml").write_text(text.replace('repack = "lz4"', 'repack = "gzip"'))
    with pytest.raises(CatalogError, match="'kernel.repack' must be 'lz4' or 'none', got 'gzip'"):
        load_recipe("minimal", recipes)
    (recipes / "minimal.toml").write_text(text.replace('repack = "lz4"', 'repack = "none"'))
    assert load_recipe("minimal", recipes).kernel_repack is None
    arm = (recipes / "minimal-aarch64.toml").read_text()
    (recipes / "minimal-aarch64.toml").write_text(arm.replace('meta = "', 'repack = "lz4"\nmeta = "', 1))
    with pytest.raises(CatalogError, match="for x86_64 kernels only"):
        load_recipe("minimal-aarch64", recipes)


# --- input hashing ---------------------------------------------------------------------


def _debset(tmp_path: Path, sha: str = "a" * 64) -> DebSet:
    return DebSet(
        tmp_path,
        "linux-image-6.1.0-50-amd64",
        {"busybox.deb": {"package": "busybox-static", "version": "1", "sha256": sha, "size": 1}},
    )


def test_inputs_hash_covers_recipe_debs_and_extra(tmp_path: Path) -> None:
    recipes = _copy_recipes(tmp_path)
    debs = _debset(tmp_path)
    first = Builder(load_recipe("minimal", recipes)).inputs_hash(debs)
    assert Builder(load_recipe("minimal", recipes)).inputs_hash(debs) == first

    path = recipes / "minimal.toml"
    path.write_text(path.read_text() + "\n# a comment is a change\n")
    changed_recipe = Builder(load_recipe("minimal", recipes)).inputs_hash(debs)
    assert changed_recipe != first

    builder = Builder(load_recipe("minimal", recipes))
    assert builder.inputs_hash(_debset(tmp_path, "b" * 64)) != changed_recipe
    assert builder.inputs_hash(debs, ["l2:other"]) != changed_recipe


def test_inputs_hash_covers_agent_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = tmp_path / "agent"
    shutil.copytree(images.AGENT_DIR, agent)
    monkeypatch.setattr(image_builder, "AGENT_DIR", agent)
    builder = Builder(load_recipe("minimal"))
    before = builder.inputs_hash(_debset(tmp_path))
    (agent / "agent").write_text((agent / "agent").read_text() + "\n# changed\n")
    assert builder.inputs_hash(_debset(tmp_path)) != before


# --- the cache -------------------------------------------------------------------------


class FakeBuilder(Builder):
    """Skips downloads and real tools; writes a small image and counts builds."""

    builds = 0

    def debset(self, refresh: bool = False) -> DebSet:
        return _debset(images_root())

    def _build(self, out: Path, debs: DebSet, digest: str, context: Any) -> None:
        FakeBuilder.builds += 1
        for name in (images.ESP_IMG, images.UKI, images.KERNEL, images.INITRD):
            (out / name).write_bytes(name.encode() * 100)
        (out / images.CLIENT_KEY).write_bytes(b"key")
        meta = {"name": self.name, "arch": "x86_64", "cmdline": "console=ttyS0",
                "inputs_hash": digest, "host_key": "ssh-ed25519 AAAA", "data_disk": False}  # fmt: skip
        (out / images.IMAGE_JSON).write_text(json.dumps(meta))
        provision.write_manifest(out, {"kind": "image"})


def images_root() -> Path:
    return images.images_dir()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private cache where the fake builder may build (unit tests may not fetch)."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    FakeBuilder.builds = 0
    with provision.provisioning(allowed=True):
        yield tmp_path / "cache"


def test_cached_image_is_reused(cache: Path) -> None:
    builder = FakeBuilder(load_recipe("minimal"))
    first = builder.ensure()
    assert FakeBuilder.builds == 1
    assert first.root.parent == cache / "images"
    assert first.root.name == f"minimal-{first.inputs_hash[:16]}"
    assert builder.ensure() == first
    assert FakeBuilder.builds == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda root: (root / images.INITRD).write_bytes(b"short"),  # truncated file
        lambda root: (root / images.ESP_IMG).unlink(),  # missing file
        lambda root: (root / "harness-prefix.json").unlink(),  # partial: no manifest
        lambda root: (root / "harness-prefix.json").write_text("{not json"),
    ],
)
def test_corrupt_cache_entry_is_rebuilt(cache: Path, damage: Any) -> None:
    builder = FakeBuilder(load_recipe("minimal"))
    image = builder.ensure()
    damage(image.root)
    again = builder.ensure()
    assert FakeBuilder.builds == 2
    assert again.root == image.root
    assert provision.verify_prefix(again.root) is None


def test_failed_build_leaves_no_entry(cache: Path) -> None:
    class Failing(FakeBuilder):
        def _build(self, out: Path, debs: DebSet, digest: str, context: Any) -> None:
            (out / "half").write_text("x")
            raise ImageBuildError("boom")

    with pytest.raises(ImageBuildError, match="boom"):
        Failing(load_recipe("minimal")).ensure()
    assert not [p for p in (cache / "images").iterdir() if p.name.startswith("minimal")]


def test_read_debset_rejects_size_mismatch(tmp_path: Path) -> None:
    (tmp_path / "x.deb").write_bytes(b"12345")
    record = {"kernel_package": "linux-image-6.1.0-1-amd64",
              "debs": {"x.deb": {"package": "x", "version": "1", "sha256": "0", "size": 5}}}  # fmt: skip
    (tmp_path / images.DEBS_JSON).write_text(json.dumps(record))
    found = images.read_debset(tmp_path)
    assert found is not None and found.paths() == [tmp_path / "x.deb"]
    (tmp_path / "x.deb").write_bytes(b"1234")
    assert images.read_debset(tmp_path) is None


# --- kernel and modules ----------------------------------------------------------------


def test_kernel_package_from_meta_depends() -> None:
    pkg = kernel_package_of("linux-image-6.1.0-50-amd64 (= 6.1.176-1)")
    assert pkg == "linux-image-6.1.0-50-amd64"
    assert kernel_release_of(pkg) == "6.1.0-50-amd64"
    with pytest.raises(ImageBuildError):
        kernel_package_of("initramfs-tools")
    with pytest.raises(ImageBuildError):
        kernel_release_of("busybox")


FAKE_MODINFO = {
    "virtio_net": ["net_failover", "virtio", "virtio_ring"],
    "net_failover": ["failover"],
    "failover": [],
    "virtio": [],
    "virtio_ring": ["virtio"],
    "virtio_pci": ["virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio", "virtio_ring"],
    "virtio_pci_legacy_dev": [],
    "virtio_pci_modern_dev": [],
    "kvm_amd": ["kvm", "ccp"],
    "kvm": ["irqbypass"],
    "irqbypass": [],
    "ccp": [],
}


def test_load_order_puts_dependencies_first() -> None:
    order = load_order(["virtio_pci", "virtio_net", "kvm-amd"], FAKE_MODINFO)
    for name, deps in FAKE_MODINFO.items():
        if name in order:
            for dep in deps:
                assert order.index(dep) < order.index(name), (dep, name, order)
    assert len(order) == len(set(order)) == len(FAKE_MODINFO)
    assert order[-1] == "kvm_amd"


def test_load_order_reports_missing_and_cycles() -> None:
    with pytest.raises(ImageBuildError, match="'ghost' not found.*needed by kvm"):
        load_order(["kvm"], {"kvm": ["ghost"]})
    with pytest.raises(ImageBuildError, match="cycle: a -> b -> a"):
        load_order(["a"], {"a": ["b"], "b": ["a"]})


def _fake_ko(modinfo: bytes) -> bytes:
    """A minimal ELF64 file with a .shstrtab and a .modinfo section."""
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    data_off = 64
    body = shstrtab + modinfo
    shoff = data_off + len(body)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)

    def sh(name: int, offset: int, size: int) -> bytes:
        entry = bytearray(64)
        struct.pack_into("<I", entry, 0, name)
        struct.pack_into("<QQ", entry, 0x18, offset, size)
        return bytes(entry)

    sections = (
        sh(0, 0, 0)
        + sh(1, data_off, len(shstrtab))
        + sh(11, data_off + len(shstrtab), len(modinfo))
    )
    return bytes(header) + body + sections


def test_modinfo_depends_parsed_from_elf() -> None:
    ko = _fake_ko(b"license=GPL\0depends=net_failover,virtio-ring\0name=virtio_net\0")
    assert modinfo_fields(ko)["name"] == ["virtio_net"]
    assert module_depends(ko) == ["net_failover", "virtio_ring"]
    assert module_depends(_fake_ko(b"depends=\0name=virtio\0")) == []
    with pytest.raises(ImageBuildError, match="not a little-endian ELF64"):
        modinfo_fields(b"MZ" + bytes(100))
    no_modinfo = _fake_ko(b"").replace(b".modinfo", b".notinfo")
    with pytest.raises(ImageBuildError, match="no .modinfo"):
        modinfo_fields(no_modinfo)


# --- initramfs, UKI --------------------------------------------------------------------


def test_cpio_writer_output_is_read_by_cpio(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin/busybox").write_bytes(b"\x7fELF" + bytes(7))
    (root / "bin/sh").symlink_to("busybox")
    (root / "init").write_text("#!/bin/sh\n")
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    writer.add_tree(root)
    writer.add_chardev("dev/console", 5, 1)
    writer.finish()
    assert len(buf.getvalue()) % 4 == 0
    if shutil.which("cpio") is None:
        pytest.skip("cpio not installed")
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=buf.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    names = [
        line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()
    ]
    assert names == ["bin", "bin/busybox", "bin/sh", "init", "dev/console"]
    console = next(line for line in listing.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console.replace("5, 1", "5,   1")
    assert "bin/sh -> busybox" in listing
    assert all(" root " in line or " 0 " in line for line in listing.splitlines())


def test_pe_image_end_from_recorded_stub_headers() -> None:
    text = (DATA / "linuxx64-stub-objdump.txt").read_text()
    # systemd-boot-efi 252's stub: SizeOfImage 0x19300, last section .sdmagic ends there
    assert pe_image_end(text) == 0x19300
    with pytest.raises(ImageBuildError):
        pe_image_end("no sections here")


# --- memory region ---------------------------------------------------------------------


def test_mem_region_checksum_matches_layout() -> None:
    assert mem_region_checksum(0, "x") == hashlib.md5(b"").hexdigest()
    digest = hashlib.sha256(b"s").hexdigest()
    pages = b"".join(
        f"harness-mem seed=s page={p}".ljust(63).encode() + b"\n" + (digest * 63).encode()
        for p in range(256)
    )
    assert len(pages) == 1 << 20
    assert mem_region_checksum(1, "s") == hashlib.md5(pages).hexdigest()
    assert mem_region_checksum(1, "t") != mem_region_checksum(1, "s")


def test_the_image_carries_the_checksums_of_the_default_regions() -> None:
    # the spec's defaults and the L2 config `agent l2 start` writes: their regions are
    # not hashed in the guest at boot (the image's /etc/harness/mem.md5 says their MD5)
    from harness.images.builder import KNOWN_REGIONS
    from harness.spec import VmSpec

    spec = VmSpec()
    assert (spec.guest_mem_mb, spec.seed) in KNOWN_REGIONS
    agent = (images.AGENT_DIR / "agent").read_text()
    l2 = re.search(r"printf 'mem_mb=(\d+)\\nseed=([\w.-]+)\\n", agent)
    assert l2 is not None, "the L2 config line of `agent l2 start` moved"
    assert (int(l2.group(1)), l2.group(2)) in KNOWN_REGIONS
    assert 'done </etc/harness/mem.md5' in agent  # where mem-fill reads them
