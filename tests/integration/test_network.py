"""User-mode networking is ``restrict=on``: a guest reaches nothing outside itself, in
particular not the services on the host's loopback (slirp maps the host at 10.0.2.2), and
only the explicit forward to its sshd reaches in.  A spec asking for ``net_restrict=False``
gets slirp's outbound NAT: the same probe then connects, so the check can fail."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from harness.factory import MachineFactory

pytestmark = pytest.mark.integration

PROBE = "echo hello | busybox nc -w 3 10.0.2.2 {port}; echo rc=$?"


class Listener:
    """A TCP service on the host's loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    srv = Listener()
    yield srv
    srv.close()


def test_guest_cannot_reach_the_hosts_loopback(vm_factory: MachineFactory, listener: Listener) -> None:
    vm = vm_factory(fast=True)
    assert any("restrict=on" in a for a in vm.process.cmdline_now()), "the netdev is not restricted"
    out = vm.run(PROBE.format(port=listener.port), check=False).stdout
    assert listener.accepted == 0, f"a restricted guest reached 127.0.0.1:{listener.port}: {out}"
    assert "rc=0" not in out, out
    # the way in still works: this very command came over the forwarded sshd


def test_unrestricted_spec_reaches_the_host(vm_factory: MachineFactory, listener: Listener) -> None:
    vm = vm_factory(fast=True, net_restrict=False)
    out = vm.run(PROBE.format(port=listener.port), check=False).stdout
    assert listener.accepted == 1 and "rc=0" in out, out
