"""The declarative VM spec and its translation to a QEMU command line.

:class:`VmSpec` says what a guest is (QEMU build, machine type, CPU, memory and its
backend, firmware and varstore, image, boot path, network, nested); :func:`qemu_args`
turns a spec plus the concrete files it resolved to (:class:`Resolved`) into arguments.
Both are pure: no QEMU is started here, so this module is unit tested without one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from harness.errors import SpecError
from harness.inventory.catalog import DEFAULT_FIRMWARE, DEFAULT_QEMU

# The closed sets of the spec's fields: types for mypy, tuples for validating text that
# comes from TOML, JSON or a command line.
MemoryBackend = Literal["plain", "file", "memfd"]
BootMode = Literal["uefi", "direct"]
FirmwareMode = Literal["split", "stateless"]
FlashLayout = Literal["4m", "2m"]
SbKeys = Literal["snakeoil", "ms"]
Accel = Literal["auto", "kvm", "tcg"]
MEMORY_BACKENDS: tuple[str, ...] = get_args(MemoryBackend)
BOOT_MODES: tuple[str, ...] = get_args(BootMode)
FIRMWARE_MODES: tuple[str, ...] = get_args(FirmwareMode)
FLASH_LAYOUTS: tuple[str, ...] = get_args(FlashLayout)
SB_KEYS: tuple[str, ...] = get_args(SbKeys)  # harness.inventory.firmware.SB_KEYS
ACCELS: tuple[str, ...] = get_args(Accel)
TPM_DEVICES = {"x86_64": "tpm-crb", "aarch64": "tpm-tis-device"}  # the vTPM's device model
# aarch64 guests run on QEMU's virt machine (AAVMF's descriptors name only virt-*).
_AARCH64_MACHINE_RE = re.compile(r"^virt(-\d+\.\d+)?$")
#: The id of a machine's default RAM backend, whose RAM block migrates under this name: a
#: RAM image (:class:`RamImage`) backend under the same id migrates to and from a guest
#: with default RAM.  An architecture missing here has no RAM images.
DEFAULT_RAM_ID = {"x86_64": "pc.ram", "aarch64": "mach-virt.ram"}
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


@dataclass(frozen=True)
class VmSpec:
    """What a guest is.  Every field has a default that boots the ``minimal`` UEFI guest.

    ``machine`` left at its default ``q35`` means ``virt`` when ``arch`` is aarch64."""

    qemu: str = DEFAULT_QEMU
    arch: str = "x86_64"
    machine: str = "q35"
    cpu: str = "max"
    smp: int = 1
    memory_mb: int = 1024
    memory_backend: MemoryBackend = "plain"
    firmware: str | None = DEFAULT_FIRMWARE
    firmware_mode: FirmwareMode = "split"
    flash: FlashLayout = "4m"
    # Secure Boot: the firmware build whose descriptor has secure-boot + enrolled-keys (and
    # on x86 requires-smm: SMM on, a secure varstore chip, S3 off), a varstore from the
    # enrolled template of sb_keys, and the image signed with that key set's key (sb_signed
    # False boots it unsigned, which the firmware must refuse).
    secure_boot: bool = False
    sb_keys: SbKeys = "snakeoil"
    sb_signed: bool = True
    tpm: bool = False  # a vTPM: one swtpm per QEMU process (harness.tpm)
    boot: BootMode = "uefi"
    image: str = "minimal"
    ssh: bool = True
    # user-mode networking with restrict=on: the guest reaches nothing outside it (not the
    # host's loopback services); only the explicit forwards (sshd) reach in.  False gives
    # the guest slirp's outbound NAT.
    net_restrict: bool = True
    accel: Accel = "auto"
    guest_mem_mb: int = 16
    seed: str = "harness"
    disk_bootindex: int | None = None
    boot_order: str | None = None
    uuid: str | None = None
    aux_ram_share: bool = False
    nested: bool = False
    name: str = "vm"
    extra_args: tuple[str, ...] = ()
    guest_config: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch == "aarch64" and self.machine == "q35":
            object.__setattr__(self, "machine", "virt")  # the default, for this arch
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SpecError` naming the field and what was expected."""

        def bad(name: str, expected: str) -> SpecError:
            return SpecError(
                f"spec field {name}={getattr(self, name)!r}: expected {expected}"
            )

        if not isinstance(self.qemu, str) or not self.qemu:
            raise bad("qemu", "a QEMU version such as '10.0.2' or a path")
        # types first: the checks below (and qemu_args) assume them
        for name in ("arch", "machine", "cpu", "image", "seed", "name"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")
        for name in ("firmware", "boot_order", "uuid"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise bad(name, "a string or None")
        for name in ("ssh", "net_restrict", "aux_ram_share", "nested", "secure_boot", "sb_signed", "tpm"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.disk_bootindex is not None and (
            isinstance(self.disk_bootindex, bool) or not isinstance(self.disk_bootindex, int)
        ):
            raise bad("disk_bootindex", "an integer or None")
        if not isinstance(self.guest_config, Mapping):
            raise bad("guest_config", "a mapping of keys to one-line values")
        if self.memory_backend not in MEMORY_BACKENDS:
            raise bad("memory_backend", " | ".join(MEMORY_BACKENDS))
        if self.boot not in BOOT_MODES:
            raise bad("boot", " | ".join(BOOT_MODES))
        if self.firmware_mode not in FIRMWARE_MODES:
            raise bad("firmware_mode", " | ".join(FIRMWARE_MODES))
        if self.flash not in FLASH_LAYOUTS:
            raise bad("flash", " | ".join(FLASH_LAYOUTS))
        if self.accel not in ACCELS:
            raise bad("accel", " | ".join(ACCELS))
        if not isinstance(self.memory_mb, int) or not 64 <= self.memory_mb <= 1 << 20:
            raise bad("memory_mb", "an integer number of MiB, at least 64")
        if not isinstance(self.smp, int) or not 1 <= self.smp <= 64:
            raise bad("smp", "an integer from 1 to 64")
        if not isinstance(self.guest_mem_mb, int) or not 0 <= self.guest_mem_mb < self.memory_mb // 2:
            raise bad("guest_mem_mb", "an integer below half of memory_mb")
        if self.arch == "aarch64" and not _AARCH64_MACHINE_RE.match(self.machine):
            raise bad("machine", "virt or a versioned virt-X.Y for arch='aarch64'")
        if self.boot == "uefi" and self.firmware is None:
            raise bad("firmware", "a firmware version when boot='uefi' (None means SeaBIOS)")
        if self.sb_keys not in SB_KEYS:
            raise bad("sb_keys", " | ".join(SB_KEYS))
        if self.secure_boot:
            if self.boot != "uefi" or self.firmware_mode != "split":
                raise bad("secure_boot", "false unless boot='uefi' with split flash (the varstore holds the keys)")
            if self.flash != "4m":
                raise bad("secure_boot", "false with flash='2m' (Secure Boot builds come as 4m pairs)")
            if self.arch == "x86_64" and not (self.machine == "q35" or self.machine.startswith("pc-q35")):
                raise bad("secure_boot", "a q35 machine on x86_64 (OVMF's Secure Boot build requires SMM)")
        if self.uuid is not None and not _UUID_RE.match(self.uuid):
            raise bad("uuid", "a UUID such as 12345678-1234-1234-1234-123456789abc")
        if self.aux_ram_share and self.memory_backend == "plain":
            raise bad("aux_ram_share", "a shared memory_backend ('file' or 'memfd')")
        if not isinstance(self.extra_args, tuple) or not all(isinstance(a, str) for a in self.extra_args):
            raise bad("extra_args", "a tuple of strings")
        if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.name):
            raise bad("name", "1-64 characters from A-Z a-z 0-9 _ . -")
        for k, v in self.guest_config.items():
            if not re.match(r"^[a-z0-9_]+$", str(k)) or "\n" in str(v):
                raise SpecError(f"spec field guest_config[{k!r}]: expected key [a-z0-9_]+ and a one-line value")

    def replace(self, **changes: Any) -> VmSpec:
        """A copy with ``changes`` applied (validated)."""
        return from_dict({**dataclasses.asdict(self), **changes})

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["extra_args"] = list(self.extra_args)
        data["guest_config"] = dict(self.guest_config)
        return data


_FIELDS = {f.name for f in dataclasses.fields(VmSpec)}


def from_dict(data: Mapping[str, Any]) -> VmSpec:
    """A spec from a mapping; unknown keys are refused with the list of known ones."""
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise SpecError(
            f"unknown spec field(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}"
        )
    values = dict(data)
    if "extra_args" in values and isinstance(values["extra_args"], list):
        values["extra_args"] = tuple(values["extra_args"])
    try:
        return VmSpec(**values)
    except TypeError as exc:
        raise SpecError(f"malformed spec: {exc}") from exc


@dataclass(frozen=True)
class RamImage:
    """A plain-RAM guest's RAM in a file: a snapshot's RAM image (harness/snapshots.py).

    ``shared``: the guest writes the file (the snapshot's template, saved with
    ``x-ignore-shared`` so that the state holds no RAM); otherwise a private copy-on-write
    mapping of it (a restored guest: nothing to load, the file is never written).
    ``readonly``: open it read-only, as RAM (``rom=off``, QEMU 8.2 and later)."""

    path: Path
    shared: bool
    readonly: bool = False


@dataclass(frozen=True)
class Resolved:
    """The concrete files and resources a spec resolved to for one QEMU process."""

    accel: str
    machine: str
    code: Path | None = None
    vars: Path | None = None
    bios: Path | None = None
    esp: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    data_disk: Path | None = None
    serial_sock: Path | None = None
    serial_log: Path | None = None
    fwcfg_file: Path | None = None
    ram_path: Path | None = None
    ram_image: RamImage | None = None
    #: the ``events`` migration capability on from the start (``-global migration.x-events``):
    #: MIGRATION status events wake the harness's waits, and no hop spends a QMP call on it
    migration_events: bool = False
    ssh_port: int | None = None
    incoming: tuple[str, ...] = ()
    smm: bool = False  # the firmware requires SMM: smm=on, a secure varstore chip, S3 off
    tpm_sock: Path | None = None  # the vTPM's swtpm control socket


def guest_config_text(spec: VmSpec) -> str:
    """The agent's configuration, passed through fw_cfg as ``opt/harness/config``."""
    cfg = {"mem_mb": str(spec.guest_mem_mb), "seed": spec.seed, **spec.guest_config}
    return "".join(f"{k}={v}\n" for k, v in sorted(cfg.items()))


def _opt(value: str) -> str:
    """Escape a value for QEMU's option syntax (commas double)."""
    return value.replace(",", ",,")


def qemu_args(spec: VmSpec, r: Resolved) -> list[str]:
    """The QEMU arguments for ``spec`` (QMP, display and data dirs are added by the caller)."""
    args: list[str] = ["-nodefaults", "-no-user-config"]
    machine = [r.machine, f"accel={r.accel}"]
    if r.ram_image is not None and spec.memory_backend != "plain":
        raise SpecError(f"a RAM image is for plain RAM; this spec's memory_backend is {spec.memory_backend!r}")
    if spec.memory_backend != "plain":
        machine.append("memory-backend=ram0")
    elif r.ram_image is not None:
        if spec.arch not in DEFAULT_RAM_ID:
            raise SpecError(f"a RAM image needs a known default RAM id; arch {spec.arch!r} has none")
        machine.append(f"memory-backend={DEFAULT_RAM_ID[spec.arch]}")
    if spec.aux_ram_share:
        machine.append("aux-ram-share=on")
    if r.smm:
        machine.append("smm=on")
    args += ["-machine", ",".join(machine)]
    if r.smm:  # as libvirt does for a secure loader: only SMM may write the varstore chip
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on",
                 "-global", "ICH9-LPC.disable_s3=1"]  # fmt: skip
    cpu = spec.cpu
    if r.accel == "kvm" and spec.nested and cpu == "max":
        cpu = "host"
    args += ["-cpu", cpu, "-smp", str(spec.smp), "-m", f"{spec.memory_mb}M"]
    if spec.memory_backend == "file":
        if r.ram_path is None:
            raise SpecError("memory_backend='file' needs a RAM file path")
        args += ["-object", f"memory-backend-file,id=ram0,size={spec.memory_mb}M,"
                 f"mem-path={_opt(str(r.ram_path))},share=on"]  # fmt: skip
    elif spec.memory_backend == "memfd":
        args += ["-object", f"memory-backend-memfd,id=ram0,size={spec.memory_mb}M,share=on"]
    elif r.ram_image is not None:
        img = r.ram_image
        mode = "share=on" if img.shared else "share=off,readonly=on,rom=off" if img.readonly else "share=off"
        args += ["-object", f"memory-backend-file,id={DEFAULT_RAM_ID[spec.arch]},size={spec.memory_mb}M,"
                 f"mem-path={_opt(str(img.path))},{mode}"]  # fmt: skip
    if spec.uuid:
        args += ["-uuid", spec.uuid]
    if r.migration_events:
        args += ["-global", "migration.x-events=on"]

    # firmware
    if spec.firmware is not None and spec.firmware_mode == "split":
        if r.code is None or r.vars is None:
            raise SpecError("split flash needs firmware code and a private varstore")
        args += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(str(r.code))}",
            "-drive", f"if=pflash,format=raw,unit=1,file={_opt(str(r.vars))}",
        ]  # fmt: skip
    elif spec.firmware is not None:  # stateless: the combined image, variables in RAM only
        if r.bios is None:
            raise SpecError("stateless firmware needs the combined firmware image")
        args += ["-bios", str(r.bios)]

    # boot media
    if spec.boot == "direct":
        if r.kernel is None or r.initrd is None:
            raise SpecError("boot='direct' needs the image's kernel and initrd")
        args += ["-kernel", str(r.kernel), "-initrd", str(r.initrd), "-append", r.cmdline]
    if r.esp is not None:
        dev = "virtio-blk-pci,drive=esp"
        if spec.disk_bootindex is not None:
            dev += f",bootindex={spec.disk_bootindex}"
        args += [
            "-drive", f"file={_opt(str(r.esp))},if=none,id=esp,format=raw,readonly=on",
            "-device", dev,
        ]  # fmt: skip
    if r.data_disk is not None:
        args += [
            "-drive", f"file={_opt(str(r.data_disk))},if=none,id=data,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=data",
        ]  # fmt: skip
    if spec.boot_order:
        args += ["-boot", f"order={spec.boot_order}"]

    if r.tpm_sock is not None:
        args += ["-chardev", f"socket,id=chrtpm,path={_opt(str(r.tpm_sock))}",
                 "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                 "-device", f"{TPM_DEVICES.get(spec.arch, 'tpm-crb')},tpmdev=tpm0"]  # fmt: skip

    # guest agent configuration
    if r.fwcfg_file is not None:
        args += ["-fw_cfg", f"name=opt/harness/config,file={_opt(str(r.fwcfg_file))}"]

    # network: user mode, sshd forwarded on loopback only
    if spec.ssh:
        if r.ssh_port is None:
            raise SpecError("ssh=True needs a forwarded port")
        args += [
            "-netdev", f"user,id=net0,restrict={'on' if spec.net_restrict else 'off'},"
                       f"hostfwd=tcp:127.0.0.1:{r.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=net0,romfile=",
        ]  # fmt: skip

    # serial console: a socket we may write to, and a log of everything
    if r.serial_sock is not None and r.serial_log is not None:
        args += [
            "-chardev", f"socket,id=serial0,path={_opt(str(r.serial_sock))},server=on,"
            f"wait=off,logfile={_opt(str(r.serial_log))}",
            "-serial", "chardev:serial0",
        ]  # fmt: skip
    for inc in r.incoming:
        args += ["-incoming", inc]
    args += list(spec.extra_args)
    return args
