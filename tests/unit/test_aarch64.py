"""aarch64 support without booting: catalogue entries, the spec's virt machine and its
QEMU arguments, AAVMF selection and blank templates, the minimal-aarch64 recipe and the
image builder's cross tools (no QEMU, no downloads except AAVMF already provisioned)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness import images
from harness.errors import CatalogError, ConfigError, SpecError, VarstoreError
from harness.inventory import catalog
from harness.inventory.firmware import MiB, is_blank, load_build
from harness.spec import Resolved, VmSpec, from_dict, qemu_args

# --- catalogue ---------------------------------------------------------------------------


def test_catalogue_has_aarch64_qemu_and_aavmf_side_by_side() -> None:
    cat = catalog.default()
    arm = {q.version: q for q in cat.qemu if q.arch == "aarch64"}
    assert {"7.2", "10.0.2"} <= set(arm)
    for q in arm.values():
        assert q.binary == "usr/bin/qemu-system-aarch64"
        assert q.packages[0].name == "qemu-system-arm"
        assert q.key == f"qemu-{q.version}-aarch64"
    assert arm["10.0.2"].packages[0].suite == "bookworm-backports"
    fws = {f.version: f for f in cat.firmware if f.arch == "aarch64"}
    assert set(fws) == {"2020.11", "2022.11", "2025.02", "2026.08"}
    assert {f.package for f in fws.values()} == {"qemu-efi-aarch64"}
    assert fws["2025.02"].suite == "trixie"


def test_arch_keeps_versions_apart() -> None:
    cat = catalog.default()
    # the same version exists for both arches; the default stays x86_64
    assert cat.qemu_entry("10.0.2").binary == "usr/bin/qemu-system-x86_64"
    assert cat.qemu_entry("10.0.2", "aarch64").binary == "usr/bin/qemu-system-aarch64"
    assert cat.firmware_entry("2022.11").package == "ovmf"
    assert cat.firmware_entry("2022.11", "aarch64").package == "qemu-efi-aarch64"
    with pytest.raises(Exception, match="5.2"):  # no aarch64 5.2: the error lists what exists
        cat.qemu_entry("5.2", "aarch64")


# --- spec --------------------------------------------------------------------------------


def _resolved(**kw: object) -> Resolved:
    base: dict[str, object] = dict(
        accel="tcg", machine="virt-7.2", code=Path("/fw/AAVMF_CODE.fd"),
        vars=Path("/w/vars.fd"), esp=Path("/img/esp.img"), kernel=Path("/img/vmlinuz"),
        initrd=Path("/img/initrd"), cmdline="console=ttyAMA0", serial_sock=Path("/w/s.sock"),
        serial_log=Path("/w/s.log"), fwcfg_file=Path("/w/cfg"), ssh_port=2222,
    )  # fmt: skip
    base.update(kw)
    return Resolved(**base)  # type: ignore[arg-type]


def test_aarch64_default_machine_is_virt_and_x86_unchanged() -> None:
    assert VmSpec().machine == "q35"
    assert VmSpec(arch="aarch64").machine == "virt"
    assert from_dict({"arch": "aarch64"}).machine == "virt"
    assert VmSpec(arch="aarch64", machine="virt-7.2").machine == "virt-7.2"
    # replace() keeps the resolved machine
    assert VmSpec(arch="aarch64").replace(cpu="cortex-a57").machine == "virt"


@pytest.mark.parametrize("machine", ["pc-q35-7.2", "pc", "virt-", "virt-7", "virtual"])
def test_aarch64_refuses_x86_machine_types(machine: str) -> None:
    with pytest.raises(SpecError, match="machine=.*virt or a versioned virt-X.Y"):
        VmSpec(arch="aarch64", machine=machine)


def test_aarch64_qemu_args() -> None:
    spec = VmSpec(arch="aarch64", machine="virt-7.2", cpu="cortex-a57", disk_bootindex=1)
    args = qemu_args(spec, _resolved())
    text = " ".join(args)
    assert args[args.index("-machine") + 1] == "virt-7.2,accel=tcg"
    assert args[args.index("-cpu") + 1] == "cortex-a57"
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/fw/AAVMF_CODE.fd" in text
    assert "if=pflash,format=raw,unit=1,file=/w/vars.fd" in text
    assert "virtio-blk-pci,drive=esp,bootindex=1" in text
    assert "virtio-net-pci,netdev=net0,romfile=" in text
    assert "-fw_cfg name=opt/harness/config,file=/w/cfg" in text
    assert "-bios" not in args and "-kernel" not in args


# --- firmware ----------------------------------------------------------------------------


def _aavmf_prefix(root: Path, vars_data: bytes) -> Path:
    share = root / "usr/share/AAVMF"
    share.mkdir(parents=True)
    (share / "AAVMF_CODE.fd").write_bytes(b"\x01" * 4096)
    (share / "AAVMF_VARS.fd").write_bytes(vars_data)
    desc = {
        "description": "UEFI firmware for aarch64", "interface-types": ["uefi"],
        "mapping": {"device": "flash",
                    "executable": {"filename": "/usr/share/AAVMF/AAVMF_CODE.fd", "format": "raw"},
                    "nvram-template": {"filename": "/usr/share/AAVMF/AAVMF_VARS.fd", "format": "raw"}},
        "targets": [{"architecture": "aarch64", "machines": ["virt-*"]}],
        "features": [], "tags": [],
    }  # fmt: skip
    fw = root / "usr/share/qemu/firmware"
    fw.mkdir(parents=True)
    (fw / "60-edk2-aarch64.json").write_text(json.dumps(desc))
    return root


def test_aavmf_selected_for_virt_by_default(tmp_path: Path) -> None:
    build = load_build(_aavmf_prefix(tmp_path, bytes(4096)), version="9.9", arch="aarch64",
                       package="qemu-efi-aarch64")  # fmt: skip
    assert build.select().name == "60-edk2-aarch64.json"
    assert build.select(machine="virt").name == "60-edk2-aarch64.json"
    assert build.default.code.name == "AAVMF_CODE.fd"
    with pytest.raises(Exception, match="no firmware for .*machine=pc-q35"):
        build.select(machine="pc-q35-*")


def test_is_blank(tmp_path: Path) -> None:
    blank = tmp_path / "blank.fd"
    blank.write_bytes(bytes(3 * MiB))
    assert is_blank(blank)
    one = tmp_path / "one.fd"
    one.write_bytes(bytes(3 * MiB - 1) + b"\x01")  # a single byte at the very end
    assert not is_blank(one)
    with pytest.raises(VarstoreError, match="cannot read"):
        is_blank(tmp_path / "absent.fd")


# --- images ------------------------------------------------------------------------------


def test_minimal_has_an_aarch64_variant() -> None:
    x86 = images.recipe_for("minimal")
    assert x86.name == "minimal" and x86.arch == "x86_64"
    assert images.recipe_for("minimal", "x86_64") == x86
    arm = images.recipe_for("minimal", "aarch64")
    assert arm.name == "minimal-aarch64" and arm.arch == "aarch64" and arm.deb_arch == "arm64"
    assert arm.kernel_meta == "linux-image-arm64"
    assert arm.stub.endswith("linuxaa64.efi.stub")
    assert (arm.libdir, arm.loader, arm.boot_file) == (
        "lib/aarch64-linux-gnu", "lib/ld-linux-aarch64.so.1", "BOOTAA64.EFI")
    assert arm.tools is not None and arm.tools.objcopy.endswith("aarch64-linux-gnu-objcopy")
    assert "console=ttyAMA0" in arm.cmdline
    # the same agent modules as x86 (virtio core is built in on arm64)
    assert set(arm.boot_modules) == set(x86.boot_modules)


def test_x86_recipe_layout_defaults_are_unchanged() -> None:
    x86 = images.load_recipe("minimal")
    assert (x86.libdir, x86.loader, x86.boot_file) == (
        "lib/x86_64-linux-gnu", "lib64/ld-linux-x86-64.so.2", "BOOTX64.EFI")
    assert x86.tools is None
    b = images.Builder(x86)
    assert b._tool(None, "objcopy") == (["objcopy"], None)
    assert b._tool(None, "emulator") == ([], None)
    assert b._lib_dirs() == ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64",
                             "lib", "usr/lib")  # fmt: skip


def test_cross_tools_run_from_their_prefix(tmp_path: Path) -> None:
    b = images.Builder(images.recipe_for("minimal", "aarch64"))
    (tmp_path / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    argv, env = b._tool(tmp_path, "objcopy")
    assert argv == [tmp_path / "usr/bin/aarch64-linux-gnu-objcopy"]
    assert env is not None and env["LD_LIBRARY_PATH"] == str(tmp_path / "usr/lib/x86_64-linux-gnu")
    argv, _env = b._tool(tmp_path, "emulator")
    assert argv == [tmp_path / "usr/bin/qemu-aarch64-static"]


def test_no_variant_for_other_arch_names_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="'nested-l1' is for x86_64, not aarch64.*'nested-l1-aarch64'"):
        images.recipe_for("nested-l1", "aarch64")
    with pytest.raises(ConfigError, match="is for aarch64, not x86_64"):
        images.recipe_for("minimal-aarch64", "x86_64")


def _recipes(tmp_path: Path) -> Path:
    dest = tmp_path / "recipes"
    shutil.copytree(images.RECIPES_DIR, dest)
    return dest


def test_variant_of_wrong_arch_is_refused(tmp_path: Path) -> None:
    recipes = _recipes(tmp_path)
    text = (recipes / "minimal-aarch64.toml").read_text()
    (recipes / "minimal-riscv64.toml").write_text(text)  # claims aarch64
    with pytest.raises(ConfigError, match="'minimal-riscv64' is for aarch64, not riscv64"):
        images.recipe_for("minimal", "riscv64", recipes)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('libdir = "lib/aarch64-linux-gnu"', 'libdir = "../etc"', "'libdir' must be a relative path"),
        ('loader = "lib/ld-linux-aarch64.so.1"', 'loader = "/lib/ld.so"', "'loader' must be a relative"),
        ('boot_file = "BOOTAA64.EFI"', "boot_file = 3", "field 'esp.boot_file' must be str"),
        ('emulator = "usr/bin/qemu-aarch64-static"', "", "missing field 'tools.emulator'"),
    ],
)
def test_malformed_cross_fields(tmp_path: Path, old: str, new: str, expected: str) -> None:
    recipes = _recipes(tmp_path)
    path = recipes / "minimal-aarch64.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    with pytest.raises(CatalogError, match=expected):
        images.load_recipe("minimal-aarch64", recipes)


def test_arch_variant_hashes_apart(tmp_path: Path) -> None:
    sha = "a" * 64
    debs = images.DebSet(tmp_path, "linux-image-x", {"b.deb": {"package": "b", "version": "1",
                                                               "sha256": sha, "size": 1}})  # fmt: skip
    x86 = images.Builder(images.recipe_for("minimal")).inputs_hash(debs)
    arm = images.Builder(images.recipe_for("minimal", "aarch64")).inputs_hash(debs)
    assert x86 != arm

