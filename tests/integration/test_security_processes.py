"""Private files and sockets of a real image and a real QEMU process: the image's keys are
0600 in a 0700 directory, the varstore copy is 0600, work and
socket directories 0700, QMP a socketpair, the SSH forward on loopback only."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import images
from harness.factory import private_base
from harness.machine import Machine
from harness.spec import VmSpec


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tcp_listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets in LISTEN state that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            addr_hex, port_hex = f[1].split(":")
            if width == 8:
                addr = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr_hex)[::-1])
            else:
                raw = bytes.fromhex(addr_hex)
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            out.append((addr, int(port_hex, 16)))
    return out


@pytest.fixture(scope="module")
def paused_qemu() -> Iterator[Machine]:
    base = private_base("-sec")
    vm = Machine(VmSpec(name="secpaused"), base / "vm")
    try:
        inc = vm.spawn(extra_args=["-S"])  # the CPU never runs: nothing boots
        vm.adopt(inc)
        yield vm
    finally:
        vm.stop(hard=True)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.integration
def test_qmp_is_a_socketpair_not_a_path(paused_qemu: Machine) -> None:
    args = Path(f"/proc/{paused_qemu.process.pid}/cmdline").read_bytes().split(b"\0")
    text = [a.decode() for a in args]
    mon = [a for a in text if a.startswith("socket,id=mon")]
    assert mon and all("fd=" in a and "path=" not in a for a in mon), mon
    assert not any(a.startswith("unix:") or ",server" in a for a in text if "mon" in a)
    assert paused_qemu.qmp("query-status")["status"] == "prelaunch"


@pytest.mark.integration
def test_sockets_live_in_0700_directories(paused_qemu: Machine) -> None:
    serial = paused_qemu.current.resolved.serial_sock
    assert serial is not None and serial.exists()
    assert _mode(serial.parent) == 0o700
    assert _mode(paused_qemu.workdir) == 0o700 and serial.parent == paused_qemu.sock_dir
    # migration and cpr sockets are made in the guest's private socket directory
    from harness import migration

    assert "vm.sock_dir" in Path(migration.__file__).read_text().split("def live(")[1].split("def save(")[0]
    assert "vm.sock_dir" in Path(migration.__file__).read_text().split("def cpr_transfer(")[1]


@pytest.mark.integration
def test_forwarded_ssh_port_listens_on_loopback_only(paused_qemu: Machine) -> None:
    listeners = _tcp_listeners(paused_qemu.process.pid)
    assert (("127.0.0.1", paused_qemu.ssh_port)) in listeners, listeners
    assert all(addr == "127.0.0.1" for addr, _ in listeners), listeners


def test_image_keys_are_private() -> None:
    img = images.ensure_image("minimal")
    assert _mode(img.client_key) == 0o600
    assert _mode(img.client_key.parent) == 0o700
    dropbear = img.client_key.parent / images.HOST_KEY_DROPBEAR
    if dropbear.exists():
        assert _mode(dropbear) == 0o600


def test_machine_dir_is_0700(tmp_path: Path) -> None:
    old = os.umask(0)  # the harness must not rely on the caller's umask
    try:
        mdir = tmp_path / "machine"
        mdir.mkdir(mode=0o777)
        Machine(VmSpec(name="modes"), mdir)  # resolves the build and image, launches nothing
        assert _mode(mdir) == 0o700
    finally:
        os.umask(old)


def test_listener_parser_sees_a_wildcard_bind() -> None:
    # the check above must be able to fail: a 0.0.0.0 listener of our own is reported
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert ("0.0.0.0", port) in _tcp_listeners(os.getpid())
