"""The running guest: a VM built from a :class:`~harness.spec.VmSpec`.

A :class:`Machine` is one guest's identity (spec, image, firmware, varstore, SSH keys,
work directory) and owns the QEMU process that currently runs it.  Migrations and live
updates start a new process for the same guest (:meth:`Machine.spawn`) and, once the
guest runs there, :meth:`Machine.adopt` it, reaping the old one: the guest object a test
holds stays the same while the QEMU under it changes.

Ownership: every process a Machine spawns is tracked until reaped; :meth:`Machine.stop`
(and ``__exit__``) reaps all of them, gracefully then hard, and never raises for a
process that already died.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from harness.errors import (
    FirmwareError,
    GuestTimeout,
    HarnessError,
    LaunchError,
    MachineError,
    VarstoreError,
)
from harness.guest import speed
from harness.guest.console import Console
from harness.guest.qemu_process import QemuProcess
from harness.inventory import builds, host
from harness.inventory.builds import QemuBuild
from harness.spec import RamImage, Resolved, VmSpec, guest_config_text, qemu_args

if TYPE_CHECKING:
    from harness.guest.swtpm import Swtpm
    from harness.inventory import firmware as firmware_mod
from harness.guest.ssh import DETACHED, CommandResult, SshClient

log = logging.getLogger(__name__)

READY_RE = re.compile(r"HARNESS-READY (\{[^\n]{0,4096}\})")
DEFAULT_BOOT_TIMEOUT = float(os.environ.get("HARNESS_BOOT_TIMEOUT", "240"))
# OVMF and AAVMF print their first console line within ~2-10 s under TCG here (more under
# load); firmware that prints nothing for this long has hung before its console came up
# (OVMF 2025.02 on QEMU 5.2), and the boot gives up then instead of at the full timeout.
# edk2's BDS when Secure Boot refuses an image (the only boot image of a harness guest)
SB_REFUSED_RE = re.compile(r"BdsDxe: failed to load Boot[0-9A-F]{4} [^\n]*: (?:Access Denied|Security Violation)")
FIRMWARE_SILENCE_S = float(os.environ.get("HARNESS_FIRMWARE_SILENCE", "90"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sweep_orphan_dirs(base: Path, prefix: str) -> list[Path]:
    """Remove the directories ``<prefix>-<pid>-*`` under ``base`` whose owning harness
    process is gone: a SIGKILLed run cannot clean up, and its QEMU died with it
    (parent-death signal).  Returns what was removed."""
    import shutil

    removed = []
    for d in orphan_dirs(base, prefix):
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def orphan_dirs(base: Path, prefix: str) -> list[Path]:
    """The directories ``<prefix>-<pid>-*`` (or ``<prefix>-<pid><tag>-*``) under ``base``
    that this user owns and whose owning process is gone."""
    out: list[Path] = []
    try:
        candidates = list(base.glob(f"{prefix}-*-*"))
    except OSError:
        return out
    for d in candidates:
        owner = re.match(r"\d+", d.name[len(prefix) + 1 :])
        if owner is None or int(owner.group()) == os.getpid():
            continue
        try:
            if d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not Path(f"/proc/{owner.group()}").exists():
            out.append(d)
    return out


def sweep_orphan_ram_dirs(base: Path) -> list[Path]:
    """Guest-RAM directories (``hv-ram-<pid>-*``, up to the guest's RAM size in /dev/shm)
    of dead owners: see :func:`sweep_orphan_dirs`."""
    return sweep_orphan_dirs(base, "hv-ram")


def sweep_all_orphans(root: Path) -> list[Path]:
    """Everything a killed run may have left: private work dirs (``hv-<pid>*``, a soak's
    ``hvsoak-<pid>-*``) and socket dirs (``hvk-<pid>-*``) under ``root``, guest-RAM dirs in
    /dev/shm (``hv-ram-<pid>-*``)."""
    removed = [d for prefix in ("hv", "hvk", "hvsoak") for d in sweep_orphan_dirs(root, prefix)]
    shm = Path("/dev/shm")
    if shm.is_dir():
        removed += sweep_orphan_ram_dirs(shm)
    return removed


_SWEPT: set[Path] = set()


def _socket_root() -> Path:
    """Where guests' socket directories go: the run directory (``HARNESS_RUNDIR``) when its
    path is short enough for unix sockets inside it (107 bytes), else the temp directory."""
    import tempfile

    rundir = os.environ.get("HARNESS_RUNDIR")
    if rundir and len(rundir) <= 48 and Path(rundir).is_dir():
        return Path(rundir)
    return Path(tempfile.gettempdir())


@dataclass
class Ready:
    """What the guest's agent said when it came up."""

    boot_id: str
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Incarnation:
    """One QEMU process running (or about to run) the guest."""

    process: QemuProcess[QemuBuild]
    resolved: Resolved
    varstore: Path | None
    console: Console
    tpm: Swtpm | None = None  # its vTPM (VmSpec.tpm), reaped with it


class Machine:
    """A guest built from a spec, and the QEMU process(es) that run it."""

    def __init__(
        self,
        spec: VmSpec,
        workdir: Path,
        *,
        varstore: Path | None = None,
        build: QemuBuild | None = None,
    ) -> None:
        from harness import images

        self.spec = spec
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(workdir, 0o700)
        self.build = build or builds.get_build(spec.qemu, spec.arch)
        self.accel = host.default_accel() if spec.accel == "auto" else spec.accel
        if spec.accel == "auto" and spec.arch != os.uname().machine:
            self.accel = "tcg"  # a guest of another architecture than the host's: emulated
        self.image = images.ensure_image(spec.image, spec.arch)
        self._sb: firmware_mod.SecureBootPair | None = None
        self._tpm_state: Path | None = None
        self._code, self._template, self._bios = self._firmware_files()
        self._esp = self._boot_disk()
        self._varstore_arg = varstore
        self._gen = 0
        self._current: Incarnation | None = None
        self._others: list[Incarnation] = []
        self._ssh: SshClient | None = None
        self.ready: Ready | None = None
        self.history: list[dict[str, Any]] = []
        self._ram_dir: Path | None = None
        self._sock_dir: Path | None = None
        self._last_varstore: Path | None = varstore

    # -- resolution ---------------------------------------------------------------------

    def _firmware_files(self) -> tuple[Path | None, Path | None, Path | None]:
        spec = self.spec
        if spec.firmware is None:
            return None, None, None
        from harness.inventory import firmware

        fw = firmware.get_firmware(spec.firmware, spec.arch)
        if spec.firmware_mode == "stateless":
            bios = fw.prefix / "usr/share/ovmf/OVMF.fd"
            if not bios.is_file():
                raise FirmwareError(
                    f"firmware {fw.version} has no combined image {bios} for stateless mode"
                )
            return None, None, bios
        if spec.secure_boot:
            self._sb = fw.secure_boot_pair(spec.sb_keys, spec.machine)
            return self._sb.code, self._sb.template, None
        desc = fw.variant(spec.flash) if spec.flash != "4m" else fw.select()
        return desc.code, desc.vars_template, None

    def _boot_disk(self) -> Path:
        """The ESP image: for Secure Boot, signed with the enrolled key set's key (unless
        the spec asks for the unsigned one)."""
        from harness import images

        if self._sb is None or not self.spec.sb_signed:
            return self.image.esp
        if self._sb.key is None or self._sb.cert is None:
            raise FirmwareError(f"{self.spec.name}: no key to sign the image for sb_keys="
                                f"{self.spec.sb_keys!r}; use sb_keys='snakeoil'")  # fmt: skip
        return images.signed_esp(self.image, self._sb.key, self._sb.cert, self._sb.passphrase)

    @property
    def secure_boot(self) -> firmware_mod.SecureBootPair | None:
        """The Secure Boot firmware in use (descriptor, template, signing key), if any."""
        return self._sb

    def use_firmware(self, version: str, *, flash: str | None = None,
                     allow_size_change: bool = False) -> None:
        """Processes spawned from now on use firmware build ``version`` (CODE and varstore
        template of the spec's flash layout, or of ``flash``), as after a host's OVMF
        package upgrade; the running process keeps its image.  The flash size must stay
        the same unless ``allow_size_change`` (to provoke a size mismatch on purpose)."""
        from harness.inventory import firmware

        old_code = self._code
        if old_code is None or self.spec.firmware_mode != "split":
            raise FirmwareError(f"{self.spec.name}: only split-pflash guests can change firmware")
        self.spec = self.spec.replace(firmware=version, flash=flash or self.spec.flash)
        code, template, _bios = self._firmware_files()
        assert code is not None and template is not None
        if code.stat().st_size != old_code.stat().st_size and not allow_size_change:
            raise FirmwareError(
                f"firmware {version} CODE {code} is {code.stat().st_size} bytes, the running "
                f"guest's {old_code} is {old_code.stat().st_size}: a migration cannot change "
                "the flash size"
            )
        firmware.check_flash_pair(code, template)
        self._code, self._template = code, template

    def _check_varstore_kind(self, path: Path) -> None:
        """Secure Boot code needs a varstore with keys enrolled: a plain one would boot in
        setup mode, enforcing nothing, and every Secure Boot check would be moot."""
        if self._sb is None:
            return
        from harness import varstore

        if varstore.read_varstore(path).get("PK") is None:
            raise VarstoreError(path, f"has no Secure Boot keys enrolled (no PK), but {self.spec.name} boots the "
                                      f"Secure Boot build {self._sb.code.name}; expected a varstore made from an "
                                      f"enrolled template such as {self._sb.template}")  # fmt: skip

    @property
    def firmware_code(self) -> Path | None:
        return self._code

    @property
    def varstore_template(self) -> Path | None:
        return self._template

    def new_varstore(self, name: str) -> Path:
        """A fresh private copy of the firmware's varstore template in the work dir."""
        from harness import varstore

        if self._template is None:
            raise VarstoreError(name, "this guest has no persistent varstore")
        dest = self.workdir / name
        # No fsync: QEMU's own writes to the copy are not synced either (the guest's flash is
        # as durable as the page cache), and the copy goes with the work directory
        varstore.instantiate(self._template, dest, durable=False)
        return dest

    def _resolve(self, gen: int, varstore: Path | None, incoming: Sequence[str],
                 machine: str | None, build: QemuBuild, ram_image: RamImage | None = None) -> Resolved:
        img = self.image
        fwcfg = self.workdir / "guest-config.txt"
        if not fwcfg.exists():
            fwcfg.write_text(guest_config_text(self.spec))
        ram = None
        if self.spec.memory_backend == "file":
            ram = self.ram_dir() / "guest-ram"
        return Resolved(
            accel=self.accel,
            machine=machine or self.spec.machine,
            code=self._code,
            vars=varstore,
            bios=self._bios,
            esp=self._esp if self.spec.boot == "uefi" else None,
            smm=self._sb is not None and self._sb.requires_smm,
            kernel=img.kernel,
            initrd=img.initrd,
            cmdline=img.cmdline,
            data_disk=img.data_disk,
            serial_sock=self.sock_dir / f"qemu-{gen}.serial.sock",
            serial_log=self.workdir / f"qemu-{gen}.serial.log",
            fwcfg_file=fwcfg,
            ram_path=ram,
            ram_image=ram_image,
            migration_events=build.capabilities.has_capability("events"),
            ssh_port=free_port() if self.spec.ssh else None,
            incoming=tuple(incoming),
        )

    def ram_dir(self) -> Path:
        """A private tmpfs directory for file-backed guest RAM (shared across CPR)."""
        if self._ram_dir is None:
            import tempfile

            shm = Path("/dev/shm")
            base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.workdir
            sweep_orphan_ram_dirs(base)
            # the owner's pid in the name lets a later run remove it if we are SIGKILLed
            self._ram_dir = Path(tempfile.mkdtemp(prefix=f"hv-ram-{os.getpid()}-", dir=base))
        return self._ram_dir

    @property
    def sock_dir(self) -> Path:
        """A private 0700 directory with a short path for this guest's unix sockets
        (serial, migration, CPR): socket paths are limited to 107 bytes, and work
        directories under a test's tmp_path can be longer than that."""
        if self._sock_dir is None:
            import tempfile

            root = _socket_root()
            if root not in _SWEPT:  # once per directory and process
                sweep_orphan_dirs(root, "hvk")
                _SWEPT.add(root)
            # the owner's pid in the name lets a later run remove it if we are SIGKILLed
            self._sock_dir = Path(tempfile.mkdtemp(prefix=f"hvk-{os.getpid()}-", dir=root))
        return self._sock_dir

    # -- processes --------------------------------------------------------------------

    def spawn(
        self,
        *,
        build: QemuBuild | None = None,
        machine: str | None = None,
        varstore: Path | None = None,
        incoming: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        defer_qmp: bool = False,
        ram_image: RamImage | None = None,
    ) -> Incarnation:
        """Start a new QEMU process for this guest (not yet adopted).

        ``varstore`` defaults to a fresh copy of the template for each new process, as for
        an incoming domain (QEMU writes the migrated flash into it).  ``ram_image``: this
        process's RAM is that file (a snapshot's, see :mod:`harness.snapshots`)."""
        build = build or self.build
        gen = self._gen
        self._gen += 1
        if self._code is not None and varstore is None:
            varstore = self.new_varstore(f"vars-{gen}.fd")
        elif varstore is not None and not incoming:
            self._check_varstore_kind(varstore)  # a caller's varstore the firmware will boot from
        if self._code is not None and varstore is not None:
            from harness.inventory import firmware

            firmware.check_flash_pair(self._code, varstore)  # raises, naming the file
        last: LaunchError | None = None
        for _attempt in range(3):
            vtpm = self._start_tpm(gen, incoming)
            resolved = self._resolve(gen, varstore, incoming, machine, build, ram_image)
            if vtpm is not None:
                resolved = dataclasses.replace(resolved, tpm_sock=vtpm.ctrl_sock)
            args = qemu_args(self.spec, resolved) + list(extra_args)
            proc = QemuProcess(build, args, workdir=self.workdir, name=f"qemu-{gen}",
                               defer_qmp=defer_qmp)
            console = Console(resolved.serial_log or Path(os.devnull), resolved.serial_sock,
                              alive=lambda p=proc: p.running)  # type: ignore[misc]
            inc = Incarnation(proc, resolved, varstore, console, vtpm)
            try:
                proc.launch()
            except BaseException as exc:
                if vtpm is not None:
                    vtpm.stop()
                if not isinstance(exc, LaunchError):
                    raise
                last = exc
                if "host forwarding" in exc.output or "Address already in use" in exc.output:
                    continue  # the port was taken between probing and binding: try another
                raise
            self._others.append(inc)
            self.history.append({"gen": gen, "qemu": build.label, "machine": resolved.machine,
                                 "pid": proc.pid, "incoming": list(incoming)})  # fmt: skip
            return inc
        assert last is not None
        raise last

    def prepare_exec(self, *, build: QemuBuild, machine: str,
                     incoming: Sequence[str]) -> tuple[Incarnation, list[str], Path]:
        """The next image of the current process, for cpr-exec: a new incarnation (fresh
        varstore copy, serial socket, SSH port) that the *same* :class:`QemuProcess` will
        run once it exec's.  Returns it, the complete argv to exec (``build.command()``
        first, so any build can follow any other) and the new QMP socket's path; nothing is
        started here."""
        gen = self._gen
        self._gen += 1
        varstore = None
        if self._code is not None:
            varstore = self.new_varstore(f"vars-{gen}.fd")
            from harness.inventory import firmware

            firmware.check_flash_pair(self._code, varstore)  # raises, naming the file
        resolved = self._resolve(gen, varstore, incoming, machine, build)
        vtpm = self._start_tpm(gen, incoming)  # the new image's own vTPM (state from the stream)
        if vtpm is not None:
            resolved = dataclasses.replace(resolved, tpm_sock=vtpm.ctrl_sock)
        qmp_path = self.sock_dir / f"qmp-{gen}.sock"
        argv = [
            *build.command(), *build.data_args(), "-display", "none", "-vga", "none",
            "-chardev", f"socket,id=mon,path={qmp_path},server=on,wait=off",
            "-mon", "chardev=mon,mode=control", *qemu_args(self.spec, resolved),
        ]  # fmt: skip
        proc = self.current.process
        console = Console(resolved.serial_log or Path(os.devnull), resolved.serial_sock,
                          alive=lambda p=proc: p.running)  # type: ignore[misc]
        return Incarnation(proc, resolved, varstore, console, vtpm), argv, qmp_path

    def _make_current(self, inc: Incarnation) -> None:
        """``inc`` runs the guest from now on: its build and varstore; SSH reconnects."""
        self._current = inc
        self.build = inc.process.build
        if inc.varstore is not None:
            self._last_varstore = inc.varstore
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None

    def adopt_exec(self, inc: Incarnation) -> None:
        """The current process now runs ``inc``'s image (after a cpr-exec): the process is
        the same and stays owned; only the old image's console and SSH are closed."""
        previous = self.current
        if inc.process is not previous.process:
            raise MachineError(f"{self.spec.name}: adopt_exec of another process")
        previous.console.close()
        if previous.tpm is not None:
            previous.tpm.stop()  # the old image's vTPM; the new image brought its own
        self._make_current(inc)
        self.history.append({"serial_log": str(inc.resolved.serial_log),
                             "qemu": inc.process.build.label, "machine": inc.resolved.machine,
                             "pid": inc.process.pid, "exec": True,
                             "incoming": list(inc.resolved.incoming)})  # fmt: skip

    def adopt(self, inc: Incarnation, *, reap_previous: bool = True) -> None:
        """Make ``inc`` the process that runs the guest; reap the previous one."""
        previous = self._current
        if inc in self._others:
            self._others.remove(inc)
        self._make_current(inc)
        if previous is not None and reap_previous:
            self._reap(previous)
        elif previous is not None:
            self._others.append(previous)

    def release(self, inc: Incarnation, *, hard: bool = False) -> None:
        """Reap a process this machine spawned (a failed destination, say)."""
        if inc is self._current:
            self._current = None
            if self._ssh is not None:
                self._ssh.close()
                self._ssh = None
        if inc in self._others:
            self._others.remove(inc)
        self._reap(inc, hard=hard)

    def _reap(self, inc: Incarnation, hard: bool = False) -> None:
        inc.console.close()
        try:
            if hard:
                inc.process.kill()
            else:
                inc.process.stop(timeout=10)
        finally:
            if inc.tpm is not None:
                inc.tpm.stop()

    def _start_tpm(self, gen: int, incoming: Sequence[str]) -> Swtpm | None:
        """The vTPM of process ``gen``: a fresh state directory for a migration's
        destination (the state comes in the stream), the previous one for a restart."""
        if not self.spec.tpm:
            return None
        from harness.guest.swtpm import Swtpm

        if incoming or self._tpm_state is None:
            self._tpm_state = self.workdir / f"tpm-{gen}"
        return Swtpm(self._tpm_state, self.sock_dir / f"tpm-{gen}.sock",
                     self.workdir / f"swtpm-{gen}.log").start()
    @property
    def current(self) -> Incarnation:
        if self._current is None:
            raise MachineError(f"{self.spec.name}: no QEMU process runs this guest")
        return self._current

    @property
    def process(self) -> QemuProcess[QemuBuild]:
        return self.current.process

    @property
    def running(self) -> bool:
        return self._current is not None and self._current.process.running

    # -- start and stop -----------------------------------------------------------------

    def start(self, timeout: float = DEFAULT_BOOT_TIMEOUT, wait_ssh: bool = True, *,
              ram_image: RamImage | None = None) -> Machine:
        """Boot the guest and wait until its agent is ready (and SSH answers); with
        ``ram_image``, its RAM is that file (a snapshot's template)."""
        varstore = self._varstore_arg
        if self._code is not None:
            if varstore is None:
                varstore = self.new_varstore("vars.fd")
            elif not varstore.exists():
                from harness import varstore as vs

                assert self._template is not None
                vs.instantiate(self._template, varstore)
            else:
                from harness import varstore as vs
                from harness.inventory import firmware

                # a caller's varstore is input: refuse a corrupt one, naming it, before
                # QEMU and OVMF see it (OVMF would silently reformat or misbehave); a
                # blank one is as good as a blank template (AAVMF before 2025.02)
                assert self._template is not None
                if not (firmware.is_blank(self._template) and firmware.is_blank(varstore)):
                    vs.read_varstore(varstore)
        t0 = time.monotonic()
        inc = self.spawn(varstore=varstore, ram_image=ram_image)
        self.adopt(inc)
        try:
            self.wait_ready(timeout, t0=t0)
            if wait_ssh and self.spec.ssh:
                self.ssh.connect(timeout=max(30.0, timeout - (time.monotonic() - t0)))
                speed.note_boot(self.boot_kind(), time.monotonic() - t0)
        except BaseException:
            self.stop(hard=True)
            raise
        return self

    def boot_kind(self) -> dict[str, object]:
        """What makes one cold boot comparable with another (:mod:`harness.guest.speed`)."""
        s = self.spec
        return {"arch": s.arch, "image": s.image, "firmware_mode": s.firmware_mode,
                "secure_boot": bool(s.secure_boot), "accel": self.accel, "qemu": self.build.label}  # fmt: skip

    def wait_ready(self, timeout: float = DEFAULT_BOOT_TIMEOUT, *, t0: float | None = None,
                   since: int = 0, silence: float | None = None) -> Ready:
        """Wait for the agent's ready line on the current console (a console still empty
        after ``silence`` seconds, default :data:`FIRMWARE_SILENCE_S`, fails early with
        :class:`~harness.errors.ConsoleSilent`)."""
        start = time.monotonic() if t0 is None else t0
        silence = FIRMWARE_SILENCE_S if silence is None else silence
        m = self.console.wait_for(READY_RE, timeout, since=since, silence=silence,
                                  what="the agent's HARNESS-READY line",
                                  refuse=SB_REFUSED_RE if getattr(self, "_sb", None) is not None else None)  # fmt: skip
        try:
            info = json.loads(m.group(1))
        except (ValueError, RecursionError) as exc:  # guest output: deep nesting too
            raise MachineError(f"malformed ready line {m.group(0)[:200]!r}") from exc
        if not isinstance(info, dict) or not isinstance(info.get("boot_id"), str):
            raise MachineError(f"ready line without boot_id: {m.group(0)[:200]!r}")
        self.ready = Ready(info["boot_id"], time.monotonic() - start, info)
        return self.ready

    def poweroff_from_inside(self, timeout: float = 120.0) -> None:
        """Power the guest off from inside (``poweroff -f``) and wait for QEMU to exit; QEMU
        has then written every flash change to the varstore file."""
        self.ssh.run(DETACHED.format(cmd="poweroff -f"), timeout=30, check=True)
        self.ssh.close()
        self.wait_poweroff(timeout)

    def cold_restart(self, timeout: float = DEFAULT_BOOT_TIMEOUT) -> None:
        """Power the guest off from inside (QEMU exits, its varstore file complete) and boot
        it in a new QEMU process of the current build with the same varstore (and vTPM
        state): what a host does to restart a domain."""
        path, old = self.varstore_path, self.current
        self.poweroff_from_inside()
        self.release(old)  # exited already: closes its console, reaps it (and its vTPM)
        t0 = time.monotonic()
        self.adopt(self.spawn(varstore=path))
        self.wait_ready(timeout, t0=t0)
        if self.spec.ssh:
            self.ssh.connect(timeout=max(30.0, timeout - (time.monotonic() - t0)))

    def stop(self, timeout: float = 20.0, hard: bool = False) -> None:
        """Reap every QEMU process of this guest; errors are logged, never raised."""
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        incs = ([self._current] if self._current else []) + list(self._others)
        self._current = None
        self._others = []
        for inc in incs:
            try:
                inc.console.close()
                if hard:
                    inc.process.kill()
                else:
                    inc.process.stop(timeout=timeout)
            except Exception:  # noqa: BLE001 - keep reaping the rest
                log.exception("reaping %s failed", inc.process.name)
            finally:
                if inc.tpm is not None:
                    inc.tpm.stop()
        if self._ram_dir is not None:
            import shutil

            shutil.rmtree(self._ram_dir, ignore_errors=True)
            self._ram_dir = None
        if self._sock_dir is not None:
            import shutil

            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(hard=exc_type is not None and not issubclass(exc_type, HarnessError))

    # -- access -------------------------------------------------------------------------

    @property
    def console(self) -> Console:
        return self.current.console

    @property
    def varstore_path(self) -> Path:
        """The varstore file of the process running the guest (or that last ran it)."""
        v = self.current.varstore if self._current else self._last_varstore
        if v is None:
            raise VarstoreError(self.workdir, "this guest has no persistent varstore")
        return v

    @property
    def ssh_port(self) -> int:
        port = self.current.resolved.ssh_port
        if port is None:
            raise MachineError(f"{self.spec.name}: spec has ssh=False")
        return port

    @property
    def ssh(self) -> SshClient:
        """SSH to the guest through its forwarded port, host key pinned."""
        if self._ssh is None:
            self._ssh = SshClient("127.0.0.1", self.ssh_port, self.image.host_key,
                                  self.image.client_key, name=self.spec.name)
        return self._ssh

    def qmp(self, cmd: str, **args: Any) -> Any:
        """A QMP command to the process running the guest."""
        return self.current.process.qmp(cmd, **args)

    def run(self, command: str, timeout: float = 120.0, check: bool = True) -> CommandResult:
        return self.ssh.run(command, timeout=timeout, check=check)

    def agent(self, *args: str, timeout: float = 120.0) -> Any:
        """Ask the guest agent; returns its JSON answer."""
        cmd = "agent " + " ".join(shlex.quote(a) for a in args)
        return self.ssh.run(cmd, timeout=timeout, check=True).json()

    def artifacts(self) -> list[Path]:
        """Files worth keeping when a test fails."""
        return sorted(p for p in self.workdir.iterdir() if p.is_file() and not p.name.endswith(".sock")
                      and p.name != "guest-ram")

    def wait_poweroff(self, timeout: float = 60.0) -> None:
        """Wait for the guest to power itself off."""
        try:
            self.process.wait_exit(timeout)
        except GuestTimeout:
            raise
        self._current = None

    def __repr__(self) -> str:
        return f"<Machine {self.spec.name} {self.build.label} {self.spec.firmware}>"


@contextlib.contextmanager
def booted(spec: VmSpec, workdir: Path, **kw: Any) -> Iterator[Machine]:
    """A started guest that is reaped on exit, whatever happens."""
    m = Machine(spec, workdir, **kw)
    with m:
        m.start()
        yield m
