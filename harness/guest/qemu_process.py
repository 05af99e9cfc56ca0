"""One QEMU process, owned by exactly one object that always reaps it.

:class:`QemuProcess` wraps ``qemu.machine.QEMUMachine`` (launch = pre-launch, launch,
post-launch; soft ``quit`` with a bounded wait, then a hard kill) and adds what a nightly
harness needs on top:

- the build's environment (its libraries) and ``-L`` data directories;
- a new session (process group) and a parent-death signal, so QEMU dies with the harness
  even when the harness is SIGKILLed (a killed xdist worker leaves no orphan);
- a private 0700 work directory for sockets and logs;
- a QMP transcript (``qmp.log``) and the command line (``cmdline.txt``) kept for artifacts;
- QMP that may be connected later (a cpr-transfer destination answers QMP only once the
  source has sent its CPR state);
- errors from :mod:`harness.errors` that carry the command, the exit code and the log.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from harness.errors import GuestTimeout, HostError, LaunchError, MachineError


class RunnableBuild(Protocol):
    """What this module needs of a QEMU build (:class:`harness.inventory.builds.RunnableBuild` is one):
    its label, binary, data directories, command prefix and environment."""

    @property
    def label(self) -> str: ...

    @property
    def binary(self) -> Path: ...

    @property
    def env(self) -> dict[str, str]: ...

    def data_args(self) -> list[str]: ...

    def wrapper(self) -> list[str]: ...

log = logging.getLogger(__name__)

_SO_ACCEPTCON = 0x10000  # /proc/net/unix "Flags" of a socket that listen() was called on
_LIVE: set[QemuProcess[Any]] = set()
_LIVE_LOCK = threading.Lock()

INSTALL_QEMU_MACHINE = "harness install-qemu-machine"


def qemu_machine_missing() -> str | None:
    """Why ``qemu.machine`` cannot be used in this environment (one line naming the command
    that installs it), or None when it can."""
    try:
        import qemu.machine  # noqa: F401
        import qemu.qmp  # noqa: F401
    except ImportError as exc:
        return (f"qemu.machine is not installed in this Python ({sys.executable}): {exc}; "
                f"`{INSTALL_QEMU_MACHINE}` installs it from Debian's QEMU source")  # fmt: skip
    return None


@functools.cache
def _qm() -> Any:
    """``qemu.machine.machine``, imported when a guest is first needed: importing the
    harness (its CLI, its pytest plugin) never needs it."""
    why = qemu_machine_missing()
    if why:
        raise HostError(why)
    from qemu.machine import machine

    return machine


# Run by /bin/sh after setpriv set the parent-death signal: a parent that died before that
# (the signal would never come) shows as a changed parent pid, and the child gives up.
_PARENT_CHECK = 'if [ "$PPID" != "$0" ]; then exit 125; fi; exec "$@"'


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv")


def die_with_parent(argv: Sequence[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` and ``env`` rewritten so that the child gets a parent-death signal (SIGKILL)
    before it execs the real program: util-linux's ``setpriv`` sets it, then ``/bin/sh``
    checks that the parent is still the one that started it (else the signal was armed too
    late and the child exits 125), then execs the program.  No Python code runs in the
    child between fork and exec.  The signal fires when the thread that forked the child
    exits: QEMU and swtpm are always launched from the thread that owns them.

    A build's ``LD_LIBRARY_PATH`` is handed on through ``env`` (coreutils) after those, so
    the host's setpriv and sh never load a prefix's libraries."""
    tool = _setpriv()
    if tool is None:
        raise HostError("setpriv (util-linux) not found: the harness needs it to tie every "
                        "QEMU and swtpm to its own life (apt install util-linux)")  # fmt: skip
    env = dict(env)
    prefix = [tool, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _PARENT_CHECK, str(os.getpid())]
    libpath = env.pop("LD_LIBRARY_PATH", None)
    if libpath:
        prefix += ["env", f"LD_LIBRARY_PATH={libpath}"]
    return [*prefix, *argv], env


class QmpError(MachineError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.command = command
        self.error_class = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"QMP {command} failed: {self.error_class}: {self.desc}")


def _machine_class() -> Any:
    return _make_machine_class(_qm().QEMUMachine)


@functools.cache
def _make_machine_class(base: Any) -> Any:
    class _Machine(base):  # type: ignore[misc]
        """QEMUMachine with our process setup and optionally deferred QMP."""

        def __init__(self, *args: Any, env: dict[str, str], defer_qmp: bool, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self._harness_env = env
            self._defer_qmp = defer_qmp

        def _launch(self) -> None:
            self._pre_launch()
            argv, env = die_with_parent(self._qemu_full_args, self._harness_env)
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._qemu_log_file,
                stderr=subprocess.STDOUT,
                shell=False,
                close_fds=False,
                env=env,
                start_new_session=True,
            )
            self._launched = True
            try:
                self._post_launch()
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    # Interrupted (Ctrl-C, SIGTERM) while connecting QMP: qemu.machine's
                    # launch() would wait 30 s for a QEMU that was never told to quit and
                    # then raise AbnormalShutdown in the interrupt's place (a `harness
                    # repro` interrupted so exited 70, not 130).  Reap it now; the
                    # interrupt goes on.
                    self._popen.kill()
                    self._popen.wait()
                raise

        def _post_launch(self) -> None:
            if self._defer_qmp:
                if self._sock_pair:
                    self._sock_pair[0].close()
                return
            super()._post_launch()

        def _load_io_log(self) -> None:
            # a corrupt migration stream can make QEMU print non-UTF-8 bytes: never crash on them
            if self._qemu_log_path is not None:
                with open(self._qemu_log_path, encoding="utf-8", errors="backslashreplace") as fh:
                    self._iolog = fh.read()

        def connect_deferred(self) -> None:
            self._defer_qmp = False
            if self._qmp_connection:
                # A cpr-transfer destination may emit events before it answers
                # qmp_capabilities, which the stock negotiation treats as a protocol error:
                # take the greeting, start the reader, then negotiate like any command.
                legacy = self._qmp
                client = legacy._qmp
                client.await_greeting = True
                client.negotiate = False
                legacy._sync(client.connect(legacy._address))
                legacy.cmd("qmp_capabilities")

        @property
        def log_path(self) -> str | None:
            path: str | None = self._qemu_log_path
            return path

    return _Machine


BuildT = TypeVar("BuildT", bound=RunnableBuild)


class QemuProcess(Generic[BuildT]):
    """A running QEMU: launched on ``__enter__``/``launch()``, reaped on ``__exit__``/``stop()``."""

    def __init__(
        self,
        build: BuildT,
        args: Sequence[str],
        *,
        workdir: Path,
        name: str = "qemu",
        defer_qmp: bool = False,
        qmp_timeout: float = 120.0,
    ) -> None:
        self.build = build
        self.args = list(args)
        self.name = name
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(workdir, 0o700)
        self.qmp_log_path = workdir / f"{name}.qmp.log"
        self.cmdline_path = workdir / f"{name}.cmdline.txt"
        self._qmp_timeout = qmp_timeout
        self._vm = _machine_class()(
            str(build.binary),
            args=[*build.data_args(), *self.args],
            wrapper=build.wrapper(),
            name=name,
            base_temp_dir=str(workdir),
            log_dir=str(workdir),
            env=build.env,
            defer_qmp=defer_qmp,
            qmp_timer=qmp_timeout,
        )
        self._launched = False
        self._exitcode: int | None = None
        self._final_log: str | None = None

    # -- lifetime ---------------------------------------------------------------------

    def launch(self) -> QemuProcess[BuildT]:
        """Start QEMU; on failure raise :class:`LaunchError` with command and output."""
        if self._launched:
            raise MachineError(f"{self.name}: already launched")
        try:
            self._vm.launch()
        except _qm().VMLaunchFailure as exc:
            self._write_cmdline()
            raise LaunchError(
                f"QEMU {self.build.label} failed to start",
                command=self._vm._qemu_full_args,
                exitcode=exc.exitcode,
                output=exc.output or "",
                log=self.log_path,
            ) from exc
        self._launched = True
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._write_cmdline()
        if self._vm._qmp_connection is not None and not self._vm._defer_qmp:
            self._set_qmp_timeout()
        return self

    def _set_qmp_timeout(self) -> None:
        """A new QMP connection's settings: its answer timeout, and its message log."""
        with contextlib.suppress(Exception):  # the connection may be deferred
            self._vm._qmp.settimeout(self._qmp_timeout)
            _format_only_when_logged(self._vm._qmp._qmp)

    def connect_qmp(self) -> None:
        """Connect a deferred QMP monitor (cpr-transfer destinations)."""
        try:
            self._vm.connect_deferred()
        except Exception as exc:  # the QMP library asserts when QEMU dies mid-connect
            raise MachineError(
                f"{self.name}: QMP connection failed ({exc!r}); QEMU log: {self.log_path}"
            ) from exc
        self._set_qmp_timeout()

    def cmdline_now(self) -> list[str]:
        """The process's argv as the kernel reports it now (changes when it exec's)."""
        try:
            raw = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except (OSError, MachineError):
            return []
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]

    def set_qmp_timeout(self, timeout: float) -> None:
        """Bound every QMP answer by ``timeout`` seconds (restored by :meth:`reexeced`)."""
        with contextlib.suppress(Exception):
            self._vm._qmp.settimeout(timeout)

    def reexeced(self, build: BuildT, argv: Sequence[str], qmp_path: Path,
                 timeout: float = 60.0) -> None:
        """The process exec'd a new QEMU image in place (cpr-exec): same pid, same owner,
        now running ``build`` with ``argv`` and answering QMP on the unix socket
        ``qmp_path``.  Waits for that socket to accept, connects, and drops the old
        connection (its peer is gone).  The command-line file and the transcript line are
        :meth:`record_exec`'s, for after the guest runs again."""
        try:
            new = connect_when_listening(qmp_path, timeout=timeout, alive=lambda: self.running)
        except GuestTimeout:
            raise
        except ProcessGone as exc:
            raise MachineError(
                f"{self.name}: the new QEMU image exited (code {self.exitcode}) before its "
                f"QMP socket listened ({exc}); log: {self.log_path}"
            ) from exc
        except Exception as exc:
            raise MachineError(
                f"{self.name}: QMP of the new QEMU image ({qmp_path}) failed: {exc!r}; "
                f"log: {self.log_path}"
            ) from exc
        old = self._vm._qmp_connection
        self._vm._qmp_connection = new
        if old is not None:
            with contextlib.suppress(Exception):  # its peer image is gone
                old.close()
        self.build = build
        self.args = list(argv)
        self._vm._qemu_full_args = tuple(argv)
        self._set_qmp_timeout()

    def record_exec(self) -> None:
        """Write down the exec :meth:`reexeced` took in: the command-line file names the
        new image's argv, the QMP transcript the exec."""
        self._write_cmdline()
        self._transcript("(exec)", {"argv": list(self.args)}, {"pid": self.pid}, time.monotonic())

    def _write_cmdline(self) -> None:
        try:
            args = [*self._vm._qemu_full_args]
            self.cmdline_path.write_text(shlex.join(args) + "\n")
        except OSError:
            pass

    def stop(self, timeout: float = 20.0, hard: bool = False) -> None:
        """Quit QEMU (QMP ``quit`` with a bounded wait, then SIGKILL) and reap it."""
        if not self._launched:
            return
        try:
            self._vm.shutdown(hard=hard, timeout=int(max(timeout, 1)))
        except _qm().AbnormalShutdown as exc:
            log.info("%s: graceful shutdown failed (%s); killed", self.name, exc.__cause__)
        except Exception as exc:  # noqa: BLE001 - teardown goes on and reaps
            log.warning("%s: shutdown raised %r; killing", self.name, exc)
            self._kill_now()
        finally:
            self._finish()

    def kill(self) -> None:
        """SIGKILL QEMU now and reap it."""
        if not self._launched:
            return
        try:
            self._vm.shutdown(hard=True)
        except Exception as exc:  # noqa: BLE001
            log.warning("%s: hard shutdown raised %r", self.name, exc)
            self._kill_now()
        finally:
            self._finish()

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (after a migration or guest poweroff)."""
        popen = self._vm._popen
        if popen is None:
            raise MachineError(f"{self.name}: not launched")
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"{self.name} (pid {popen.pid}) to exit", timeout) from None
        self._vm._quit_issued = True
        self.stop(timeout=1)
        return self._exitcode if self._exitcode is not None else popen.returncode

    def _kill_now(self) -> None:
        popen = self._vm._popen
        if popen is not None and popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            try:
                popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.error("%s: pid %d survived SIGKILL for 30 s", self.name, popen.pid)

    def _finish(self) -> None:
        popen = self._vm._popen
        if popen is not None:
            self._exitcode = popen.poll()
        self._final_log = self._vm.get_log()
        self._launched = False
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> QemuProcess[BuildT]:
        return self.launch()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # after an error, do not wait politely: the guest may be wedged
        self.stop(timeout=5 if exc_type else 20)

    # -- state ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._launched and self._vm.is_running()

    @property
    def pid(self) -> int:
        pid = self._vm.get_pid()
        if pid is None:
            raise MachineError(f"{self.name}: not running")
        return int(pid)

    @property
    def exitcode(self) -> int | None:
        if self._launched:
            code: int | None = self._vm.exitcode()
            return code
        return self._exitcode

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def output(self) -> str:
        """QEMU's stdout/stderr so far (its log file)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- QMP --------------------------------------------------------------------------

    def qmp(self, cmd: str, **args: Any) -> Any:
        """Run a QMP command; return its ``return`` value or raise :class:`QmpError`."""
        resp = self.qmp_raw(cmd, **args)
        if "error" in resp:
            raise QmpError(cmd, resp["error"])
        return resp.get("return")

    def qmp_raw(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Run a QMP command and return the whole response (transcript kept)."""
        if not self._launched:
            raise MachineError(f"{self.name}: QMP {cmd} on a QEMU that is not running")
        t0 = time.monotonic()
        try:
            resp: dict[str, Any] = self._vm.qmp(cmd, args_dict=args or None)
        except Exception as exc:
            self._transcript(cmd, args, {"exception": repr(exc)}, t0)
            raise MachineError(
                f"{self.name}: QMP {cmd} failed: {exc!r}; QEMU log: {self.log_path}"
            ) from exc
        self._transcript(cmd, args, resp, t0)
        return resp

    def events(self, wait: bool = False) -> list[dict[str, Any]]:
        """QMP events received so far (and clear them)."""
        return list(self._vm.get_qmp_events(wait=wait))

    def event_wait(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for one QMP event."""
        ev: dict[str, Any] | None = self._vm.event_wait(name, timeout=timeout)
        if ev is None:
            raise GuestTimeout(f"QMP event {name} from {self.name}", timeout)
        return ev

    def wait_event(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for any QMP event; True when one came.  The event
        is kept for :meth:`events` and :meth:`event_wait`, so nothing is lost: a poll loop
        naps here to wake as soon as QEMU reports something (a RESUME, a MIGRATION status)."""
        if self._vm._qmp_connection is None or self._vm._defer_qmp:
            time.sleep(timeout)
            return False
        try:
            ev = self._vm._qmp.pull_event(wait=timeout)
        except TimeoutError:
            return False
        except Exception:  # noqa: BLE001 - a vanished peer: no event (the caller sees it exit)
            time.sleep(timeout)
            return False
        if ev is None:
            return False
        self._vm._events.append(ev)
        return True

    def poll_event(self, name: str, wait: float = 0.004) -> dict[str, Any] | None:
        """One pending QMP event called ``name``, waiting at most ``wait`` seconds; None when
        there is none.  Sends no command, so it is safe while QEMU may exec or die."""

        try:
            ev = self._vm.event_wait(name, timeout=wait)
        except TimeoutError:
            return None
        except Exception:  # noqa: BLE001 - a vanished peer: no event
            return None
        return dict(ev) if ev is not None else None

    def _transcript(self, cmd: str, args: dict[str, Any], resp: Any, t0: float) -> None:
        try:
            with self.qmp_log_path.open("a") as fh:
                rec = {"t": round(t0, 4), "dt": round(time.monotonic() - t0, 4),
                       "execute": cmd, "arguments": args, "response": resp}  # fmt: skip
                fh.write(json.dumps(rec, default=str)[:20000] + "\n")
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"<QemuProcess {self.name} {self.build.label} launched={self._launched}>"


class ProcessGone(MachineError):
    """The process that was to listen on a socket exited first."""


def connect_when_listening(path: Path, *, timeout: float, alive: Callable[[], bool],
                           interval: float = 0.001) -> Any:
    """A negotiated QMP connection (qemu.qmp's legacy client) to the unix socket ``path``
    as soon as a QEMU listens there.  The socket file appears at QEMU's bind() and listen()
    follows: a refused connect (or a file not there yet) is retried every ``interval``,
    which costs less than reading the kernel's socket table before each try.  Raises
    :class:`ProcessGone` when ``alive()`` turns false first, :class:`GuestTimeout` after
    ``timeout``, and what the client raised for any other failure."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        if os.path.lexists(path):
            conn = QEMUMonitorProtocol(str(path))
            try:
                conn.connect(negotiate=True)
                return conn
            except Exception as exc:
                with contextlib.suppress(Exception):
                    conn.close()
                cause = getattr(exc, "exc", exc)  # qemu.qmp wraps it in a ConnectError
                if not isinstance(cause, (ConnectionRefusedError, FileNotFoundError)):
                    raise
                last = cause
        if not alive():
            raise ProcessGone(f"nothing listens on {path} and its process is gone")
        if time.monotonic() > deadline:
            what = f"QMP socket {path}" + (f" ({last!r})" if last else "")
            raise GuestTimeout(what, timeout)
        time.sleep(interval)


def _format_only_when_logged(client: Any) -> None:
    """qemu.qmp formats every message in and out for its debug log (a JSON encoding each)
    whether or not that log is on; this client's hooks format only when it is.  Per
    connection, not a patch of the library."""
    logger = client.logger

    def outbound(msg: Any) -> Any:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("--> %s", msg)
        return msg

    def inbound(msg: Any) -> Any:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("<-- %s", msg)
        return msg

    client._cb_outbound, client._cb_inbound = outbound, inbound


def unix_listening(path: Path, table: str = "/proc/net/unix") -> bool:
    """Whether a unix socket bound to ``path`` is listening, from Linux's socket table
    (without the table, whether the path exists).  Nothing listens on a path that does not
    exist: that is a stat, where reading the table is a tenth of a millisecond of CPU (a
    cpr-exec hop waited for its new QMP socket with about ten of those)."""
    if not os.path.lexists(path):
        return False
    want = str(path)
    try:
        with open(table, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()[1:]  # after the header
    except OSError:
        return path.exists()
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == want:
            try:
                if int(fields[3], 16) & _SO_ACCEPTCON:
                    return True
            except ValueError:
                continue
    return False


def live_processes() -> list[QemuProcess[Any]]:
    """QEMU processes this harness process has launched and not yet reaped."""
    with _LIVE_LOCK:
        return list(_LIVE)


def reap_all() -> int:
    """Kill every QEMU still alive (last-resort cleanup at exit or on signals)."""
    procs = live_processes()
    for p in procs:
        p.kill()
    return len(procs)
