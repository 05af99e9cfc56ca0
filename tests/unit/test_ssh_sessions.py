"""When SshClient.run reconnects and when it gives up (transport faked: the real paths
run in every integration test, and the nested ones lose L1's connection for real), and the
one-channel conversation the clock samples use."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest

from harness.errors import GuestTimeout
from harness.guest.ssh import SshClient


class FakeTransport:
    def __init__(self, failure: Exception | None, *, dies: bool) -> None:
        self.failure, self.dies, self.active = failure, dies, True

    def is_active(self) -> bool:
        return self.active

    def open_session(self, timeout: float) -> Any:
        if self.failure is not None:
            if self.dies:
                self.active = False
            raise self.failure
        return "channel"


_KEYS: list[tuple[str, Path]] = []


@pytest.fixture(autouse=True, scope="module")
def _ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A host key line and a client key file of our own: no guest image needed."""
    host, client = paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)
    path = tmp_path_factory.mktemp("sshkeys") / "client_key"
    client.write_private_key_file(str(path))
    _KEYS.append((f"{host.get_name()} {host.get_base64()}", path))
    yield
    _KEYS.clear()


def _keys() -> tuple[str, Path]:
    return _KEYS[-1]


class Client(SshClient):
    def __init__(self, transports: list[FakeTransport]) -> None:
        host_key, client_key = _keys()
        super().__init__("127.0.0.1", 2222, host_key, client_key, name="fake")
        self.transports = transports
        self.connects = 0
        self._client = self._wrap(transports.pop(0))

    @staticmethod
    def _wrap(t: FakeTransport) -> Any:
        class C:
            def get_transport(self) -> FakeTransport:
                return t

            def close(self) -> None:
                t.active = False

        return C()

    def connect(self, timeout: float = 60.0) -> SshClient:
        self.connects += 1
        self._client = self._wrap(self.transports.pop(0))
        return self

    @property
    def transport(self) -> Any:
        if self._client is None:  # as SshClient.transport: connect on first use
            self.connect()
        assert self._client is not None
        return self._client.get_transport()


def test_a_guest_that_does_not_answer_is_a_timeout_without_reconnecting() -> None:
    c = Client([FakeTransport(paramiko.SSHException("Timeout opening channel."), dies=False)])
    with pytest.raises(GuestTimeout) as exc:
        c._open_session("true", 0.1)
    assert c.connects == 0 and "Timeout opening channel" in exc.value.last_seen


def test_a_connection_lost_under_us_is_reconnected_once() -> None:
    c = Client([FakeTransport(paramiko.SSHException("Unable to open channel."), dies=True),
                FakeTransport(None, dies=False)])  # fmt: skip
    assert c._open_session("true", 0.1) == "channel"
    assert c.connects == 1


def test_a_refused_channel_is_retried_on_a_new_connection() -> None:
    c = Client([FakeTransport(paramiko.ChannelException(4, "Resource shortage"), dies=False),
                FakeTransport(None, dies=False)])  # fmt: skip
    assert c._open_session("true", 0.1) == "channel" and c.connects == 1


def test_a_second_loss_is_reported_with_the_reconnect() -> None:
    lost = paramiko.SSHException("Unable to open channel.")
    c = Client([FakeTransport(lost, dies=True), FakeTransport(lost, dies=True)])
    with pytest.raises(GuestTimeout) as exc:
        c._open_session("true", 0.1)
    assert c.connects == 1 and "after a reconnect" in exc.value.last_seen


def test_a_refusal_on_a_live_connection_is_retried_too() -> None:
    # paramiko's "Unable to open channel." with the transport still up (a nested L1, in
    # the full suite): not a guest that stopped answering
    c = Client([FakeTransport(paramiko.SSHException("Unable to open channel."), dies=False),
                FakeTransport(None, dies=False)])  # fmt: skip
    assert c._open_session("true", 0.1) == "channel" and c.connects == 1


class FakeChannel:
    def __init__(self, fail: bool) -> None:
        self.fail, self.closed, self.ran = fail, False, None

    def settimeout(self, t: float) -> None:
        pass

    def exec_command(self, command: str) -> None:
        if self.fail:
            raise paramiko.SSHException("Channel closed.")
        self.ran = command

    def close(self) -> None:
        self.closed = True


class ChannelTransport(FakeTransport):
    def __init__(self, chan: FakeChannel) -> None:
        super().__init__(None, dies=False)
        self.chan = chan

    def open_session(self, timeout: float) -> Any:
        return self.chan


def test_a_channel_closed_before_the_command_started_is_retried_once() -> None:
    bad, good = FakeChannel(fail=True), FakeChannel(fail=False)
    c = Client([ChannelTransport(bad), ChannelTransport(good)])
    assert c._start("agent status", 0.1, 5.0) is good
    assert bad.closed and good.ran == "agent status" and c.connects == 1


def test_a_second_closed_channel_is_our_error() -> None:
    c = Client([ChannelTransport(FakeChannel(fail=True)), ChannelTransport(FakeChannel(fail=True))])
    with pytest.raises(GuestTimeout) as exc:
        c._start("agent status", 0.1, 5.0)
    assert "Channel closed" in exc.value.last_seen and c.connects == 1


def test_client_key_loaded_once_per_file_version_and_bad_keys_named(tmp_path: Path) -> None:
    from harness.errors import MachineError
    from harness.guest.ssh import load_client_key

    _, path = _keys()
    first = load_client_key(path)
    assert load_client_key(path) is first  # remembered: loading an RSA key checks it
    copy = tmp_path / "client_key"
    paramiko.RSAKey.generate(1024).write_private_key_file(str(copy))
    other = load_client_key(copy)
    assert other.get_base64() != first.get_base64()
    copy.write_text("not a key\n")
    with pytest.raises(MachineError, match=f"cannot load SSH client key {copy}"):
        load_client_key(copy)
    copy.unlink()
    with pytest.raises(MachineError, match=f"cannot read SSH client key {copy}"):
        load_client_key(copy)


# --- a conversation over one channel (the clock samples) ------------------------------------


class LineChannel:
    """Answers each line with the next of ``answers``, in pieces of ``chunk`` bytes; an
    empty answer list ends the command (EOF, with ``stderr``)."""

    def __init__(self, answers: list[bytes], chunk: int = 3, stderr: bytes = b"") -> None:
        self.answers, self.chunk, self.stderr = answers, chunk, stderr
        self.sent: list[bytes] = []
        self.pending = b""
        self.closed = self.shut = False

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)
        if self.answers:
            self.pending += self.answers.pop(0)

    def recv(self, n: int) -> bytes:
        if not self.pending:
            if self.answers or not self.sent:
                raise TimeoutError("no answer")
            return b""
        out, self.pending = self.pending[:min(n, self.chunk)], self.pending[min(n, self.chunk):]
        return out

    def recv_stderr_ready(self) -> bool:
        return bool(self.stderr)

    def recv_stderr(self, n: int) -> bytes:
        out, self.stderr = self.stderr, b""
        return out

    def shutdown_write(self) -> None:
        self.shut = True

    def close(self) -> None:
        self.closed = True


def test_conversation_reads_one_line_per_question_across_pieces() -> None:
    from harness.guest.ssh import Conversation

    chan = LineChannel([b"12.50\n", b"12.75\n"])
    with Conversation(chan, "loop", "fake", 5.0) as conv:  # type: ignore[arg-type]
        assert conv.ask() == "12.50" and conv.ask() == "12.75"
    assert chan.sent == [b"\n", b"\n"] and chan.shut and chan.closed


def test_conversation_says_what_ended_and_what_timed_out() -> None:
    from harness.errors import MachineError
    from harness.guest.ssh import Conversation

    ended = Conversation(LineChannel([], stderr=b"sh: read: bad"), "loop", "fake", 5.0)  # type: ignore[arg-type]
    with pytest.raises(MachineError, match="'loop' ended before answering.*sh: read: bad"):
        ended.ask()
    silent = LineChannel([b"", b"12.5\n"])  # takes the question, answers only the next one
    with pytest.raises(GuestTimeout, match="an answer of 'loop' in fake"):
        Conversation(silent, "loop", "fake", 5.0).ask()  # type: ignore[arg-type]


def _conversing_ssh(chan: LineChannel) -> Any:
    """An SSH client whose every ``converse`` talks to ``chan`` (and records the command)."""
    from harness.guest.ssh import Conversation

    class Ssh:
        def __init__(self) -> None:
            self.started: list[str] = []

        def converse(self, command: str, timeout: float = 30.0) -> Conversation:
            self.started.append(command)
            return Conversation(chan, command, "fake", timeout)  # type: ignore[arg-type]

    return Ssh()


def test_clock_sample_keeps_the_shortest_round_trip_of_one_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import state

    chan = LineChannel([b"100.00 50.0\n", b"100.50 50.0\n", b"101.00 50.0\n"])
    ticks = iter([0.0, 0.4, 1.0, 1.01, 2.0, 2.2])  # round trips 0.4, 0.01, 0.2
    monkeypatch.setattr(time, "monotonic", lambda: next(ticks))

    ssh = _conversing_ssh(chan)
    sample = state.clock_sample_over(ssh, 3)
    assert ssh.started == [state.UPTIME_LOOP] and len(chan.sent) == 3 and chan.closed
    assert (sample.guest, sample.host, round(sample.rtt, 3)) == (100.5, 1.005, 0.01)


def test_status_memory_variables_and_clock_come_over_one_channel() -> None:
    """state.status_and_clock: one command prints each part's JSON lines and its exit
    status, then answers uptime questions; an absent variable is None."""
    from harness import state

    status = {"boot_id": "b", "uptime": 1.5, "heartbeat": {"count": 3}}
    mem = {"size_mb": 16, "seed": "s", "checksum": "aa", "expected": "aa"}
    chan = LineChannel([b"100.00 50.0\n", b"100.50 50.0\n", b"101.00 50.0\n"])
    chan.pending = "".join([json.dumps(status), "\n", json.dumps(mem), "\nHARNESS-PART-END 0\n",
                            json.dumps({"data": b"hi".hex()}), "\nHARNESS-PART-END 0\n",
                            '{"error": "no such variable"}\nHARNESS-PART-END 1\n']).encode()  # fmt: skip
    ssh = _conversing_ssh(chan)
    got = state.status_and_clock(ssh, True, ["A-1", "B-2"])
    assert (got.status, got.mem, got.efivars) == (status, mem, {"A-1": b"hi", "B-2": None})
    assert got.clock.guest in (100.0, 100.5, 101.0) and len(chan.sent) == 3 and chan.closed
    (command,) = ssh.started
    assert command.startswith("agent status && agent mem-checksum; echo \"HARNESS-PART-END $?\"; ")
    assert "agent efivar get A-1; " in command and command.endswith(state.UPTIME_LOOP)
    gs = state.guest_state(got)
    assert (gs.boot_id, gs.heartbeat, gs.mem_checksum, gs.efivars["A-1"]) == ("b", 3, "aa", b"hi")


@pytest.mark.parametrize(("preamble", "message"), [
    ('{"error": "agent: no memory region"}\nHARNESS-PART-END 1\n', r"answered .*no memory region.* with status 1"),
    ('{"boot_id": "b"}\nHARNESS-PART-END 0\n', r"expected 2 JSON object lines"),
    ("sh: agent: not found\nHARNESS-PART-END 127\n", r"printed 'sh: agent: not found', not JSON"),
    ('{"boot_id": "b"}\n{"checksum": "aa"}\nHARNESS-PART-END x\n', r"malformed end line"),
])  # fmt: skip
def test_status_and_clock_refuses_a_failed_or_malformed_answer(preamble: str, message: str) -> None:
    from harness import state
    from harness.errors import StateError

    chan = LineChannel([b"100.00 50.0\n"] * 3)
    chan.pending = preamble.encode()
    with pytest.raises(StateError, match=message):
        state.status_and_clock(_conversing_ssh(chan), True, who="fake")
