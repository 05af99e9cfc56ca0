"""Source-build inputs: hashing, cache keys, configure arguments, DFSG fixups (no compiling)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from harness.errors import ConfigError, ProvisionError
from harness.inventory import sources

pytestmark = pytest.mark.unit


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_tree_hash_covers_contents_names_and_modes(tmp_path: Path) -> None:
    a = tree(tmp_path / "a", {"VERSION": "10.0.2\n", "hw/x.c": "int x;\n"})
    b = tree(tmp_path / "b", {"VERSION": "10.0.2\n", "hw/x.c": "int x;\n"})
    assert sources.hash_source(a) == sources.hash_source(b)
    (b / "hw/x.c").write_text("int y;\n")
    assert sources.hash_source(a) != sources.hash_source(b)
    (b / "hw/x.c").write_text("int x;\n")
    (b / "hw/x.c").chmod(0o755)
    assert sources.hash_source(a) != sources.hash_source(b)
    (b / "hw/x.c").chmod(0o644)
    (b / "hw/x.c").rename(b / "hw/y.c")
    assert sources.hash_source(a) != sources.hash_source(b)


def test_tree_hash_ignores_build_and_git_dirs(tmp_path: Path) -> None:
    a = tree(tmp_path / "a", {"VERSION": "10.0.2\n"})
    before = sources.hash_source(a)
    tree(a, {"build/qemu-system-x86_64": "elf", ".git/HEAD": "ref"})
    assert sources.hash_source(a) == before


def test_tarball_hash_and_missing_source(tmp_path: Path) -> None:
    t = tmp_path / "q.tar.xz"
    t.write_bytes(b"not really a tarball")
    assert len(sources.hash_source(t)) == 64
    with pytest.raises(ConfigError, match="neither a tarball nor a directory"):
        sources.hash_source(tmp_path / "absent")


def test_key_changes_with_patches_their_order_and_args(tmp_path: Path) -> None:
    p1, p2 = tmp_path / "1.patch", tmp_path / "2.patch"
    p1.write_text("--- a\n+++ b\n")
    p2.write_text("--- c\n+++ d\n")
    args = sources.configure_args()
    base = sources.build_key("s" * 64, [], args)
    assert base == sources.build_key("s" * 64, [], args)
    keys = {
        base,
        sources.build_key("t" * 64, [], args),
        sources.build_key("s" * 64, [p1], args),
        sources.build_key("s" * 64, [p1, p2], args),
        sources.build_key("s" * 64, [p2, p1], args),
        sources.build_key("s" * 64, [], sources.configure_args(["--enable-debug"])),
    }
    assert len(keys) == 6


def test_configure_args_minimal_and_x86_64_only() -> None:
    args = sources.configure_args(["--enable-debug", "--disable-docs"])
    assert args[0] == "--target-list=x86_64-softmmu"
    assert "--enable-slirp" in args and "--disable-werror" in args
    assert args.count("--disable-docs") == 1 and args[-1] == "--enable-debug"
    with pytest.raises(ConfigError, match="only --target-list=x86_64-softmmu"):
        sources.configure_args(["--target-list=aarch64-softmmu"])


def test_label() -> None:
    assert sources.label_for("10.0.2", "0123456789abcdef") == "src:10.0.2+01234567"


def test_dfsg_fixup_only_when_blobs_absent(tmp_path: Path) -> None:
    text = "roms = []\nif unpack_edk2_blobs\n  fds = []\nendif\n"
    t = tree(tmp_path / "t", {"pc-bios/meson.build": text})
    notes = sources.apply_fixups(t)
    assert notes and "DFSG" in notes[0]
    assert "if unpack_edk2_blobs and fs.exists('edk2-x86_64-code.fd.bz2')\n" in (
        t / "pc-bios/meson.build").read_text()
    # an upstream tarball with the blobs is left alone
    u = tree(tmp_path / "u", {"pc-bios/meson.build": text, "pc-bios/edk2-x86_64-code.fd.bz2": "x"})
    assert sources.apply_fixups(u) == []
    assert (u / "pc-bios/meson.build").read_text() == text


def test_source_version(tmp_path: Path) -> None:
    assert sources.source_version(tree(tmp_path / "a", {"VERSION": "10.0.2\n"})) == "10.0.2"
    with pytest.raises(ProvisionError, match="no VERSION file"):
        sources.source_version(tmp_path / "none")
    with pytest.raises(ProvisionError, match="unexpected content"):
        sources.source_version(tree(tmp_path / "b", {"VERSION": "garbage"}))


def test_unpack_tarball_single_top_dir(tmp_path: Path) -> None:
    src = tree(tmp_path / "qemu-10.0.2", {"VERSION": "10.0.2\n", "configure": "#!/bin/sh\n"})
    tball = tmp_path / "q.tar.gz"
    with tarfile.open(tball, "w:gz") as tar:
        tar.add(src, arcname="qemu-10.0.2")
    (tmp_path / "out").mkdir()
    sources._unpack_source(tball, tmp_path / "out" / "src")
    assert (tmp_path / "out/src/VERSION").read_text() == "10.0.2\n"
    with tarfile.open(tmp_path / "two.tar", "w") as tar:
        tar.add(src / "VERSION", arcname="a/VERSION")
        tar.add(src / "VERSION", arcname="b/VERSION")
    (tmp_path / "out2").mkdir()
    with pytest.raises(ProvisionError, match="expected one top-level directory"):
        sources._unpack_source(tmp_path / "two.tar", tmp_path / "out2" / "src")
    (tmp_path / "bad.tar.xz").write_bytes(b"junk")
    with pytest.raises(ProvisionError, match="cannot unpack source tarball"):
        sources._unpack_source(tmp_path / "bad.tar.xz", tmp_path / "out2" / "src")


def test_missing_patch_refused(tmp_path: Path) -> None:
    src = tree(tmp_path / "s", {"VERSION": "10.0.2\n"})
    with pytest.raises(ConfigError, match="does not exist"):
        sources.build_qemu(src, [tmp_path / "nope.patch"], install_deps=False)
