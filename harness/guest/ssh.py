"""SSH to a guest with paramiko: pinned host key (unknown keys rejected), key login,
bounded waits, and jumps through a guest to reach a nested one."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from harness.errors import GuestCommandError, GuestTimeout, MachineError

log = logging.getLogger(__name__)

MAX_OUTPUT = 16 * 1024 * 1024
#: A guest command run detached, after the SSH command returned (reboot, poweroff).
DETACHED = "(sleep 0.5; {cmd}) </dev/null >/dev/null 2>&1 &"


@dataclass(frozen=True)
class CommandResult:
    """What a command in the guest did."""

    command: str
    rc: int
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self) -> CommandResult:
        """Raise :class:`GuestCommandError` unless the command succeeded."""
        if self.rc != 0:
            raise GuestCommandError(self.command, self.rc, self.stdout, self.stderr)
        return self

    def json(self) -> Any:
        """stdout parsed as JSON (the guest agent's answers); the last JSON line wins."""
        lines = [line for line in self.stdout.strip().splitlines() if line.strip().startswith(("{", "["))]
        if not lines:
            raise GuestCommandError(self.command, self.rc, self.stdout, "stdout is not JSON")
        try:
            return json.loads(lines[-1])
        except (ValueError, RecursionError) as exc:  # untrusted: deep nesting too
            raise GuestCommandError(self.command, self.rc, self.stdout, f"stdout is not JSON: {exc}") from None


def parse_host_key(line: str) -> paramiko.PKey:
    """A public key from an OpenSSH ``type base64 [comment]`` line."""
    parts = line.split()
    if len(parts) < 2:
        raise MachineError(f"malformed pinned host key {line!r}")
    kind = parts[0]
    classes: dict[str, Any] = {"ssh-ed25519": paramiko.Ed25519Key, "ssh-rsa": paramiko.RSAKey}
    cls = classes.get(kind) or (paramiko.ECDSAKey if kind.startswith("ecdsa-") else None)
    if cls is None:
        raise MachineError(f"unsupported pinned host key type {kind!r}")
    try:
        key: paramiko.PKey = cls(data=base64.b64decode(parts[1], validate=True))
    except (ValueError, paramiko.SSHException) as exc:  # binascii.Error is a ValueError
        raise MachineError(f"malformed pinned host key {line[:80]!r}: {exc}") from exc
    return key


def tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection with Nagle's algorithm off: SSH's handshake and every command are
    small messages each waiting for an answer, and Nagle holding one back until the
    peer's delayed ACK cost 40 ms a round trip (a connection took 130 ms instead of 50)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def load_client_key(path: Path) -> paramiko.PKey:
    """The client's private key (OpenSSH format), loaded once per process and file version."""
    try:
        st = path.stat()
    except OSError as exc:
        raise MachineError(f"cannot read SSH client key {path}: {exc.strerror or exc}") from exc
    return _load_client_key(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _load_client_key(path: str, size: int, mtime_ns: int) -> paramiko.PKey:
    """:func:`load_client_key` of one file version (loading an RSA key checks it: 40-80 ms)."""
    errors = []
    for cls in (paramiko.RSAKey, paramiko.Ed25519Key, paramiko.ECDSAKey):
        try:
            key: paramiko.PKey = cls.from_private_key_file(path)
        except (paramiko.SSHException, ValueError) as exc:
            errors.append(f"{cls.__name__}: {exc}")
            continue
        return key
    raise MachineError(f"cannot load SSH client key {path}: {'; '.join(errors)}")


class SshClient:
    """An SSH session to one guest, with its host key pinned."""

    def __init__(
        self,
        host: str,
        port: int,
        host_key: str,
        client_key: Path,
        user: str = "root",
        via: SshClient | None = None,
        name: str = "guest",
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.name = name
        self._host_key = parse_host_key(host_key)
        self._client_key_path = client_key
        self._via = via
        self._client: paramiko.SSHClient | None = None

    def _host_entry(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def connect(self, timeout: float = 60.0) -> SshClient:
        """Connect (retrying while the guest's sshd comes up) within ``timeout``."""
        deadline = time.monotonic() + timeout
        last = ""
        pkey = load_client_key(self._client_key_path)
        while True:
            client = paramiko.SSHClient()
            client.get_host_keys().add(self._host_entry(), self._host_key.get_name(), self._host_key)
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            sock: Any = None
            try:
                left = max(1.0, deadline - time.monotonic())
                if self._via is not None:
                    sock = self._via.open_tunnel(self.host, self.port)
                else:
                    sock = tcp_connect(self.host, self.port, timeout=min(10.0, left))
                client.connect(
                    self.host,
                    port=self.port,
                    username=self.user,
                    pkey=pkey,
                    sock=sock,
                    timeout=min(10.0, left),
                    banner_timeout=min(30.0, left),
                    auth_timeout=min(30.0, left),
                    allow_agent=False,
                    look_for_keys=False,
                )
                self._client = client
                return self
            except paramiko.BadHostKeyException as exc:
                client.close()
                raise MachineError(
                    f"{self.name}: host key mismatch at {self._host_entry()}: got "
                    f"{exc.key.get_name()} {exc.key.get_base64()[:24]}..., pinned "
                    f"{self._host_key.get_base64()[:24]}...; refusing to connect"
                ) from exc
            except (OSError, paramiko.SSHException, EOFError) as exc:
                client.close()
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise GuestTimeout(f"SSH to {self.name} at {self._host_entry()}", timeout, last)
            time.sleep(0.5)

    @property
    def transport(self) -> paramiko.Transport:
        if self._client is None:
            self.connect()
        assert self._client is not None
        t = self._client.get_transport()
        if t is None or not t.is_active():
            self.close()
            self.connect()
            assert self._client is not None
            t = self._client.get_transport()
            assert t is not None
        return t

    def open_tunnel(self, host: str, port: int, timeout: float = 10.0) -> paramiko.Channel:
        """A TCP channel from the guest to ``host:port`` (to reach a nested guest)."""
        try:
            return self.transport.open_channel(
                "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout
            )
        except (paramiko.SSHException, OSError) as exc:
            raise MachineError(f"{self.name}: tunnel to {host}:{port} failed: {exc}") from exc

    def _connection_lost(self) -> bool:
        t = self._client.get_transport() if self._client is not None else None
        return t is None or not t.is_active()

    def _open_session(self, command: str, opening: float) -> paramiko.Channel:
        """A session channel.  A paused or frozen guest never answers the request: that
        is a :class:`GuestTimeout` after ``opening`` s, and a fresh connection next time
        (a late answer would confuse this transport).  Any other failure (the connection
        died under us, or the server refused the channel: paramiko says "Unable to open
        channel." for both, seen with a busy nested L1's dropbear) is retried once on a
        new connection."""
        for attempt in (1, 2):
            try:
                return self.transport.open_session(timeout=opening)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                unanswered = "Timeout opening channel" in str(exc) and not self._connection_lost()
                lost = not unanswered
                why = f"{type(exc).__name__}: {exc}"
                self.close()
                if attempt == 2 or not lost:
                    raise GuestTimeout(f"an SSH session for {command!r} in {self.name}", opening,
                                       why + (" (after a reconnect)" if attempt == 2 else "")) from exc
                log.info("%s: SSH connection lost opening a session (%s); reconnecting", self.name, why)
                self.connect(timeout=max(30.0, opening))
        raise AssertionError("unreachable")

    def _start(self, command: str, opening: float, timeout: float) -> paramiko.Channel:
        """A session channel running ``command``.  A server that closes the channel
        before answering the exec request (seen from a busy nested L1's dropbear) did not
        run the command: that is retried once on a new connection."""
        for attempt in (1, 2):
            chan = self._open_session(command, opening)
            chan.settimeout(timeout)
            try:
                chan.exec_command(command)
                return chan
            except (paramiko.SSHException, OSError, EOFError) as exc:
                chan.close()
                self.close()
                if attempt == 2 or isinstance(exc, TimeoutError):
                    raise GuestTimeout(f"starting {command!r} in {self.name}", timeout,
                                       f"{type(exc).__name__}: {exc}") from exc
                log.info("%s: channel closed before %r started (%s); retrying on a new connection",
                         self.name, command, exc)
        raise AssertionError("unreachable")

    def run(self, command: str, timeout: float = 120.0, check: bool = False,
            input: str | None = None) -> CommandResult:
        """Run ``command`` in the guest; bounded by ``timeout``."""
        t0 = time.monotonic()
        chan = self._start(command, min(10.0, timeout), timeout)
        try:
            if input is not None:
                chan.sendall(input.encode())
                chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = t0 + timeout
            while True:
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    raise GuestTimeout(
                        f"command {command!r} in {self.name}", timeout,
                        (out + err).decode("utf-8", "replace")[-500:],
                    )
                if len(out) > MAX_OUTPUT or len(err) > MAX_OUTPUT:
                    raise MachineError(f"{self.name}: {command!r} printed more than {MAX_OUTPUT} bytes")
                time.sleep(0.005)
            rc = chan.recv_exit_status()
        except TimeoutError as exc:
            raise GuestTimeout(f"command {command!r} in {self.name}", timeout) from exc
        finally:
            chan.close()
        result = CommandResult(
            command, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
            time.monotonic() - t0,
        )
        if check:
            result.check()
        return result

    def converse(self, command: str, timeout: float = 30.0) -> Conversation:
        """Start ``command``, which answers each line of input with one line of output,
        for several exchanges over one channel (no new channel or process per question);
        use as a context manager."""
        return Conversation(self._start(command, min(10.0, timeout), timeout), command, self.name, timeout)

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # closing a dead transport
                self._client.close()
            self._client = None

    def __enter__(self) -> SshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Conversation:
    """A guest command that answers a line with a line (:meth:`SshClient.converse`)."""

    def __init__(self, chan: paramiko.Channel, command: str, name: str, timeout: float) -> None:
        self._chan = chan
        self._buf = bytearray()
        self.command = command
        self.name = name
        self.timeout = timeout

    def ask(self, line: str = "") -> str:
        """Send ``line`` and a newline; the next line the command prints."""
        with self._errors():
            self._chan.sendall(line.encode() + b"\n")
        return self.read_line(line)

    def read_line(self, line: str = "") -> str:
        """The next line the command prints (``line``: what it answers, for the error)."""
        with self._errors():
            while b"\n" not in self._buf:
                data = self._chan.recv(4096)
                if not data:
                    err = b""
                    while self._chan.recv_stderr_ready():
                        err += self._chan.recv_stderr(65536)
                    raise MachineError(f"{self.name}: {self.command!r} ended before answering "
                                       f"{line!r}: {err.decode('utf-8', 'replace')[-300:]!r}")  # fmt: skip
                self._buf += data
                if len(self._buf) > MAX_OUTPUT:
                    raise MachineError(f"{self.name}: {self.command!r} printed more than {MAX_OUTPUT} bytes")
        answer, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        return answer.decode("utf-8", "replace")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The channel's errors as the harness's: a timeout names the command."""
        try:
            yield
        except TimeoutError as exc:
            raise GuestTimeout(f"an answer of {self.command!r} in {self.name}", self.timeout) from exc
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise MachineError(f"{self.name}: {self.command!r}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the channel or the connection may be gone
            self._chan.shutdown_write()
        self._chan.close()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
