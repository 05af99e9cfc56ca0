"""Issue 3: the minimal image boots under UEFI split pflash on every provisioned QEMU and
answers over SSH with its pinned host key; every QEMU is reaped when a boot fails."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness import machine
from harness.errors import ConsoleSilent, GuestTimeout, LaunchError
from harness.factory import MachineFactory
from harness.inventory.catalog import DEFAULT_QEMU
from harness.machine import Machine
from harness.paths import file_sha256
from harness.signatures import classify
from harness.spec import VmSpec

pytestmark = pytest.mark.integration




def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive either
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# every QEMU x OVMF pair boots in the nightly's boot rows; make test boots the default
@pytest.mark.parametrize("version", [pytest.param("5.2", marks=pytest.mark.exhaustive),
                                     pytest.param("7.2", marks=pytest.mark.exhaustive), DEFAULT_QEMU])
def test_uefi_split_pflash_boot_and_ssh(version: str, tmp_path: Path) -> None:
    with MachineFactory(VmSpec(qemu=version, name=f"boot{version.replace('.', '')}")) as factory:
        vm = factory(start=False)
        template = vm.varstore_template
        assert template is not None and vm.firmware_code is not None
        template_digest = file_sha256(template)
        vm.start()
        res = vm.ssh.run("uname -r; cat /proc/cmdline")
        assert res.rc == 0 and res.stdout.startswith("6.1."), res
        status = vm.agent("status")
        assert status["boot_id"] == vm.ready.boot_id if vm.ready else False
        assert vm.build.capabilities.version.startswith(version.rsplit(".", 1)[0] if version == "10.0.2" else version)
        cmdline = (vm.workdir / "qemu-0.cmdline.txt").read_text()
        assert f"unit=0,readonly=on,file={vm.firmware_code}" in cmdline
        assert f"unit=1,file={vm.varstore_path}" in cmdline
        assert vm.varstore_path != template
        vm.stop()
        # OVMF wrote its boot entries into the private copy; the template is untouched
        assert file_sha256(vm.varstore_path) != template_digest
        assert file_sha256(template) == template_digest
        assert "BdsDxe: starting Boot" in (vm.workdir / "qemu-0.serial.log").read_text(errors="replace")


def test_direct_kernel_boot_with_seabios() -> None:
    with MachineFactory(VmSpec(firmware=None, boot="direct", name="direct")) as factory:
        vm = factory()
        assert vm.ssh.run("test -d /sys/firmware/efi || echo bios").stdout.strip() == "bios"
        assert vm.agent("heartbeat")["count"] >= 0


def test_unknown_host_key_is_rejected(tmp_path: Path) -> None:
    from harness.errors import MachineError
    from harness.guest.ssh import SshClient

    with MachineFactory(VmSpec(name="hostkey")) as factory:
        vm = factory(fast=True)  # the check is SSH's, not the boot's: a restored guest will do
        wrong = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbA9c2m2bqq0q3H2c7c4qkq8VqkVfJY0pCkG2b3G3bq"
        client = SshClient("127.0.0.1", vm.ssh_port, wrong, vm.image.client_key, name="wrong-key")
        with pytest.raises(MachineError, match="host key mismatch"):
            client.connect(timeout=20)


def test_boot_timeout_reaps_qemu() -> None:
    with MachineFactory(VmSpec(name="timeout")) as factory:
        vm = factory(start=False)
        with pytest.raises(GuestTimeout, match="HARNESS-READY"):
            vm.start(timeout=2)
        pids = [h["pid"] for h in vm.history]
        assert pids and not any(pid_alive(p) for p in pids)
        assert not vm.running


def test_launch_failure_names_command_and_output() -> None:
    with MachineFactory(VmSpec(name="badarg", extra_args=("-device", "no-such-device"))) as factory:
        vm: Machine = factory(start=False)
        with pytest.raises(LaunchError) as err:
            vm.start(timeout=30)
        text = str(err.value)
        assert "no-such-device" in text and "exit code" in text and "command:" in text
        assert not vm.running


def test_firmware_that_never_prints_fails_at_the_silence_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # a real pair that hangs in firmware (firmware/expected-incompatibilities.toml, [[boot]])
    monkeypatch.setattr(machine, "FIRMWARE_SILENCE_S", 15.0)
    with MachineFactory(VmSpec(qemu="5.2", firmware="2025.02", name="silent")) as factory:
        vm = factory(start=False)
        t0 = time.monotonic()
        with pytest.raises(ConsoleSilent) as err:
            vm.start()
        assert time.monotonic() - t0 < 120  # not the 240 s boot timeout
        assert classify(str(err.value)).name == "firmware-silent"  # type: ignore[union-attr]
        pids = [h["pid"] for h in vm.history]
        assert pids and not any(pid_alive(p) for p in pids)
