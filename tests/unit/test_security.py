"""Security checks: no shell=True in harness/, restrictive file and directory modes, SSH
host keys pinned (an unknown key rejected, a malformed pinned key refused), guest output
(console and agent) parsed defensively, and - on a QEMU started paused from a real spec
(no guest boots, about a second) - QMP over a socketpair, serial and migration sockets in
0700 directories, and the forwarded SSH port bound to 127.0.0.1 only."""

from __future__ import annotations

import ast
import contextlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
import pytest

from harness import varstore
from harness.errors import GuestCommandError, GuestTimeout, MachineError
from harness.factory import private_base
from harness.guest.console import MAX_LINE, Console, clean
from harness.guest.qemu_process import QemuProcess
from harness.guest.ssh import CommandResult, SshClient, parse_host_key
from harness.machine import Incarnation, Machine

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "harness"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- no shell ------------------------------------------------------------------------------


def shell_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls that hand a string to a shell: ``shell=<anything but False>``, os.system,
    os.popen, subprocess.getoutput/getstatusoutput."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{filename}:{node.lineno}: shell={ast.unparse(kw.value)}")
        name = ast.unparse(node.func)
        if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
            found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_the_shell_scanner_finds_shells() -> None:
    bad = "import os, subprocess\nsubprocess.run(cmd, shell=True)\nos.system('x')\nsubprocess.Popen(c, shell=flag)\n"
    assert len(shell_calls(bad)) == 3
    assert shell_calls("subprocess.run(['a'], shell=False)\n") == []


def test_no_shell_anywhere_in_harness() -> None:
    files = sorted(HARNESS.rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in shell_calls(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == []


def test_ruff_shell_rules_pass_on_harness_and_fail_on_a_shell(tmp_path: Path) -> None:
    ruff = ROOT / ".venv/bin/ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed in .venv")
    rules = "S602,S604,S605"
    ok = subprocess.run([str(ruff), "check", "--select", rules, str(HARNESS)],
                        capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stdout
    bad = tmp_path / "bad.py"
    bad.write_text("import subprocess\n\nsubprocess.run('ls ' + x, shell=True)\n")
    caught = subprocess.run([str(ruff), "check", "--isolated", "--select", rules, str(bad)],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert caught.returncode != 0 and "S602" in caught.stdout


# --- file and directory modes ----------------------------------------------------------------


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0)  # the harness must not rely on the caller's umask
    try:
        yield
    finally:
        os.umask(old)


def test_private_varstore_copy_is_0600(tmp_path: Path, loose_umask: None, kept_templates: dict[str, Path]) -> None:
    template = kept_templates["template-2022.11-4m-ms.fd"]
    assert template is not None and _mode(template) & 0o077  # the template itself is world-readable
    copy = varstore.instantiate(template, tmp_path / "vars.fd")
    assert _mode(copy) == 0o600


@dataclass(frozen=True)
class _NoBuild:
    """A build as QemuProcess sees it, for constructing one that is never launched."""

    label: str = "none"
    binary: Path = Path("/nonexistent/qemu-system-x86_64")
    env: dict[str, str] = field(default_factory=dict)

    def data_args(self) -> list[str]:
        return []

    def wrapper(self) -> list[str]:
        return []


def test_work_dirs_are_0700(tmp_path: Path, loose_umask: None) -> None:
    base = private_base("-sec")
    try:
        assert _mode(base) == 0o700
    finally:
        base.rmdir()
    loose = tmp_path / "qemu-work"
    loose.mkdir(mode=0o755)
    QemuProcess(_NoBuild(), [], workdir=loose)  # constructed, not launched
    assert _mode(loose) == 0o700


# --- SSH host keys pinned ------------------------------------------------------------------


class _Server(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "publickey"


@pytest.fixture
def fake_sshd(ssh_keys: Any) -> Iterator[tuple[int, paramiko.PKey]]:
    """A local SSH server with a fresh host key that refuses every login."""
    key = ssh_keys.host
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(30)
    stop = threading.Event()
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            t = paramiko.Transport(conn)
            t.add_server_key(key)
            transports.append(t)
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                t.start_server(server=_Server())

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        yield srv.getsockname()[1], key
    finally:
        stop.set()
        srv.close()
        for t in transports:
            t.close()
        th.join(timeout=5)


def _line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def test_unknown_host_key_is_rejected(fake_sshd: tuple[int, paramiko.PKey], ssh_keys: Any) -> None:
    port, _served = fake_sshd
    client = SshClient("127.0.0.1", port, ssh_keys.other_host_line, ssh_keys.client_file, name="fake")
    with pytest.raises(MachineError, match="host key mismatch"):
        client.connect(timeout=20)


def test_pinned_host_key_is_accepted(fake_sshd: tuple[int, paramiko.PKey], ssh_keys: Any) -> None:
    # the same server with its key pinned gets past the host key (and fails at login)
    port, served = fake_sshd
    client = SshClient("127.0.0.1", port, _line(served), ssh_keys.client_file, name="fake")
    with pytest.raises(GuestTimeout) as exc:
        client.connect(timeout=3)
    assert "Authentication" in exc.value.last_seen


@pytest.mark.parametrize("line", ["ssh-ed25519", "ssh-ed25519 !!!notbase64", "ssh-ed25519 AAAA",
                                  "ssh-dss AAAAB3NzaC1kc3M=", "ecdsa-sha2-nistp256 Zm9v"])
def test_malformed_pinned_key_is_our_error(line: str) -> None:
    with pytest.raises(MachineError, match="pinned host key"):
        parse_host_key(line)


# --- guest output, parsed defensively ---------------------------------------------------------


def test_escape_sequences_and_controls_are_stripped() -> None:
    raw = "\x1b[2J\x1b[1;1HHARNESS-\x1b[1mREADY\x1b[0m\r\n\x00\x07bell\x1bc\x1b]0;evil title\x07!"
    assert clean(raw) == "HARNESS-READY\nbell!"


def test_console_survives_garbage_and_huge_lines(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    garbage = os.urandom(200_000).replace(b"\n", b"")
    log.write_bytes(garbage + b"A" * (4 * MAX_LINE) + b"\n\x1b[32mHARNESS-READY\x1b[0m {\"boot_id\": \"x\"}\n")
    con = Console(log)
    m = con.wait_for(r"HARNESS-READY (\{[^\n]*\})", timeout=5, since=0)
    assert m.group(1) == '{"boot_id": "x"}'
    assert all(len(line) <= MAX_LINE for line in con._read_from(0).split("\n"))


def test_console_wait_times_out_with_what_it_saw(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"\x1b[31mnot it\x1b[0m\n" + b"\xff" * 10)
    with pytest.raises(GuestTimeout) as exc:
        Console(log).wait_for("HARNESS-READY", timeout=0.5, since=0, what="the ready line")
    assert "not it" in exc.value.last_seen and "\x1b" not in exc.value.last_seen


def _ready_machine(log: Path) -> Machine:
    m = Machine.__new__(Machine)  # only the console is needed to parse the ready line
    m._current = Incarnation(process=None, resolved=None, varstore=None, console=Console(log))  # type: ignore[arg-type]
    m.ready = None
    return m


@pytest.mark.parametrize("payload", [
    '{"boot_id": ' + "[" * 3000 + "}",  # deep nesting: RecursionError in json
    '{"boot_id": "x"',  # never closed: not a ready line at all -> timeout
    '{"boot_id": 5}',  # wrong type
    '{"other": "x"}',  # no boot_id
])
def test_malformed_ready_lines_are_our_errors(tmp_path: Path, payload: str) -> None:
    log = tmp_path / "serial.log"
    log.write_text(f"HARNESS-READY {payload}\n")
    with pytest.raises((MachineError, GuestTimeout)):
        _ready_machine(log).wait_ready(timeout=0.5)


@pytest.mark.parametrize("stdout", [
    "",
    "garbage\x00\xff",
    "[" * 5000 + "]" * 5000,  # deep nesting
    '\x1b[31m{"a": 1}\x1b[0m',  # escape codes around JSON
    "{" + "x" * (4 << 20),  # a huge broken line
    '{"ok": 1}\n{"broken": ',  # the last JSON line is broken
])
def test_agent_output_is_parsed_defensively(stdout: str) -> None:
    with pytest.raises(GuestCommandError, match="not JSON"):
        CommandResult("agent status", 0, stdout, "", 0.0).json()


def test_agent_output_last_json_line_wins() -> None:
    res = CommandResult("agent status", 0, 'noise\n{"a": 1}\n\x1b[0mtrailer\n{"b": [1, 2]}\n', "", 0.0)
    assert res.json() == {"b": [1, 2]}
    big = '{"blob": "' + "y" * (2 << 20) + '"}'
    assert len(CommandResult("agent status", 0, big, "", 0.0).json()["blob"]) == 2 << 20


# --- a paused QEMU from a real spec: QMP, sockets, forwarded port -----------------------------


def test_no_python_runs_between_fork_and_exec() -> None:
    # preexec_fn runs Python in the forked child while other threads (paramiko, console
    # readers) may hold locks: unsafe.  The parent-death signal is set by setpriv instead.
    found = []
    for path in sorted(HARNESS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.keyword) and node.arg == "preexec_fn":
                found.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
    assert found == [], f"preexec_fn in {found}"


def test_children_get_their_parent_death_signal_from_setpriv() -> None:
    from harness.guest.qemu_process import die_with_parent

    argv, env = die_with_parent(["qemu-system-x86_64", "-S"], {"LD_LIBRARY_PATH": "/p/lib", "A": "1"})
    assert argv[1:4] == ["--pdeathsig", "KILL", "--"] and argv[0].endswith("setpriv")
    assert argv[4:6] == ["/bin/sh", "-c"] and argv[7] == str(os.getpid())
    # the host's setpriv never loads a prefix's libraries; QEMU still gets them
    assert "LD_LIBRARY_PATH" not in env and env["A"] == "1"
    assert argv[8:] == ["env", "LD_LIBRARY_PATH=/p/lib", "qemu-system-x86_64", "-S"]
    script = "import time; time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from harness.guest.qemu_process import die_with_parent\n"
        f"argv, env = die_with_parent([sys.executable, '-c', {script!r}], {{}})\n"
        "child = subprocess.Popen(argv, env=env)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    parent.kill()  # at once: before the child armed its signal, or after; it must die either way
    parent.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break  # gone
        if state == "Z":
            break
        assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
        time.sleep(0.05)


def test_a_child_whose_parent_is_already_gone_does_not_run() -> None:
    from harness.guest.qemu_process import die_with_parent

    argv, env = die_with_parent(["sh", "-c", "echo RAN"], dict(os.environ))
    argv[7] = "1"  # as if the parent had died before the signal was armed (reparented)
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 125 and "RAN" not in res.stdout
    argv, env = die_with_parent(["sh", "-c", "echo RAN"], dict(os.environ))
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0 and res.stdout == "RAN\n"
