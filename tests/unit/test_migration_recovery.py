"""What the harness does to the source after a failed migration (QMP faked; the real
thing runs in tests/integration/test_aarch64.py and test_faults.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from harness import migration
from harness.qemu_process import QmpError


class FakeQemu:
    """A source QEMU whose run state follows a script of query-status answers."""

    def __init__(self, states: list[str], *, cont_fails: bool = False) -> None:
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
    ok = migration.recover_source(SimpleNamespace(process=qemu), result, **kw)  # type: ignore[arg-type]
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
