"""Real boots of the `minimal` image on QEMU 10.0.2 (TCG): UEFI split pflash and direct
kernel, to HARNESS-READY, then SSH with the pinned host key and the agent's answers.

Uses a small local process owner instead of harness.machine so the image can be tested
on its own.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.guest.ssh import load_client_key
from harness.images import Image, ensure_image, mem_region_checksum
from harness.images.kernel import LZ4_LEGACY_MAGIC, read_bzimage
from harness.inventory import catalog
from harness.inventory.provision import Provisioner

pytestmark = pytest.mark.integration

READY_TIMEOUT = 180.0
GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
# OVMF refuses variables the UEFI spec does not define in the global namespace.
VENDOR = "5b2d1f4e-3c6a-4d8e-9f10-2a3b4c5d6e7f"


@dataclass(frozen=True)
class Qemu:
    binary: Path
    env: dict[str, str]
    datadirs: list[Path]


@pytest.fixture(scope="module")
def qemu10() -> Qemu:
    cat = catalog.default()
    entry = cat.qemu_entry("10.0.2")
    prefix = Provisioner(cat).ensure_qemu(entry)
    libs = f"{prefix}/usr/lib/x86_64-linux-gnu:{prefix}/lib/x86_64-linux-gnu"
    return Qemu(
        prefix / entry.binary,
        dict(os.environ, LD_LIBRARY_PATH=libs),
        [prefix / d for d in entry.datadirs],
    )


@pytest.fixture(scope="module")
def ovmf() -> Path:
    cat = catalog.default()
    return Provisioner(cat).ensure_firmware(cat.firmware_entry("2022.11")) / "usr/share/OVMF"


@pytest.fixture(scope="module")
def minimal() -> Image:
    return ensure_image("minimal")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> tuple[dict[str, Any], float]:
        start = time.monotonic()
        deadline = start + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            match = re.search(r"^HARNESS-READY (\{.*\})\r?$", text, re.M)
            if match:
                return json.loads(match.group(1)), time.monotonic() - start
            if self.proc.poll() is not None:
                pytest.fail(
                    f"QEMU exited {self.proc.returncode} before READY; log {self.log}:\n{text[-2000:]}"
                )
            time.sleep(0.2)
        pytest.fail(f"no HARNESS-READY after {timeout:.0f} s; log {self.log}:\n{text[-2000:]}")


@contextlib.contextmanager
def qemu_guest(qemu: Qemu, args: Sequence[str], log: Path) -> Iterator[Running]:
    """QEMU owned for the block: terminated, then killed, and reaped in finally."""
    port = _free_port()
    cmd = [str(qemu.binary)]
    for d in qemu.datadirs:
        cmd += ["-L", str(d)]
    cmd += [
        "-machine", "q35,accel=tcg", "-m", "1024", "-smp", "1", "-nodefaults",
        "-display", "none", "-serial", f"file:{log}",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
        *args,
    ]  # fmt: skip
    with (log.parent / "qemu-stderr.log").open("wb") as err:
        proc = subprocess.Popen(cmd, env=qemu.env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        yield Running(proc, log, port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def ssh(image: Image, port: int, host_key: str | None = None) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    kind, blob = (host_key or image.host_key).split()[:2]
    pinned = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
    client.get_host_keys().add(f"[127.0.0.1]:{port}", kind, pinned)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        "127.0.0.1", port=port, username="root",
        pkey=load_client_key(image.client_key),
        allow_agent=False, look_for_keys=False, timeout=30, banner_timeout=30, auth_timeout=30,
    )  # fmt: skip
    return client


def agent(
    client: paramiko.SSHClient, *args: str, ok: bool = True, timeout: float = 120
) -> dict[str, Any]:
    _in, out, err = client.exec_command("agent " + " ".join(args), timeout=timeout)
    rc = out.channel.recv_exit_status()
    text = out.read().decode()
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"agent {args} printed {text!r} (stderr {err.read()!r})"
    data = json.loads(lines[0])
    assert isinstance(data, dict)
    if ok:
        assert rc == 0, f"agent {args} exited {rc}: {data}"
    else:
        assert rc != 0 and "error" in data, f"agent {args} should have failed: {data}"
    return data


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_uefi_boot_split_pflash_ssh_agent(
    qemu10: Qemu, ovmf: Path, minimal: Image, tmp_path: Path
) -> None:
    template = ovmf / "OVMF_VARS_4M.fd"
    template_sum = _sha(template)
    vars_copy = tmp_path / "vars.fd"
    shutil.copyfile(template, vars_copy)
    disk = tmp_path / "esp.img"
    shutil.copyfile(minimal.esp, disk)
    args = [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf / 'OVMF_CODE_4M.fd'}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive", f"file={disk},if=virtio,format=raw",
    ]  # fmt: skip
    with qemu_guest(qemu10, args, tmp_path / "serial.log") as vm:
        ready, ready_s = vm.wait_ready()
        print(f"UEFI boot to HARNESS-READY: {ready_s:.1f} s")
        assert ready["image"] == "minimal" and ready["agent"] == 2
        client = ssh(minimal, vm.port)
        try:
            status = agent(client, "status")
            assert status["boot_id"] == ready["boot_id"]
            assert status["image"] == "minimal"
            assert status["uptime"] > 0
            # the kernel that booted is Debian's own (its release and build string), and the
            # image carries it repacked with LZ4 as the recipe asks (harness.images.kernel)
            _, out, _ = client.exec_command("cat /proc/version")
            proc_version = out.read().decode()
            pkg_version = minimal.packages[f"linux-image-{minimal.kernel_version}"]
            assert proc_version.startswith(f"Linux version {minimal.kernel_version} ("), proc_version
            assert f" Debian {pkg_version} " in proc_version, proc_version
            assert read_bzimage(minimal.kernel.read_bytes(), "minimal").payload.startswith(LZ4_LEGACY_MAGIC)
            hb1 = agent(client, "heartbeat")
            time.sleep(1.0)
            hb2 = agent(client, "heartbeat")
            assert hb2["count"] > hb1["count"] and hb2["mono"] > hb1["mono"]

            mem = agent(client, "mem-checksum")
            assert mem["size_mb"] == 16 and mem["seed"] == "harness"
            assert mem["checksum"] == mem["expected"] == mem_region_checksum(16, "harness")

            boot = agent(client, "boot")
            assert boot["BootCurrent"] is not None
            assert boot["BootCurrent"] in boot["BootOrder"]
            assert boot["BootCurrent"] in boot["entries"]

            name = f"HarnessTest-{VENDOR}"
            assert agent(client, "efivar", "set", name, "0102ff")["ok"] is True
            got = agent(client, "efivar", "get", name)
            assert (got["data"], got["attributes"], got["guid"]) == ("0102ff", 7, VENDOR)
            # the firmware's refusal comes back as an error
            agent(client, "efivar", "set", f"HarnessTest-{GLOBAL}", "00", ok=False)
            assert name in agent(client, "efivar", "list")["variables"]
            # overwrite: an existing variable is immutable until chattr -i
            agent(client, "efivar", "set", name, "aa")
            assert agent(client, "efivar", "get", name)["data"] == "aa"
            agent(client, "efivar", "rm", name)
            agent(client, "efivar", "get", name, ok=False)
            agent(client, "efivar", "set", "NoGuid", "00", ok=False)
            agent(client, "efivar", "set", name, "abc", ok=False)

            order = boot["BootOrder"]
            flipped = list(reversed(order))
            agent(client, "bootorder", "set", ",".join(flipped))
            assert agent(client, "boot")["BootOrder"] == flipped
            agent(client, "bootnext", "set", order[0])
            assert agent(client, "boot")["BootNext"] == order[0]
            agent(client, "bootnext", "rm")
            assert agent(client, "boot")["BootNext"] is None
            agent(client, "bootorder", "set", "zz", ok=False)
            agent(client, "reseed", "00112233")
            agent(client, "nonsense", ok=False)
        finally:
            client.close()

        # an unpinned host key is refused
        wrong = (
            Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        with pytest.raises(paramiko.SSHException):
            ssh(minimal, vm.port, host_key=wrong)
    assert _sha(template) == template_sum, "the OVMF_VARS template was modified"
    assert _sha(vars_copy) != template_sum, "OVMF wrote nothing to the private varstore"


def test_direct_kernel_boot_config_precedence(qemu10: Qemu, minimal: Image, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("mem_mb=8\nseed=fromfwcfg\n")
    args = [
        "-kernel", str(minimal.kernel), "-initrd", str(minimal.initrd),
        "-append", f"{minimal.cmdline} harness.mem_mb=4",
        "-fw_cfg", f"name=opt/harness/config,file={config}",
    ]  # fmt: skip
    with qemu_guest(qemu10, args, tmp_path / "serial.log") as vm:
        ready, ready_s = vm.wait_ready()
        print(f"direct-kernel boot to HARNESS-READY: {ready_s:.1f} s")
        client = ssh(minimal, vm.port)
        try:
            mem = agent(client, "mem-checksum")
            # cmdline wins for mem_mb; fw_cfg supplies the seed
            assert (mem["size_mb"], mem["seed"]) == (4, "fromfwcfg")
            assert mem["checksum"] == mem_region_checksum(4, "fromfwcfg")
            assert agent(client, "status")["boot_id"] == ready["boot_id"]
            # SeaBIOS boot: no efivarfs, the agent says so
            agent(client, "efivar", "list", ok=False)
        finally:
            client.close()


@pytest.fixture(scope="module")
def nested_l1() -> Image:
    return ensure_image("nested-l1")


# A cold L1 boot and a cold UEFI L2 with KVM inside it: 62 s here, 230 s at half the CPU.
# make test's nested tests run L2 with KVM from saved L1+L2 pairs (whose making boots both
# cold and checks L2's ready line); the nightly's exhaustive row runs this whole boot.
@pytest.mark.exhaustive
def test_nested_l1_runs_l2_with_kvm(
    qemu10: Qemu, ovmf: Path, nested_l1: Image, tmp_path: Path
) -> None:
    assert nested_l1.data_disk is not None
    vars_copy = tmp_path / "vars.fd"
    shutil.copyfile(ovmf / "OVMF_VARS_4M.fd", vars_copy)
    args = [
        "-cpu", "max", "-m", "2048",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf / 'OVMF_CODE_4M.fd'}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive", f"file={nested_l1.esp},if=virtio,format=raw,snapshot=on",
        "-drive", f"file={nested_l1.data_disk},if=virtio,format=raw,readonly=on",
    ]  # fmt: skip
    with qemu_guest(qemu10, args, tmp_path / "serial.log") as vm:
        ready, ready_s = vm.wait_ready(timeout=400)
        print(f"nested-l1 UEFI boot to HARNESS-READY: {ready_s:.1f} s")
        assert ready["image"] == "nested-l1"
        l1 = ssh(nested_l1, vm.port)
        try:
            started = agent(l1, "l2", "start", "--accel", "kvm", "--timeout", "600", timeout=660)
            print(f"L2 start (UEFI, kvm inside L1) to HARNESS-READY: {started['ready_s']} s")
            assert started["ok"] is True
            assert started["boot_id"] != ready["boot_id"]
            agent(l1, "l2", "start", ok=False)  # already running
            status = agent(l1, "l2", "status")
            assert status["running"] is True and status["accel"] == "kvm"

            # L2's sshd through L1: a direct-tcpip channel to 127.0.0.1:2222 inside L1
            transport = l1.get_transport()
            assert transport is not None
            channel = transport.open_channel(
                "direct-tcpip", ("127.0.0.1", 2222), ("127.0.0.1", 0), timeout=60
            )
            l2 = paramiko.SSHClient()
            kind, blob = nested_l1.host_key.split()[:2]
            key = paramiko.PKey.from_type_string(kind, base64.b64decode(blob))
            l2.get_host_keys().add("[127.0.0.1]:2222", kind, key)
            l2.set_missing_host_key_policy(paramiko.RejectPolicy())
            l2.connect(
                "127.0.0.1", port=2222, username="root", sock=channel,
                pkey=load_client_key(nested_l1.client_key),
                allow_agent=False, look_for_keys=False, timeout=60, banner_timeout=60,
            )  # fmt: skip
            try:
                l2_status = agent(l2, "status")
                assert l2_status["image"] == "minimal"
                assert l2_status["boot_id"] == started["boot_id"]
                hb1 = agent(l2, "heartbeat")
                time.sleep(1.0)
                hb2 = agent(l2, "heartbeat")
                assert hb2["count"] > hb1["count"]
                assert agent(l2, "boot")["BootCurrent"] is not None
            finally:
                l2.close()
            assert agent(l1, "l2", "stop")["was_running"] is True
            assert agent(l1, "l2", "status")["running"] is False
        finally:
            l1.close()
