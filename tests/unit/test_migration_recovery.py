"""What the harness does to the source after a failed migration (QMP faked; the real
thing runs in tests/integration/test_aarch64.py and test_faults.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness import migration
from harness.errors import GuestTimeout
from harness.guest.qemu_process import QmpError


class FakeQemu:
    """A source QEMU whose run state follows a script of query-status answers."""

    def __init__(self, states: list[str], *, cont_fails: bool = False) -> None:
        self.name = "fake-source"
        self.states = list(states)
        self.running = True
        self.exitcode: int | None = None
        self.commands: list[str] = []
        self.cont_fails = cont_fails

    def qmp(self, cmd: str, **_: Any) -> dict[str, Any]:
        self.commands.append(cmd)
        if cmd == "cont":
            if self.cont_fails:
                raise QmpError("cont", {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"})
            self.states = ["running"]
            return {}
        status = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {"status": status, "running": status == "running"}


def _result() -> migration.MigrationResult:
    return migration.MigrationResult(op="live", mode="normal", status="failed", source="a",
                                     destination="b", machine="virt-7.2")  # fmt: skip


def _recover(qemu: FakeQemu, **kw: Any) -> tuple[bool, migration.MigrationResult]:
    result = _result()
    ok = migration.recover(qemu, result, **kw)  # the driver's phase, on a faked endpoint
    return ok, result


def test_source_qemu_restarts_by_itself() -> None:
    qemu = FakeQemu(["finish-migrate", "finish-migrate", "running"])
    ok, result = _recover(qemu)
    assert ok and result.source_running
    assert "cont" not in qemu.commands
    assert "source_recovery" not in result.extra


def test_postmigrate_after_a_destination_refusal_is_resumed() -> None:
    qemu = FakeQemu(["postmigrate"])
    ok, result = _recover(qemu)
    assert ok and qemu.commands.count("cont") == 1
    assert result.extra["source_recovery"] == "resumed with 'cont' from postmigrate"


def test_paused_source_is_resumed_only_after_the_settle_time() -> None:
    qemu = FakeQemu(["paused"])
    ok, result = _recover(qemu, settle=0.2)
    assert ok and qemu.commands.count("cont") == 1
    assert "from paused" in result.extra["source_recovery"]


def test_a_guest_paused_before_the_migration_stays_paused() -> None:
    qemu = FakeQemu(["postmigrate"])
    ok, result = _recover(qemu, was_running=False)
    assert not ok and "cont" not in qemu.commands


def test_a_refused_cont_is_recorded() -> None:
    qemu = FakeQemu(["postmigrate"], cont_fails=True)
    ok, result = _recover(qemu)
    assert not ok
    assert "'cont' from postmigrate failed" in result.extra["source_recovery"]


def test_a_dead_source_is_recorded() -> None:
    qemu = FakeQemu(["running"])
    qemu.running, qemu.exitcode = False, -9
    ok, result = _recover(qemu)
    assert not ok and result.extra["source_recovery"] == "source QEMU exited (code -9)"


def test_a_bound_unix_socket_is_not_listening_until_listen(tmp_path: Path) -> None:
    # QEMU binds its CPR channel before it listens; a connect in between is refused
    import socket

    path = tmp_path / "cprc.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        assert not migration.unix_listening(path)
        s.bind(str(path))
        assert path.exists() and not migration.unix_listening(path)
        s.listen(1)
        assert migration.unix_listening(path)
    assert not migration.unix_listening(tmp_path / "other.sock")


def test_unix_listening_reads_the_socket_table_defensively(tmp_path: Path) -> None:
    table = tmp_path / "unix"
    path = tmp_path / "a b.sock"  # a path with a space is one field (the last)
    table.write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "garbage\n"
        f"0000: 00000002 00000000 zz 0001 01 1 {path}\n"
        f"0000: 00000002 00000000 00000000 0001 01 2 {path}\n"
    )
    assert not migration.unix_listening(path, table=str(table))
    table.write_text(table.read_text() + f"0000: 00000002 00000000 00010000 0001 01 3 {path}\n")
    assert not migration.unix_listening(path, table=str(table))  # unlinked: nobody can connect
    path.touch()
    assert migration.unix_listening(path, table=str(table))
    # no table (not Linux, /proc not mounted): the path's existence is all there is
    assert migration.unix_listening(table, table=str(tmp_path / "missing")) is True


def _stub_qmp_server(sock: Any, listen_after: float) -> None:
    """A QMP peer on a socket already bound: listens after ``listen_after`` seconds (the
    gap between QEMU's bind() and listen()), greets, and answers qmp_capabilities."""
    import json
    import time

    time.sleep(listen_after)
    sock.listen(1)
    conn, _ = sock.accept()
    with conn:
        conn.sendall(json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode() + b"\r\n")
        buf = b""
        while b"\n" not in buf and b"}" not in buf:
            buf += conn.recv(4096)
        conn.sendall(b'{"return": {}}\r\n')
        conn.recv(4096)  # until the client closes


def test_a_refused_connect_between_bind_and_listen_is_retried(tmp_path: Path) -> None:
    # cpr-exec: the new image's QMP socket file exists from bind(); a connect before its
    # listen() is refused (qemu.qmp wraps that in a ConnectError) and must be retried
    import socket
    import threading

    from harness.guest import qemu_process

    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        t = threading.Thread(target=_stub_qmp_server, args=(srv, 0.05), daemon=True)
        t.start()
        conn = qemu_process.connect_when_listening(path, timeout=10, alive=lambda: True)
        conn.close()
        t.join(5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:  # bound, never listening
        (tmp_path / "dead.sock").unlink(missing_ok=True)
        srv.bind(str(tmp_path / "dead.sock"))
        with pytest.raises(qemu_process.ProcessGone):
            qemu_process.connect_when_listening(tmp_path / "dead.sock", timeout=10, alive=lambda: False)
        with pytest.raises(GuestTimeout, match="ConnectionRefusedError"):
            qemu_process.connect_when_listening(tmp_path / "dead.sock", timeout=0.05, alive=lambda: True)


def test_qmp_messages_are_formatted_only_when_their_log_is_on() -> None:
    import logging

    from harness.guest import qemu_process

    class Unprintable:
        def __str__(self) -> str:
            raise AssertionError("formatted for a log that is off")

    class Client:
        logger = logging.getLogger("qemu.qmp.test-hooks")

    client = Client()
    qemu_process._format_only_when_logged(client)
    msg = Unprintable()
    client.logger.setLevel(logging.WARNING)
    assert client._cb_outbound(msg) is msg and client._cb_inbound(msg) is msg  # type: ignore[attr-defined]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    client.logger.addHandler(handler)
    client.logger.setLevel(logging.DEBUG)
    try:
        assert client._cb_inbound("{'return': {}}") == "{'return': {}}"  # type: ignore[attr-defined]
        assert [r.getMessage() for r in records] == ["<-- {'return': {}}"]
    finally:
        client.logger.removeHandler(handler)
        client.logger.setLevel(logging.NOTSET)


# --- the driver's watch phase and its hooks (QMP faked) -------------------------------------


class FakeSource:
    """A source whose query-migrate answers follow a script; migrate_cancel ends it."""

    def __init__(self, statuses: list[str], *, cancel_ends: bool = True) -> None:
        self.name = "fake-source"
        self.statuses = list(statuses)
        self.running = True
        self.exitcode: int | None = None
        self.commands: list[str] = []
        self.cancel_ends = cancel_ends

    def qmp(self, cmd: str, **_: Any) -> dict[str, Any]:
        self.commands.append(cmd)
        if cmd == "migrate_cancel" and self.cancel_ends:
            self.statuses = ["cancelling", "cancelled"]
            return {}
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"status": status}


def test_watch_reports_every_status_and_the_end() -> None:
    src = FakeSource(["setup", "active", "active", "device", "completed"])
    info = migration.watch(src, 10)
    assert info["status"] == "completed" and info["statuses"] == ["setup", "active", "device", "completed"]


def test_a_hook_that_cancels_at_a_phase_sees_the_cancellation() -> None:
    src = FakeSource(["setup", "active", "active", "active"])
    met: list[str] = []

    def at_active(status: str, info: dict[str, Any]) -> bool:
        met.append(status)
        if status == "active":
            migration.cancel(src)
            return True
        return False

    info = migration.watch(src, 10, on_status=at_active)
    assert met == ["setup", "active"] and info["status"] == "cancelled"
    assert "stuck_in" not in info


def test_a_migration_stuck_after_the_fault_is_cancelled_and_says_where() -> None:
    src = FakeSource(["active", "pre-switchover"])  # stays there: nobody says continue
    info = migration.watch(src, 60, on_status=lambda s, i: s == "pre-switchover", stuck_after=0.2)
    assert info["status"] == "cancelled" and info["stuck_in"] == "pre-switchover"
    assert src.commands.count("migrate_cancel") == 1


def test_a_migration_over_time_is_cancelled_and_failed() -> None:
    src = FakeSource(["active"])
    info = migration.watch(src, 0.1)
    assert info["status"] == "failed" and "did not complete within" in info["error-desc"]
    assert "migrate_cancel" in src.commands


def test_a_source_that_exits_mid_migration_fails_it() -> None:
    src = FakeSource(["active"])

    def exit_now(status: str, info: dict[str, Any]) -> bool:
        src.running = False
        return False

    info = migration.watch(src, 10, on_status=exit_now)
    assert info["status"] == "failed" and info["error-desc"] == "source QEMU exited during migration"


class EventfulQemu(FakeQemu):
    """A fake endpoint that can wait for QMP events: every nap is recorded, and an event
    'arrives' at once (the nap ends early), as QemuProcess.wait_event does."""

    def __init__(self, states: list[str]) -> None:
        super().__init__(states)
        self.naps: list[float] = []

    def wait_event(self, timeout: float) -> bool:
        self.naps.append(timeout)
        return True


def test_waits_nap_on_qmp_events_when_the_endpoint_can() -> None:
    src = EventfulQemu(["active", "active", "completed"])
    info = migration.watch(src, 10.0)
    assert info["status"] == "completed" and src.naps == [0.004, 0.004]
    dest = EventfulQemu(["inmigrate", "running"])
    assert migration.wait_running(dest, 10.0) is None and dest.naps == [0.004]
    # a caller's own pace (min_interval, L1's QMP) sleeps instead of waiting for events
    slow = EventfulQemu(["inmigrate", "running"])
    assert migration.wait_running(slow, 10.0, min_interval=0.01) is None and slow.naps == []


def test_a_saved_source_resumes_only_once_the_migration_is_finalized() -> None:
    # QEMU answers 'completed' before its cleanup leaves finish-migrate; 'cont' then fails
    src = EventfulQemu(["finish-migrate", "finish-migrate", "postmigrate"])
    assert migration.resume_saved(src, 10.0) is None
    assert src.commands == ["query-status"] * 3 + ["cont"] and len(src.naps) == 2
    stuck = EventfulQemu(["finish-migrate"])
    assert "stayed in finish-migrate" in (migration.resume_saved(stuck, 0.0) or "")
    assert "cont" not in stuck.commands


def test_a_summary_names_the_harness_reason_and_what_qemu_said_not_its_last_warning() -> None:
    warn = "qemu-system-x86_64: -mon chardev=mon,mode=control: warning: '-mon' is deprecated"
    result = _result()
    result.error = "QEMU exited during cpr-exec (code -11)" + migration._tail(f"{warn}\n{warn}\n")
    assert result.summary() == "live a -> b failed: QEMU exited during cpr-exec (code -11)"
    result.error = "the new QEMU image exited (code 1)" + migration._tail(f"{warn}\nqemu: cannot bind socket\n")
    assert result.summary() == "live a -> b failed: the new QEMU image exited (code 1) (QEMU: qemu: cannot bind socket)"
    result.error = "Unable to write to socket: Broken pipe\nmigration failed"  # no QEMU output: the last line
    assert result.summary() == "live a -> b failed: migration failed"
    result.error = migration._tail(f"{warn}\nqemu: cannot bind socket")  # QEMU's words alone
    assert result.summary() == "live a -> b failed: qemu: cannot bind socket"
    result.error = ""
    assert result.summary() == "live a -> b failed: failed"
