#!/usr/bin/env python3
"""Record real QEMU migration error texts as golden samples for ``harness.signatures``.

Each case starts one or two real QEMU processes from the provisioned builds (TCG, a guest
sitting in its firmware, no disk), provokes one kind of failure, and writes what QEMU said
(the destination's stderr, the source's QMP error or ``query-migrate`` ``error-desc``) to
``tests/unit/data/signatures/<case>--<side>.txt`` with a header naming the signature it
must classify to and exactly how it was made.  Re-run to re-record::

    .venv/bin/python tools/record_signatures.py            # every case
    .venv/bin/python tools/record_signatures.py uuid-mismatch no-space
    .venv/bin/python tools/record_signatures.py --list

Every QEMU is owned by a context manager (graceful quit, then kill, always reaped); at most
two run at once.  The ``no-space`` case mounts a 256 KiB tmpfs and therefore needs root; it is
skipped with a note otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.machine import QEMUMachine
from qemu.machine.machine import AbnormalShutdown, VMLaunchFailure
from qemu.qmp import ExecuteError, QMPError

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "tests" / "unit" / "data" / "signatures"
BUILDS_DIR = Path(os.environ.get("HARNESS_CACHE", Path.home() / ".cache" / "qemu-harness")) / "builds"
OVMF = BUILDS_DIR / "ovmf-2022.11-x86_64" / "usr" / "share" / "OVMF"
TOOL = "tools/record_signatures.py"

LOG = logging.getLogger("record_signatures")


@dataclass(frozen=True)
class Build:
    """One provisioned QEMU prefix and how to run its binary."""

    version: str

    @property
    def prefix(self) -> Path:
        return BUILDS_DIR / f"qemu-{self.version}-x86_64"

    @property
    def binary(self) -> str:
        return str(self.prefix / "usr" / "bin" / "qemu-system-x86_64")

    @property
    def wrapper(self) -> list[str]:
        libs = f"{self.prefix}/usr/lib/x86_64-linux-gnu:{self.prefix}/lib/x86_64-linux-gnu"
        return ["env", f"LD_LIBRARY_PATH={libs}"]

    @property
    def data_args(self) -> list[str]:
        dirs = ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu")
        return [a for d in dirs for a in ("-L", str(self.prefix / d))]


Q52, Q72, Q10 = Build("5.2"), Build("7.2"), Build("10.0.2")


@dataclass(frozen=True)
class Sample:
    """One recorded text and where it came from."""

    case: str
    side: str  # "dest-stderr", "src-qmp", "src-error-desc", ...
    signature: str
    how: str  # how it was made, one paragraph
    commands: tuple[str, ...]
    text: str


def shell_words(args: Sequence[str]) -> str:
    """A command line for the header, with the long prefix shortened to $P."""
    out = " ".join(args)
    return out.replace(str(BUILDS_DIR), "$BUILDS")


class _Machine(QEMUMachine):
    """QEMUMachine whose log reader survives the raw bytes a corrupt stream makes QEMU print."""

    def _load_io_log(self) -> None:
        if self._qemu_log_path is not None:
            with open(self._qemu_log_path, encoding="utf-8", errors="backslashreplace") as log:
                self._iolog = log.read()


class Vm:
    """A QEMU process owned by a ``with`` block: quit, then kill, always reaped."""

    def __init__(self, build: Build, args: Sequence[str], workdir: Path, name: str) -> None:
        self.build = build
        self.name = name
        self.full_args = [*build.data_args, "-nodefaults", *args]
        self.machine = _Machine(
            build.binary,
            args=self.full_args,
            wrapper=build.wrapper,
            name=name,
            base_temp_dir=str(workdir),
            qmp_timer=30,
        )
        self.log = ""
        self.launch_error: VMLaunchFailure | None = None

    @property
    def command(self) -> str:
        return shell_words([f"qemu-{self.build.version}", *self.full_args])

    def __enter__(self) -> Vm:
        return self

    def launch(self) -> None:
        self.machine.launch()

    def try_launch(self) -> bool:
        """Launch; on failure keep QEMU's output in ``log`` and return False."""
        try:
            self.machine.launch()
        except VMLaunchFailure as exc:
            self.launch_error = exc
            self.log = exc.output or ""
            return False
        return True

    def cmd(self, name: str, **kwargs: Any) -> Any:
        return self.machine.cmd(name, **kwargs)

    def qmp_error(self, name: str, **kwargs: Any) -> str:
        """Run a command that must fail; return QEMU's error description."""
        try:
            self.machine.cmd(name, **kwargs)
        except ExecuteError as exc:
            return str(exc.error.error.desc)
        raise RuntimeError(f"{name} unexpectedly succeeded on {self.name}")

    def wait_exit(self, timeout: float) -> bool:
        """Wait for QEMU to exit by itself (a failed incoming load does)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.machine.is_running():
                return True
            time.sleep(0.1)
        return False

    def close(self) -> str:
        with contextlib.suppress(AbnormalShutdown):
            self.machine.shutdown(timeout=10)
        self.log = self.machine.get_log() or self.log
        return self.log

    def __exit__(self, *exc: object) -> None:
        self.close()


def migrate_status(vm: Vm, timeout: float = 60.0) -> dict[str, Any]:
    """Poll query-migrate until it settles; return the last answer."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = vm.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.1)
    raise TimeoutError(f"migration on {vm.name} did not settle in {timeout}s; last: {info}")


def wait_paused_inmigrate(vm: Vm, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.cmd("query-status").get("status") == "inmigrate":
            return
        time.sleep(0.05)
    raise TimeoutError(f"{vm.name} never reached inmigrate")


def stderr_lines(log: str) -> str:
    """QEMU's output, minus the blank lines; nothing else is altered."""
    return "\n".join(line for line in log.splitlines() if line.strip()) + "\n"


def q35(build: Build, machine: str = "q35", mem: str = "128") -> list[str]:
    return ["-machine", f"{machine},accel=tcg", "-m", mem]


def pflash_args(code: Path, vars_copy: Path) -> list[str]:
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
    ]


def live_pair(
    work: Path,
    src_build: Build,
    src_args: Sequence[str],
    dst_build: Build,
    dst_args: Sequence[str],
    caps: Sequence[str] = (),
    settle: float = 1.0,
) -> tuple[dict[str, Any], str, str, str]:
    """Migrate src -> dst over a unix socket; return (query-migrate, dst log, src cmd, dst cmd)."""
    sock = work / "mig.sock"
    with Vm(src_build, src_args, work, "src") as src, Vm(
        dst_build, [*dst_args, "-incoming", "defer"], work, "dst"
    ) as dst:
        src.launch()
        dst.launch()
        for cap in caps:
            for vm in (src, dst):
                vm.cmd("migrate-set-capabilities", capabilities=[{"capability": cap, "state": True}])
        dst.cmd("migrate-incoming", uri=f"unix:{sock}")
        time.sleep(settle)  # let the firmware run a little so the guest is not pristine
        src.cmd("migrate", uri=f"unix:{sock}")
        info = migrate_status(src)
        if not dst.wait_exit(15):
            raise RuntimeError(f"destination did not fail (source status {info.get('status')})")
        dst_log = dst.close()
        return info, dst_log, src.command, dst.command


def record_live(
    case: str,
    signature: str,
    how: str,
    work: Path,
    src: tuple[Build, Sequence[str]],
    dst: tuple[Build, Sequence[str]],
    caps: Sequence[str] = (),
    src_signature: str = "destination-aborted",
) -> list[Sample]:
    info, dst_log, src_cmd, dst_cmd = live_pair(work, src[0], src[1], dst[0], dst[1], caps)
    cmds = (f"source: {src_cmd}", f"destination: {dst_cmd}",
            f"QMP: migrate-incoming/migrate uri=unix:<sock>; caps={list(caps)}")
    out = [Sample(case, "dest-stderr", signature, how, cmds, stderr_lines(dst_log))]
    desc = info.get("error-desc")
    if desc:
        out.append(Sample(case, "src-error-desc", src_signature, how, cmds, desc + "\n"))
    LOG.info("%s: status=%s error-desc=%r", case, info.get("status"), desc)
    return out


# --------------------------------------------------------------------------- cases


def case_ramblock_length(work: Path) -> list[Sample]:
    vars4, vars2 = work / "vars4.fd", work / "vars2.fd"
    out = []
    for build in (Q10, Q72, Q52):
        shutil.copy(OVMF / "OVMF_VARS_4M.fd", vars4)
        shutil.copy(OVMF / "OVMF_VARS.fd", vars2)
        src = pflash_args(OVMF / "OVMF_CODE_4M.fd", vars4)
        dst = pflash_args(OVMF / "OVMF_CODE.fd", vars2)
        how = (f"live migration {build.version} -> {build.version}, q35/TCG, source with "
               "OVMF_CODE_4M+OVMF_VARS_4M, destination with the 2 MB OVMF_CODE.fd+OVMF_VARS.fd "
               "(ovmf-2022.11)")
        out += record_live(f"ramblock-length-mismatch-{build.version}", "ramblock-length-mismatch",
                           how, work, (build, [*q35(build), *src]), (build, [*q35(build), *dst]))
    return out


def case_machine_not_found(work: Path) -> list[Sample]:
    out = []
    for build, machine in ((Q52, "pc-q35-10.0"), (Q72, "pc-q35-10.0"), (Q10, "pc-q35-11.0")):
        args = ["-machine", f"{machine},accel=tcg", "-m", "128", "-incoming", "defer"]
        with Vm(build, args, work, "dst") as vm:
            if vm.try_launch():
                raise RuntimeError(f"qemu-{build.version} accepted {machine}")
            out.append(Sample(
                f"machine-type-not-found-{build.version}", "dest-stderr", "machine-type-not-found",
                f"destination qemu-{build.version} started with -machine {machine} (unknown there)",
                (vm.command,), stderr_lines(vm.log)))
    return out


def case_machine_mismatch(work: Path) -> list[Sample]:
    how = ("live migration 10.0.2 -> 10.0.2, source -machine pc-q35-7.2, destination "
           "-machine pc-q35-10.0 (machine types differ)")
    return record_live("machine-type-mismatch", "machine-type-mismatch", how, work,
                       (Q10, q35(Q10, "pc-q35-7.2")), (Q10, q35(Q10, "pc-q35-10.0")))


def case_unknown_section(work: Path) -> list[Sample]:
    how = ("live migration 10.0.2 -> 10.0.2, machine pc-q35-7.2, source has "
           "-device virtio-rng-pci,addr=0x5 that the destination lacks")
    return record_live("unknown-section", "unknown-section", how, work,
                       (Q10, [*q35(Q10, "pc-q35-7.2"), "-device", "virtio-rng-pci,addr=0x5"]),
                       (Q10, q35(Q10, "pc-q35-7.2")))


def case_unknown_ramblock(work: Path) -> list[Sample]:
    how = ("live migration 10.0.2 -> 10.0.2, machine pc-q35-7.2, e1000 at the same slot: "
           "source with its option ROM, destination with romfile= (no ROM RAMBlock)")
    return record_live("unknown-ramblock", "unknown-ramblock", how, work,
                       (Q10, [*q35(Q10, "pc-q35-7.2"), "-device", "e1000,addr=0x5"]),
                       (Q10, [*q35(Q10, "pc-q35-7.2"), "-device", "e1000,addr=0x5,romfile="]))


def case_device_config(work: Path) -> list[Sample]:
    out = []
    base = [*q35(Q10, "pc-q35-7.2")]
    variants = [
        ("device-config-mismatch-vectors",
         "virtio-net-pci at the same slot, source vectors=3, destination vectors=4",
         "virtio-net-pci,addr=0x5,romfile=,vectors=3", "virtio-net-pci,addr=0x5,romfile=,vectors=4"),
    ]
    for case, what, src_dev, dst_dev in variants:
        how = f"live migration 10.0.2 -> 10.0.2, machine pc-q35-7.2, {what}"
        out += record_live(case, "device-config-mismatch", how, work,
                           (Q10, [*base, "-device", src_dev]), (Q10, [*base, "-device", dst_dev]))
    return out


def case_cpu_feature(work: Path) -> list[Sample]:
    # Under TCG, a CPU model with features TCG cannot provide, plus enforce, is what a
    # destination host lacking the source's CPU features looks like (KVM says "host").
    args = [*q35(Q10), "-cpu", "Skylake-Client-v4,enforce", "-incoming", "defer"]
    with Vm(Q10, args, work, "dst") as vm:
        if vm.try_launch():
            raise RuntimeError("qemu accepted an enforced CPU model with missing features")
        return [Sample("cpu-feature-mismatch", "dest-stderr", "cpu-feature-mismatch",
                       "destination qemu-10.0.2 TCG started with -cpu Skylake-Client-v4,enforce "
                       "(features TCG cannot provide)", (vm.command,), stderr_lines(vm.log))]


def case_blocked(work: Path) -> list[Sample]:
    out = []
    shm = work / "ivshmem"
    args = [*q35(Q10), "-object", f"memory-backend-file,id=hm,share=on,mem-path={shm},size=1M",
            "-device", "ivshmem-plain,memdev=hm"]
    with Vm(Q10, args, work, "src") as vm:
        vm.launch()
        desc = vm.qmp_error("migrate", uri=f"unix:{work / 'none.sock'}")
        out.append(Sample("migration-blocked-ivshmem", "src-qmp", "migration-blocked",
                          "qemu-10.0.2 with -device ivshmem-plain (peer mode) asked to migrate",
                          (vm.command, "QMP: migrate uri=unix:<sock>"), desc + "\n"))
    # cpr-transfer needs shared guest RAM: plain RAM is a CPR blocker.
    args = [*q35(Q10)]
    with Vm(Q10, args, work, "src") as vm:
        vm.launch()
        vm.cmd("migrate-set-parameters", mode="cpr-transfer")
        channels = [
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix",
                                               "path": str(work / "main.sock")}},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix",
                                              "path": str(work / "cpr.sock")}},
        ]
        desc = vm.qmp_error("migrate", channels=channels)
        out.append(Sample("migration-blocked-cpr-transfer", "src-qmp", "migration-blocked",
                          "qemu-10.0.2 with ordinary (non-shared) RAM, mode cpr-transfer, migrate",
                          (vm.command, "QMP: migrate-set-parameters mode=cpr-transfer; migrate channels=main+cpr"),
                          desc + "\n"))
    return out


def save_state(work: Path, build: Build, args: Sequence[str], dest: Path,
               caps: Sequence[str] = (), params: dict[str, Any] | None = None) -> str:
    """Save a running guest to ``dest`` (file: URI); return the source command."""
    with Vm(build, args, work, "saver") as vm:
        vm.launch()
        for cap in caps:
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": cap, "state": True}])
        if params:
            vm.cmd("migrate-set-parameters", **params)
        time.sleep(1.0)
        vm.cmd("migrate", uri=f"file:{dest}")
        info = migrate_status(vm)
        if info.get("status") != "completed":
            raise RuntimeError(f"save failed: {info}")
        return vm.command


def load_state(work: Path, build: Build, args: Sequence[str], state: Path,
               caps: Sequence[str] = (), params: dict[str, Any] | None = None,
               ) -> tuple[str, str, str]:
    """Load ``state`` into a new QEMU; return (its output, its command, final status)."""
    with Vm(build, [*args, "-incoming", "defer"], work, "loader") as vm:
        vm.launch()
        for cap in caps:
            vm.cmd("migrate-set-capabilities", capabilities=[{"capability": cap, "state": True}])
        if params:
            vm.cmd("migrate-set-parameters", **params)
        vm.cmd("migrate-incoming", uri=f"file:{state}")
        status = "exited"
        if not vm.wait_exit(20):
            status = vm.cmd("query-status").get("status", "?")
        return vm.close(), vm.command, status


def case_state_file(work: Path) -> list[Sample]:
    out = []
    args = q35(Q10, "pc-q35-10.0")
    good = work / "good.state"
    save_cmd = save_state(work, Q10, args, good)
    data = good.read_bytes()
    variants: list[tuple[str, str, str, bytes]] = [
        ("state-file-truncated-half", "state-file-truncated",
         f"saved with file: URI ({len(data)} bytes), truncated to half", data[: len(data) // 2]),
        ("state-file-empty", "bad-magic", "an empty state file (reads as a bad magic)", b""),
        ("bad-magic", "bad-magic", "the first byte of the saved stream flipped (0x51 'Q' -> 0x00)",
         b"\x00" + data[1:]),
        ("unsupported-version", "unsupported-version",
         "the stream version word (bytes 4..7, 0x00000003) changed to 0x00000007",
         data[:4] + b"\x00\x00\x00\x07" + data[8:]),
    ]
    # Cuts early in the stream: after the header, inside the configuration section, inside
    # the first section header, inside the 5th section's name.
    footers = _footer_offsets(data)
    for case, sig, size in (
        ("state-file-cut-after-header", "state-file-truncated", 8),
        ("state-file-cut-in-configuration", "state-file-truncated", 20),
        ("state-file-cut-in-section-header", "state-file-truncated", 40),
        ("stream-corrupt-cut-in-section-name", "stream-corrupt", footers[4] + 12),
    ):
        variants.append((case, sig, f"saved with file: URI ({len(data)} bytes), cut to the "
                         f"first {size} bytes", data[:size]))
    # Corrupt the section-type byte that follows the 4th section footer (0x7e + 4-byte id).
    after = footers[3] + 5
    for case, sig, value in (
        ("stream-corrupt-section-type", "stream-corrupt", 0x55),
        ("load-invalid-argument-mig-cmd", "load-invalid-argument", 0x08),
        ("state-incomplete-early-eof", "state-incomplete", 0x00),
    ):
        variants.append((case, sig, f"section-type byte at offset {after} (after the 4th section "
                         f"footer) changed from 0x{data[after]:02x} to 0x{value:02x}",
                         data[:after] + bytes([value]) + data[after + 1 :]))
    for case, sig, how, blob in variants:
        path = work / f"{case}.state"
        path.write_bytes(blob)
        log, cmd, status = load_state(work, Q10, args, path)
        LOG.info("%s: %s", case, status)
        out.append(Sample(case, "dest-stderr", sig, how,
                          (f"save: {save_cmd}; QMP migrate uri=file:<state>",
                           f"load: {cmd}; QMP migrate-incoming uri=file:<state>"),
                          stderr_lines(log)))
    return out


def _footer_offsets(data: bytes) -> list[int]:
    """Offsets of plausible section footers: 0x7e followed by a small section id."""
    offs = []
    for i in range(len(data) - 5):
        if data[i] == 0x7E and data[i + 1 : i + 3] == b"\x00\x00" and 0 < int.from_bytes(
            data[i + 1 : i + 5], "big"
        ) < 512:
            offs.append(i)
    return offs


def case_section_footer(work: Path) -> list[Sample]:
    """Try the seed bug (two cpr-reboot cycles from one QEMU), then make the text by hand."""
    out: list[Sample] = []
    ram = work / "guest.ram"
    args = [*q35(Q10, "pc-q35-10.0", "256"),
            "-object", f"memory-backend-file,id=ram0,size=256M,mem-path={ram},share=on",
            "-machine", "memory-backend=ram0"]
    caps = ["x-ignore-shared"]
    params = {"mode": "cpr-reboot"}
    state1, state2 = work / "cpr1.state", work / "cpr2.state"
    # Cycle 1: QEMU A saves, quits; QEMU B loads.  Cycle 2: the same QEMU B saves; QEMU C loads.
    src_cmd = save_state(work, Q10, args, state1, caps, params)
    attempts: list[str] = []
    with Vm(Q10, [*args, "-incoming", "defer"], work, "b") as b:
        b.launch()
        b.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        b.cmd("migrate-set-parameters", mode="cpr-reboot")
        b.cmd("migrate-incoming", uri=f"file:{state1}")
        deadline = time.monotonic() + 20
        while b.cmd("query-status")["status"] != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        b.cmd("migrate", uri=f"file:{state2}")
        info2 = migrate_status(b)
        attempts.append(f"cycle 2 save from the same QEMU: {info2.get('status')}")
    log, load_cmd, status = load_state(work, Q10, args, state2, caps, params)
    attempts.append(f"cycle 2 load: {status}")
    LOG.info("seed-bug reproduction: %s", attempts)
    if "Read section footer failed" in log:
        out.append(Sample("section-footer-read-cpr-reboot", "dest-stderr", "section-footer-read",
                          "REPRODUCED: second cpr-reboot from the same QEMU instance",
                          (src_cmd, load_cmd), stderr_lines(log)))
    # By hand: cut a cpr-reboot state file just before a section footer; the footer read hits
    # EOF (-EIO).  Report which offset was used.
    data = state2.read_bytes()
    for off in _footer_offsets(data):
        cut = work / "cut.state"
        cut.write_bytes(data[:off])
        log, load_cmd, status = load_state(work, Q10, args, cut, caps, params)
        if "Read section footer failed" in log:
            how = (f"NOT the seed bug: 10.0.2 did two cpr-reboot cycles from one QEMU without error "
                   f"({'; '.join(attempts)}); this text was made by cutting that cycle-2 state file "
                   f"({len(data)} bytes) at offset {off}, just before a section footer byte 0x7e")
            out.append(Sample("section-footer-read-cut", "dest-stderr", "section-footer-read", how,
                              (src_cmd, load_cmd), stderr_lines(log)))
            break
    # Overwrite a footer byte: the reader finds no footer marker.
    offs = _footer_offsets(data)
    if offs:
        off = offs[len(offs) // 2]
        bad = work / "nofooter.state"
        bad.write_bytes(data[:off] + b"\x00" + data[off + 1 :])
        log, load_cmd, status = load_state(work, Q10, args, bad, caps, params)
        out.append(Sample("section-footer-missing", "dest-stderr", "section-footer-missing",
                          f"cpr-reboot state file ({len(data)} bytes) with the footer byte 0x7e "
                          f"at offset {off} overwritten by 0x00",
                          (src_cmd, load_cmd), stderr_lines(log)))
    return out


def case_unreachable(work: Path) -> list[Sample]:
    out = []
    with Vm(Q10, q35(Q10), work, "src") as vm:
        vm.launch()
        for label, uri in (("unix", f"unix:{work / 'absent.sock'}"), ("tcp", "tcp:127.0.0.1:9")):
            try:
                vm.cmd("migrate", uri=uri)
                info = migrate_status(vm)
                text = info.get("error-desc", "") + "\n"
                side = "src-error-desc"
            except ExecuteError as exc:
                text, side = str(exc) + "\n", "src-qmp"
            out.append(Sample(f"destination-unreachable-{label}", side, "destination-unreachable",
                              f"qemu-10.0.2 migrate to {label} address with no listener",
                              (vm.command, f"QMP: migrate uri={uri}"), text))
    return out


def case_uuid(work: Path) -> list[Sample]:
    how = ("live migration 10.0.2 -> 10.0.2 with capability validate-uuid, source "
           "-uuid 11111111-..., destination -uuid 22222222-...")
    return record_live(
        "uuid-mismatch", "uuid-mismatch", how, work,
        (Q10, [*q35(Q10), "-uuid", "11111111-1111-1111-1111-111111111111"]),
        (Q10, [*q35(Q10), "-uuid", "22222222-2222-2222-2222-222222222222"]),
        caps=["validate-uuid"])


def case_no_space(work: Path) -> list[Sample]:
    if os.geteuid() != 0:
        LOG.warning("no-space: needs root to mount a tmpfs; skipped")
        return []
    mnt = work / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        with Vm(Q10, q35(Q10, mem="256"), work, "src") as vm:
            vm.launch()
            time.sleep(1.0)
            vm.cmd("migrate", uri=f"file:{mnt / 'vm.state'}")
            info = migrate_status(vm)
            return [Sample("no-space", "src-error-desc", "no-space",
                           "qemu-10.0.2 migrate to a file: URI on a 256 KiB tmpfs (guest RAM 256 MiB)",
                           (vm.command, "mount -t tmpfs -o size=256k tmpfs <dir>",
                            "QMP: migrate uri=file:<dir>/vm.state"),
                           info.get("error-desc", "") + "\n")]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def case_state_missing(work: Path) -> list[Sample]:
    with Vm(Q10, [*q35(Q10), "-incoming", "defer"], work, "loader") as vm:
        vm.launch()
        desc = vm.qmp_error("migrate-incoming", uri=f"file:{work / 'does-not-exist.state'}")
        return [Sample("state-file-missing", "dest-qmp", "state-file-missing",
                       "qemu-10.0.2 -incoming defer, migrate-incoming file: URI of a missing file",
                       (vm.command, "QMP: migrate-incoming uri=file:<missing>"), desc + "\n")]


CASES: dict[str, Callable[[Path], list[Sample]]] = {
    "ramblock-length-mismatch": case_ramblock_length,
    "machine-type-not-found": case_machine_not_found,
    "machine-type-mismatch": case_machine_mismatch,
    "unknown-section": case_unknown_section,
    "unknown-ramblock": case_unknown_ramblock,
    "device-config-mismatch": case_device_config,
    "cpu-feature-mismatch": case_cpu_feature,
    "migration-blocked": case_blocked,
    "state-file": case_state_file,
    "section-footer": case_section_footer,
    "destination-unreachable": case_unreachable,
    "uuid-mismatch": case_uuid,
    "no-space": case_no_space,
    "state-file-missing": case_state_missing,
}


def write_sample(sample: Sample, out_dir: Path) -> Path:
    path = out_dir / f"{sample.case}--{sample.side}.txt"
    header = [
        f"# signature: {sample.signature}",
        f"# side: {sample.side}",
        f"# source: real run here: {TOOL} ({time.strftime('%Y-%m-%d')})",
        f"# how: {sample.how}",
        *(f"# command: {c}" for c in sample.commands),
        "---",
    ]
    path.write_text("\n".join(header) + "\n" + sample.text, encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", help="cases to record (default: all)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("qemu").setLevel(logging.CRITICAL)  # its EOF chatter on purpose-made failures
    if opts.list:
        sys.stdout.write("\n".join(CASES) + "\n")
        return 0
    unknown = [c for c in opts.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    opts.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in opts.cases or list(CASES):
        with tempfile.TemporaryDirectory(prefix=f"sig-{name}-", dir="/var/tmp") as tmp:
            start = time.monotonic()
            try:
                samples = CASES[name](Path(tmp))
            except (QMPError, RuntimeError, TimeoutError, OSError) as exc:
                LOG.error("%s failed: %s", name, exc)
                failed.append(name)
                continue
            for sample in samples:
                LOG.info("wrote %s", write_sample(sample, opts.out).relative_to(REPO))
            LOG.info("%s: %d sample(s) in %.1fs", name, len(samples), time.monotonic() - start)
    if failed:
        LOG.error("failed cases: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
