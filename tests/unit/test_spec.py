"""VmSpec validation and its translation to QEMU arguments (pure, no QEMU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import SpecError
from harness.spec import RamImage, Resolved, VmSpec, from_dict, guest_config_text, qemu_args


def resolved(**kw: object) -> Resolved:
    base: dict[str, object] = dict(
        accel="tcg", machine="q35", code=Path("/fw/CODE.fd"), vars=Path("/w/vars.fd"),
        esp=Path("/img/esp.img"), kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd"),
        cmdline="console=ttyS0", serial_sock=Path("/w/s.sock"), serial_log=Path("/w/s.log"),
        fwcfg_file=Path("/w/cfg"), ssh_port=2222,
    )
    base.update(kw)
    return Resolved(**base)  # type: ignore[arg-type]


def joined(args: list[str]) -> str:
    return " ".join(args)


def test_split_pflash_code_readonly_and_private_vars() -> None:
    args = qemu_args(VmSpec(), resolved())
    text = joined(args)
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd" in text
    assert "if=pflash,format=raw,unit=1,file=/w/vars.fd" in text
    assert "readonly=on,file=/w/vars.fd" not in text
    assert "-kernel" not in args


def test_ssh_forward_binds_loopback_only() -> None:
    text = joined(qemu_args(VmSpec(), resolved()))
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in text
    assert "hostfwd=tcp::" not in text


def test_direct_kernel_boot_with_seabios() -> None:
    spec = VmSpec(firmware=None, boot="direct")
    args = qemu_args(spec, resolved(code=None, vars=None, esp=None))
    assert args[args.index("-kernel") + 1] == "/img/vmlinuz"
    assert args[args.index("-append") + 1] == "console=ttyS0"
    assert "pflash" not in joined(args)


def test_memory_backends() -> None:
    f = joined(qemu_args(VmSpec(memory_backend="file"), resolved(ram_path=Path("/w/ram"))))
    assert "memory-backend-file,id=ram0,size=1024M,mem-path=/w/ram,share=on" in f
    assert "memory-backend=ram0" in f
    m = joined(qemu_args(VmSpec(memory_backend="memfd", aux_ram_share=True), resolved()))
    assert "memory-backend-memfd,id=ram0,size=1024M,share=on" in m
    assert "aux-ram-share=on" in m
    with pytest.raises(SpecError, match="RAM file"):
        qemu_args(VmSpec(memory_backend="file"), resolved())


def test_ram_image_under_the_default_ram_id() -> None:
    """A snapshot's RAM image: shared for the template, private (and read-only where the
    build can) for a restore, always under the id default RAM migrates as."""
    tmpl = joined(qemu_args(VmSpec(), resolved(ram_image=RamImage(Path("/s/ram,img"), shared=True))))
    assert "memory-backend-file,id=pc.ram,size=1024M,mem-path=/s/ram,,img,share=on" in tmpl
    assert "q35,accel=tcg,memory-backend=pc.ram" in tmpl
    restore = joined(qemu_args(VmSpec(), resolved(ram_image=RamImage(Path("/s/ram"), shared=False))))
    assert "mem-path=/s/ram,share=off -" in restore
    ro = joined(qemu_args(VmSpec(), resolved(ram_image=RamImage(Path("/s/ram"), shared=False, readonly=True))))
    assert "mem-path=/s/ram,share=off,readonly=on,rom=off" in ro
    arm = joined(qemu_args(VmSpec(arch="aarch64", machine="virt"),
                           resolved(machine="virt", ram_image=RamImage(Path("/s/ram"), shared=True))))  # fmt: skip
    assert "memory-backend-file,id=mach-virt.ram," in arm and "memory-backend=mach-virt.ram" in arm
    assert "memory-backend" not in joined(qemu_args(VmSpec(), resolved()))
    with pytest.raises(SpecError, match="plain RAM.*'memfd'"):
        qemu_args(VmSpec(memory_backend="memfd"), resolved(ram_image=RamImage(Path("/s/ram"), shared=False)))


def test_migration_events_on_from_the_start() -> None:
    assert "-global migration.x-events=on" in joined(qemu_args(VmSpec(), resolved(migration_events=True)))
    assert "x-events" not in joined(qemu_args(VmSpec(), resolved()))


def test_commas_in_paths_are_escaped() -> None:
    text = joined(qemu_args(VmSpec(), resolved(vars=Path("/w/a,b.fd"))))
    assert "file=/w/a,,b.fd" in text


def test_versioned_machine_and_incoming() -> None:
    args = qemu_args(VmSpec(), resolved(machine="pc-q35-7.2", incoming=("defer",)))
    assert "pc-q35-7.2,accel=tcg" in args
    assert args[args.index("-incoming") + 1] == "defer"


def test_bootindex_and_boot_order() -> None:
    args = joined(qemu_args(VmSpec(disk_bootindex=1, boot_order="c"), resolved()))
    assert "virtio-blk-pci,drive=esp,bootindex=1" in args
    assert "-boot order=c" in args


def test_stateless_firmware_uses_combined_image() -> None:
    args = qemu_args(VmSpec(firmware_mode="stateless"), resolved(code=None, vars=None, bios=Path("/fw/OVMF.fd")))
    assert args[args.index("-bios") + 1] == "/fw/OVMF.fd"
    assert "pflash" not in joined(args)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"memory_backend": "hugepages"}, "memory_backend"),
        ({"boot": "pxe"}, "boot"),
        ({"memory_mb": 1}, "memory_mb"),
        ({"boot": "uefi", "firmware": None}, "firmware"),
        ({"uuid": "not-a-uuid"}, "uuid"),
        ({"aux_ram_share": True}, "aux_ram_share"),
        ({"name": "a b"}, "name"),
        ({"accel": "xen"}, "accel"),
        ({"guest_mem_mb": 4096}, "guest_mem_mb"),
        ({"flash": "8m"}, "flash"),
    ],
)
def test_malformed_spec_names_the_field(fields: dict[str, object], expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        VmSpec(**fields)  # type: ignore[arg-type]


def test_unknown_field_lists_known_ones() -> None:
    with pytest.raises(SpecError, match="unknown spec field.*memory_size.*known:.*memory_mb"):
        from_dict({"memory_size": 512})


def test_replace_validates() -> None:
    assert VmSpec().replace(qemu="7.2").qemu == "7.2"
    with pytest.raises(SpecError):
        VmSpec().replace(smp=0)


def test_guest_config_is_sorted_key_value_lines() -> None:
    text = guest_config_text(VmSpec(guest_mem_mb=8, seed="s1", guest_config={"ready_tag": "x"}))
    assert text == "mem_mb=8\nready_tag=x\nseed=s1\n"
    with pytest.raises(SpecError, match="guest_config"):
        VmSpec(guest_config={"Bad Key": "v"})


def test_smm_firmware_gets_smm_a_secure_varstore_chip_and_no_s3() -> None:
    text = joined(qemu_args(VmSpec(secure_boot=True), resolved(smm=True)))
    assert "-machine q35,accel=tcg,smm=on" in text
    assert "-global driver=cfi.pflash01,property=secure,value=on" in text
    assert "-global ICH9-LPC.disable_s3=1" in text
    plain = joined(qemu_args(VmSpec(), resolved()))
    assert "smm=on" not in plain and "secure,value=on" not in plain


def test_secure_boot_fields_are_validated() -> None:
    with pytest.raises(SpecError, match="spec field secure_boot=True: expected a q35 machine"):
        VmSpec(secure_boot=True, machine="pc")
    with pytest.raises(SpecError, match="spec field secure_boot=True: expected false with flash='2m'"):
        VmSpec(secure_boot=True, flash="2m")
    with pytest.raises(SpecError, match="spec field secure_boot=True: expected false unless boot='uefi'"):
        VmSpec(secure_boot=True, boot="direct", firmware=None)
    with pytest.raises(SpecError, match="spec field sb_keys='mine': expected snakeoil | ms"):
        VmSpec(sb_keys="mine")
    assert VmSpec(arch="aarch64", secure_boot=True).machine == "virt"


def test_vtpm_device_per_architecture() -> None:
    sock = Path("/run/s/tpm-0.sock")
    x86 = qemu_args(VmSpec(tpm=True), resolved(tpm_sock=sock))
    assert "socket,id=chrtpm,path=/run/s/tpm-0.sock" in x86 and "tpm-crb,tpmdev=tpm0" in x86
    assert "emulator,id=tpm0,chardev=chrtpm" in x86
    arm = qemu_args(VmSpec(tpm=True, arch="aarch64"), resolved(tpm_sock=sock, machine="virt"))
    assert "tpm-tis-device,tpmdev=tpm0" in arm
    assert "-tpmdev" not in qemu_args(VmSpec(), resolved())
