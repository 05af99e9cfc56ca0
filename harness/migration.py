"""Every way a guest moves: live migration, save/restore, cpr-reboot, cpr-transfer,
cpr-exec, and back-to-back cycles of any of them.

Each operation takes a started :class:`~harness.machine.Machine`, starts the destination
QEMU as a new process of the same guest (a fresh copy of the varstore template, as for an
incoming domain: QEMU writes the migrated flash into it), drives both over QMP, and on
success makes the destination the guest's process and reaps the source.  Every operation
returns one :class:`MigrationResult`; with ``check=True`` (the default) a failure raises
:class:`~harness.errors.MigrationError` carrying it.

Nothing is lost: a failed live migration leaves the source running (checked and
recorded); a save writes to a temporary name renamed only on success; a load never
writes its state file; a failed destination is reaped.

Modes and capabilities come from each build's probed QMP schema, never from versions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness.errors import ConfigError, HarnessError, LaunchError, MigrationError, UnsupportedError
from harness.guest.qemu_process import unix_listening
from harness.inventory.builds import QemuBuild
from harness.machine import Incarnation, Machine
from harness.terms import Mode, Op, Status

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = float(os.environ.get("HARNESS_MIGRATION_TIMEOUT", "300"))
OPERATIONS: tuple[Op, ...] = tuple(Op)


@dataclass
class MigrationResult:
    """What one migration or live update did, measured."""

    op: str  # an Op, or a fault's or a nested hop's own name
    mode: Mode
    status: Status
    source: str
    destination: str
    machine: str
    arch: str = "x86_64"
    wall_s: float = 0.0
    total_time_ms: float | None = None
    downtime_ms: float | None = None
    setup_time_ms: float | None = None
    pause_s: float | None = None
    pause_uncertainty_s: float | None = None
    transferred_bytes: int | None = None
    state_file: str | None = None
    state_file_size: int | None = None
    error: str = ""
    signature: str | None = None
    signature_explanation: str | None = None
    source_running: bool | None = None
    cycle: int | None = None
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # text from a caller or a record: the closed sets
        self.mode = Mode(self.mode)
        self.status = Status(self.status)

    @property
    def ok(self) -> bool:
        return self.status == Status.COMPLETED and not self.problems

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data

    def fail(self, error: str, status: str = Status.FAILED) -> MigrationResult:
        self.status = Status(status)
        self.error = (self.error + "\n" + error).strip() if self.error else error
        from harness import signatures

        sig = signatures.classify(self.error)
        if sig is not None:
            self.signature = sig.name
            self.signature_explanation = sig.explanation
        return self

    def summary(self) -> str:
        if self.ok:
            pause = f", guest pause {self.pause_s * 1000:.0f} ms" if self.pause_s is not None else ""
            down = f", downtime {self.downtime_ms:.0f} ms" if self.downtime_ms is not None else ""
            return f"{self.op} {self.source} -> {self.destination} ok in {self.wall_s:.2f} s{down}{pause}"
        sig = f" [{self.signature}]" if self.signature else ""
        why = "; ".join(self.problems) or _error_line(self.error) or str(self.status)
        return f"{self.op} {self.source} -> {self.destination} {self.status}{sig}: {why}"


def _error_line(error: str) -> str:
    """An error's one line for a summary: its last line, or - for an error that ends in the
    QEMU output :func:`_tail` appends - the harness's reason before it, with QEMU's last line
    that is not a warning (a QEMU that died silently ends its output with its start-up
    warnings, which said nothing of the failure)."""
    lines = error.strip().splitlines()
    if _QEMU_OUTPUT not in lines:
        return lines[-1] if lines else ""
    at = lines.index(_QEMU_OUTPUT)
    why = " ".join(x.strip() for x in lines[:at] if x.strip())
    said = next((x for x in reversed(lines[at + 1:]) if x.strip() and "warning:" not in x), None)
    if said is None:
        return why
    return f"{why} (QEMU: {said.strip()})" if why else said.strip()


def _check(result: MigrationResult, check: bool) -> MigrationResult:
    if check and not result.ok:
        raise MigrationError(result.summary(), result)
    return result


def _new_result(op: str, mode: str, vm: Machine, dest: QemuBuild | None, machine: str) -> MigrationResult:
    return MigrationResult(
        op=op, mode=Mode(mode), status=Status.PENDING, source=vm.build.label,
        destination=(dest or vm.build).label, machine=machine, arch=vm.spec.arch,
    )  # fmt: skip


def machine_type(vm: Machine) -> str:
    """The versioned machine type the guest runs (``q35`` resolved through its build)."""
    return vm.build.capabilities.resolve_machine(vm.current.resolved.machine)


def _unsupported(vm: Machine, dest_build: QemuBuild, mode: str, *, shared_ram: bool = False) -> str | None:
    """Why ``vm`` cannot make a ``mode`` hop to ``dest_build`` (None: it can): both builds
    must offer the mode; ``shared_ram``: the guest's RAM must be shareable (memfd or file
    backend with aux-ram-share), so that the new QEMU maps it instead of copying it."""
    for b in (vm.build, dest_build):
        try:
            _require_mode(b, mode)
        except UnsupportedError as exc:
            return str(exc)
    if shared_ram and (vm.spec.memory_backend == "plain" or not vm.spec.aux_ram_share):
        return (f"{mode} needs shared guest RAM: spec memory_backend='memfd' (or 'file') and "
                "aux_ram_share=True")
    return None


def _require_mode(build: QemuBuild, mode: str) -> None:
    if not build.capabilities.has_mode(mode):
        raise UnsupportedError(
            f"migration mode {mode}", f"QEMU {build.label}",
            f"its schema offers {', '.join(build.capabilities.migration_modes)}",
        )


# --- the driver's phases, over any QMP endpoint ------------------------------------------
#
# Every migration of the harness goes through these: the operations below (live,
# save/restore, cpr-reboot, cpr-transfer, cpr-exec) compose them for a Machine's QEMU
# processes, harness.faults injects into them through Hooks, and harness.nested drives
# L2's QEMU inside L1 with them through an endpoint that reaches L1's QMP.

TERMINAL = ("completed", "failed", "cancelled")


class Endpoint(Protocol):
    """A QEMU the driver talks to: :class:`harness.guest.qemu_process.QemuProcess`, or an L2's
    QEMU reached through L1 (:mod:`harness.nested`)."""

    @property
    def name(self) -> str: ...

    @property
    def running(self) -> bool: ...

    @property
    def exitcode(self) -> int | None: ...

    def qmp(self, cmd: str, **args: Any) -> Any: ...


#: ``on_status(status, info)``: called with each new status the source reports; True when
#: the hook intervened (cancelled the migration, killed the destination, ...).
StatusHook = Callable[[str, dict[str, Any]], bool]


@dataclass
class Hooks:
    """Where a fault or an observation is injected into a migration: the fault tests
    exercise the very driver users run.

    ``target``: a URI of the caller's to migrate to instead of a destination QEMU of ours
    (a listener that stalls, drains or does not exist).  ``dest_args``: extra QEMU
    arguments for the destination.  ``on_destination``: called with the destination once
    it listens, before the source starts.  ``on_status``: see :data:`StatusHook`.
    ``stuck_after``: once a hook intervened, a migration that has not ended within this
    many seconds is cancelled, and the status it stuck in is recorded (``stuck_in``).
    ``on_settled``: called with the source's final ``query-migrate`` before any
    recovery, once a completed source's run state has left finish-migrate."""

    target: str | None = None
    dest_args: tuple[str, ...] = ()
    on_destination: Callable[[Incarnation], None] | None = None
    on_status: StatusHook | None = None
    stuck_after: float | None = None
    on_settled: Callable[[dict[str, Any]], None] | None = None


def configure(ep: Endpoint, caps: Sequence[str], params: dict[str, Any]) -> None:
    """Turn on migration capabilities ``caps`` and set ``params`` (checked by the caller
    against the build's schema: :func:`check_caps`)."""
    if caps:
        ep.qmp("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
    if params:
        ep.qmp("migrate-set-parameters", **params)


def reset(ep: Endpoint, caps: Sequence[str], *, mode_param: bool = True) -> None:
    """Put an endpoint that keeps (or takes) the guest back to plain migration settings
    (mode normal, ``caps`` off), so the next operation starts clean."""
    if not ep.running:
        return
    try:
        if caps:
            ep.qmp("migrate-set-capabilities", capabilities=[{"capability": c, "state": False} for c in caps])
        if mode_param:
            ep.qmp("migrate-set-parameters", mode="normal")
    except HarnessError as exc:
        log.warning("could not reset migration settings on %s: %s", ep.name, exc)


def start(ep: Endpoint, *, uri: str | None = None, channels: list[dict[str, Any]] | None = None) -> None:
    """Start the outgoing migration (a URI, or main and CPR channels)."""
    if channels is not None:
        ep.qmp("migrate", channels=channels)
    else:
        ep.qmp("migrate", uri=uri)


def incoming(ep: Endpoint, uri: str) -> None:
    """Start the incoming side of a destination started with ``-incoming defer``."""
    ep.qmp("migrate-incoming", uri=uri)


def status(ep: Endpoint) -> str:
    """The source's migration status now (``query-migrate``)."""
    return str((ep.qmp("query-migrate") or {}).get("status"))


def cancel(ep: Endpoint) -> None:
    with contextlib.suppress(HarnessError):
        ep.qmp("migrate_cancel")


def _nap(since: float, min_interval: float = 0.0, ep: Endpoint | None = None) -> None:
    """The pause between two QMP polls: short at first (a small guest's migration or load
    is over in tens of milliseconds), longer as the wait goes on.  An endpoint that can
    wait for QMP events (:meth:`QemuProcess.wait_event`) ends the pause early when QEMU
    reports something (RESUME, STOP, a MIGRATION status with the ``events`` capability),
    so the next poll sees the change at once instead of up to one interval later."""
    waited = time.monotonic() - since
    interval = max(min_interval, 0.004 if waited < 1.0 else 0.02 if waited < 10.0 else 0.05)
    wait_event = getattr(ep, "wait_event", None) if min_interval == 0.0 else None
    if wait_event is not None:
        wait_event(interval)
    else:
        time.sleep(interval)


def watch(ep: Endpoint, timeout: float, *, on_status: StatusHook | None = None,
          stuck_after: float | None = None, min_interval: float = 0.0) -> dict[str, Any]:
    """Poll the source's ``query-migrate`` until completed, failed or cancelled; its last
    answer, with ``statuses`` (every status seen, in order).

    A migration still going at ``timeout`` is cancelled and reported failed.  Once
    ``on_status`` intervened, ``stuck_after`` replaces the timeout: a migration that then
    does not end is cancelled and its real end is reported with ``stuck_in``."""
    since = time.monotonic()
    deadline = since + timeout
    seen: list[str] = []
    intervened = False
    last: dict[str, Any] = {}
    while True:
        last = ep.qmp("query-migrate") or {}
        status = str(last.get("status"))
        if not seen or seen[-1] != status:
            seen.append(status)
            if on_status is not None and not intervened and status not in TERMINAL:
                intervened = bool(on_status(status, last))
                if intervened and stuck_after is not None:
                    deadline = time.monotonic() + stuck_after
                continue  # the hook may have changed everything: ask again
        if status in TERMINAL:
            return {**last, "statuses": seen}
        if not ep.running:
            return {"status": "failed", "error-desc": "source QEMU exited during migration", "statuses": seen}
        if time.monotonic() > deadline:
            cancel(ep)
            if intervened:
                final = wait_terminal(ep, 30.0)
                return {**final, "stuck_in": status, "statuses": seen}
            return {**last, "status": "failed", "statuses": seen,
                    "error-desc": f"migration did not complete within {timeout:.0f} s (last status {status})"}
        _nap(since, min_interval, ep)


def wait_terminal(ep: Endpoint, timeout: float) -> dict[str, Any]:
    """The source's ``query-migrate`` once it is completed, failed or cancelled (or its
    last answer after ``timeout``)."""
    since = time.monotonic()
    last: dict[str, Any] = {}
    while time.monotonic() < since + timeout:
        last = ep.qmp("query-migrate") or {}
        if last.get("status") in TERMINAL:
            break
        _nap(since, ep=ep)
    return dict(last)


def wait_running(ep: Endpoint, timeout: float, *, min_interval: float = 0.0) -> str | None:
    """Wait until the destination runs the guest; None, or what went wrong."""
    since = time.monotonic()
    deadline = since + timeout
    status = "?"
    while time.monotonic() < deadline:
        if not ep.running:
            return f"destination QEMU exited (code {ep.exitcode})"
        try:
            st = ep.qmp("query-status")
        except HarnessError as exc:
            if not ep.running:
                return f"destination QEMU exited (code {ep.exitcode})"
            return f"destination QMP failed: {exc}"
        status = st.get("status", "?")
        if status == "running":
            return None
        if status in ("internal-error", "shutdown", "guest-panicked"):
            return f"destination status {status}"
        _nap(since, min_interval, ep)
    return f"destination not running after {timeout:.0f} s (status {status})"


def wait_loaded(ep: Endpoint, timeout: float, *, resume: bool = True) -> str | None:
    """Wait for an incoming load to finish and the guest to run (resuming it if needed;
    ``resume=False``: only for the load to finish, the guest staying paused)."""
    since = time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        if not ep.running:
            return f"destination QEMU exited (code {ep.exitcode})"
        try:
            st = ep.qmp("query-status")
            mig = ep.qmp("query-migrate") or {}
        except HarnessError as exc:
            if not ep.running:
                return f"destination QEMU exited (code {ep.exitcode})"
            return str(exc)
        if st.get("status") == "running":
            return None
        if mig.get("status") == "failed":
            return str(mig.get("error-desc") or "incoming migration failed")
        if st.get("status") in ("paused", "postmigrate", "prelaunch") and mig.get("status") == "completed":
            if not resume:
                return None
            ep.qmp("cont")
        _nap(since, ep=ep)
    return f"incoming load did not finish within {timeout:.0f} s"


def resume_saved(ep: Endpoint, timeout: float) -> str | None:
    """Run the guest again on a source whose migration completed; None, or what went wrong.

    QEMU reports 'completed' from the migration thread a moment before its cleanup moves
    the run state from finish-migrate to postmigrate, and refuses 'cont' in between
    ("Migration is not finalized yet"): a driver that learns of the completion at once (an
    event) meets that window, so the run state is awaited first."""
    if settled_runstate(ep, timeout) == "finish-migrate":
        return f"the source stayed in finish-migrate for {timeout:.0f} s after the save"
    ep.qmp("cont")
    return None


def settled_runstate(ep: Endpoint, timeout: float = 10.0) -> str:
    """The source's run state once out of finish-migrate (the window between QEMU's
    'completed' and its cleanup, see :func:`resume_saved`); still finish-migrate only
    after ``timeout``."""
    since = time.monotonic()
    while True:
        status = str(ep.qmp("query-status").get("status"))
        if status != "finish-migrate" or time.monotonic() > since + timeout:
            return status
        _nap(since, ep=ep)


def guest_runs(ep: Endpoint) -> bool:
    """True when this QEMU is alive and its guest runs (not paused)."""
    try:
        return bool(ep.running and ep.qmp("query-status").get("running"))
    except HarnessError:
        return False


def recover(ep: Endpoint, result: MigrationResult, *, was_running: bool = True,
            settle: float = 10.0, reset_caps: Sequence[str] | None = None,
            mode_param: bool = True) -> bool:
    """After a failed migration, leave the guest running on the source as it was before.

    QEMU restarts the source itself when it sees the failure, a moment after reporting
    'failed'.  Precopy without a return path can instead report 'completed' before the
    destination refuses a section; the source then sits in 'postmigrate' and only 'cont'
    brings the guest back (libvirt does the same).  What was done goes into
    ``result.extra['source_recovery']``; ``result.source_running`` is set."""
    deadline = time.monotonic() + settle
    resumed = False
    while ep.running:
        try:
            st = ep.qmp("query-status")
        except HarnessError:
            break
        if st.get("running"):
            break
        status = str(st.get("status", "?"))
        if not was_running:
            break  # paused before the migration: it stays paused
        if not resumed and (status == "postmigrate" or
                            (status == "paused" and time.monotonic() > deadline)):
            try:
                ep.qmp("cont")
                result.extra["source_recovery"] = f"resumed with 'cont' from {status}"
            except HarnessError as exc:
                result.extra["source_recovery"] = f"'cont' from {status} failed: {exc}"
                break
            resumed, deadline = True, time.monotonic() + 5.0
            continue
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if reset_caps is not None:  # it keeps the guest: plain settings for the next operation
        reset(ep, reset_caps, mode_param=mode_param)
    result.source_running = guest_runs(ep)
    if not ep.running:
        result.extra.setdefault("source_recovery", f"source QEMU exited (code {ep.exitcode})")
    return result.source_running


# --- the phases for a Machine's QEMU processes ---------------------------------------------


def check_caps(caps: Sequence[str], *builds: QemuBuild) -> None:
    """Every capability in ``caps`` exists in every build's schema (else UnsupportedError
    naming the build and the capability)."""
    for build in builds:
        for c in caps:
            if not build.capabilities.has_capability(c):
                raise UnsupportedError(f"migration capability {c}", f"QEMU {build.label}")


def _set_up(inc: Incarnation, caps: Sequence[str], params: dict[str, Any]) -> None:
    """Configure a migration endpoint of ours: ``caps`` and ``params``, plus the ``events``
    capability where the build has it, so that MIGRATION status events wake the driver's
    waits (:func:`_nap`).  It changes nothing in the stream and stays on; a QEMU of ours
    starts with it on (``Resolved.migration_events``), so it costs no QMP call."""
    check_caps(caps, inc.process.build)
    if _events_needed(inc) and "events" not in caps:
        caps = [*caps, "events"]
    configure(inc.process, caps, params)


def _events_needed(inc: Incarnation) -> bool:
    """The build has the ``events`` capability and this QEMU did not start with it on."""
    return not inc.resolved.migration_events and inc.process.build.capabilities.has_capability("events")


def _has_mode(inc: Incarnation) -> bool:
    return "mode" in inc.process.build.capabilities.migration_parameters


def _clear_settings(inc: Incarnation, caps: Sequence[str]) -> None:
    reset(inc.process, caps, mode_param=_has_mode(inc))


def _classify_problems(result: MigrationResult) -> None:
    """Name what the checks after a hop found (a crashed guest's console, ...) when the
    hop itself had no signature: the record and the nightly report carry it."""
    from harness import signatures

    sig = signatures.classify("\n".join(result.problems))
    if sig is not None:
        result.signature, result.signature_explanation = sig.name, sig.explanation


def _incomplete_load(inc: Incarnation, result: MigrationResult) -> None:
    """A load QEMU called good can still have stopped early ("Expected vmdescription
    section, but got 0"): classify the destination's output and record it as a problem."""
    from harness import signatures

    sig = signatures.classify(inc.process.output())
    if sig is not None and sig.name == "state-incomplete":
        result.problems.append(f"destination loaded an incomplete state: {sig.evidence(inc.process.output())}")
        result.signature, result.signature_explanation = sig.name, sig.explanation


def fill_stats(result: MigrationResult, info: dict[str, Any]) -> None:
    result.total_time_ms = info.get("total-time")
    result.downtime_ms = info.get("downtime")
    result.setup_time_ms = info.get("setup-time")
    ram = info.get("ram") or {}
    result.transferred_bytes = ram.get("transferred")


def _settled(src: Incarnation, info: dict[str, Any], result: MigrationResult, hooks: Hooks | None) -> None:
    """A watched hop's end: its final ``query-migrate`` in the result (and, when hooks
    watch, in ``extra["final"]``), the source settled before ``on_settled`` sees it."""
    if hooks is not None:
        result.extra["final"] = info
        if hooks.on_settled is not None:
            if info.get("status") == "completed":
                with contextlib.suppress(HarnessError):  # a dead source: the hook sees that
                    settled_runstate(src.process)
            hooks.on_settled(info)
    fill_stats(result, info)


def guest_running(inc: Incarnation) -> bool:
    """True when this QEMU process is alive and its guest runs (not paused)."""
    return guest_runs(inc.process)


def recover_source(inc: Incarnation, result: MigrationResult, *, was_running: bool = True,
                   settle: float = 10.0, reset_caps: Sequence[str] | None = None) -> bool:
    """:func:`recover` for a Machine's QEMU process."""
    return recover(inc.process, result, was_running=was_running, settle=settle,
                   reset_caps=reset_caps, mode_param=_has_mode(inc))


def _dest_failure(vm: Machine, inc: Incarnation | None, result: MigrationResult, why: str,
                  status: str = "failed") -> None:
    text = why
    if inc is not None:
        if not inc.process.running:
            result.extra["destination_exit"] = inc.process.exitcode
        out = inc.process.output() if not inc.process.running else ""
        if inc.process.running:
            vm.release(inc, hard=True)
            out = inc.process.output()
        else:
            vm.release(inc, hard=True)
        if out.strip():
            text += "\ndestination output:\n" + out.strip()[-4000:]
        result.extra["destination_log"] = str(inc.process.log_path)
    result.fail(text, status=status)


def _spawn_dest(vm: Machine, result: MigrationResult, **kw: Any) -> Incarnation | None:
    try:
        return vm.spawn(**kw)
    except LaunchError as exc:
        result.fail(f"destination QEMU failed to start: {exc.output.strip()[-4000:] or exc}")
        return None


# --- live migration ----------------------------------------------------------------------


def live(
    vm: Machine,
    *,
    to: QemuBuild | None = None,
    transport: str = "unix",
    multifd: bool = False,
    postcopy: bool = False,
    capabilities: Sequence[str] = (),
    bandwidth: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    hooks: Hooks | None = None,
    verify_ram: bool = False,
) -> MigrationResult:
    """Precopy live migration to a new QEMU (``to``, default the same build).

    ``bandwidth`` (bytes/s) caps the stream (QEMU's ``max-bandwidth``) so that precopy lasts
    long enough for the guest to write during it; a source that keeps the guest gets its
    previous cap back and its migration settings reset.  ``hooks``: where faults and
    observations are injected (:class:`Hooks`); with hooks the source's final
    ``query-migrate`` is kept in ``extra['final']``.  ``verify_ram``: the destination
    starts paused, and once the source has stopped both guests' RAM is compared page by
    page (:mod:`harness.ramcheck`, ``extra['ram_check']``); a page the destination did not
    get fails the hop (signature ``guest-ram-differs``) and the guest goes on on the
    source."""
    if verify_ram and postcopy:
        raise ConfigError("verify_ram compares RAM at a precopy switchover; with postcopy the "
                          "destination runs before it has every page")  # fmt: skip
    src = vm.current
    dest_build = to or vm.build
    mtype = machine_type(vm)
    result = _new_result("live", "normal", vm, dest_build, mtype)
    h = hooks or Hooks()
    caps = list(capabilities) + (["multifd"] if multifd else []) + (["postcopy-ram"] if postcopy else [])
    if vm.spec.memory_backend == "file" and "x-ignore-shared" not in caps:
        # The destination maps the same RAM file (share=on).  Copying RAM into it would
        # overwrite the running source's memory with stale pages (seen: a corrupted
        # aarch64 guest); on one host the file is shared, so the stream carries no RAM.
        caps.append("x-ignore-shared")
        result.extra["ram"] = "shared file, not copied (x-ignore-shared)"
    check_caps(caps, *{vm.build.label: vm.build, dest_build.label: dest_build}.values())
    if h.target is not None:
        uri = h.target
        result.destination = h.target
    elif transport == "unix":
        uri = f"unix:{vm.sock_dir / f'mig-{time.monotonic_ns() % 10**9}.sock'}"
    elif transport == "tcp":
        from harness.machine import free_port

        uri = f"tcp:127.0.0.1:{free_port()}"
    else:
        raise UnsupportedError(f"transport {transport!r}", "live migration", "use unix or tcp")
    was_running = guest_running(src)
    old_cap: int | None = None
    t0 = time.monotonic()
    dest: Incarnation | None = None
    if h.target is None:
        dest = _spawn_dest(vm, result, build=dest_build, machine=mtype, incoming=["defer"],
                           extra_args=h.dest_args + (("-S",) if verify_ram else ()))  # fmt: skip
        if dest is None:
            result.source_running = guest_running(src)
            result.wall_s = time.monotonic() - t0
            return _check(result, check)

    def on_status(status: str, info: dict[str, Any]) -> bool:
        if postcopy and status in ("active", "device") and "postcopy" not in result.extra:
            src.process.qmp("migrate-start-postcopy")
            result.extra["postcopy"] = f"started in {status}"
        return bool(h.on_status and h.on_status(status, info))

    try:
        if dest is not None:
            _set_up(dest, caps, {})
            incoming(dest.process, uri)
            if h.on_destination is not None:
                h.on_destination(dest)
        params: dict[str, Any] = {"mode": "normal"} if _has_mode(src) else {}
        if bandwidth is not None:
            old_cap = (src.process.qmp("query-migrate-parameters") or {}).get("max-bandwidth")
            params["max-bandwidth"] = bandwidth
        _set_up(src, caps, params)
        start(src.process, uri=uri)
        info = watch(src.process, timeout, on_status=on_status, stuck_after=h.stuck_after)
    except HarnessError as exc:
        info = {"status": "failed", "error-desc": str(exc)}
    _settled(src, info, result, hooks)
    status = str(info.get("status"))
    if verify_ram and dest is not None and status == "completed":
        problem = _verify_ram(src, dest, result)
        if problem is not None:
            _dest_failure(vm, dest, result, problem)
            recover_source(src, result, was_running=was_running, reset_caps=caps)
            _restore_bandwidth(src, old_cap)
            result.wall_s = time.monotonic() - t0
            return _check(result, check)
    if status != "completed" or dest is None:
        if dest is None and status == "completed":
            result.fail(f"the migration completed to {uri}, where no QEMU of ours loads it",
                        status="completed")  # fmt: skip
        else:
            _dest_failure(vm, dest, result, str(info.get("error-desc") or f"migration {status}"),
                          status=Status.CANCELLED if status == Status.CANCELLED else Status.FAILED)  # fmt: skip
        recover_source(src, result, was_running=was_running, reset_caps=caps)
        _restore_bandwidth(src, old_cap)
        result.wall_s = time.monotonic() - t0
        return _check(result, check)
    why = wait_running(dest.process, 60)
    result.wall_s = time.monotonic() - t0
    if why:
        _dest_failure(vm, dest, result, why)
        recover_source(src, result, was_running=was_running, reset_caps=caps)
        _restore_bandwidth(src, old_cap)
        return _check(result, check)
    return _completed(vm, dest, result, check, caps)


def _completed(vm: Machine, dest: Incarnation, result: MigrationResult, check: bool,
               caps: Sequence[str] | None = None) -> MigrationResult:
    """The guest runs on ``dest`` now: ``vm`` adopts it, the hop is completed.  ``caps``:
    the settings the hop gave ``dest`` (:func:`_set_up`), put back to plain so that the
    next operation on this process starts clean (a cpr-reboot's ``x-ignore-shared`` left
    on made the next cpr-transfer's destination refuse the stream)."""
    vm.adopt(dest)
    if caps is not None:
        _clear_settings(dest, caps)
    result.status = Status.COMPLETED
    _incomplete_load(dest, result)
    return _check(result, check)


def _verify_ram(src: Incarnation, dest: Incarnation, result: MigrationResult,
                timeout: float = 60.0) -> str | None:
    """Compare the stopped source's RAM with the paused destination's once it has loaded
    the stream (within ``timeout``), then let the destination run (it was started with
    -S): None, or why the hop failed."""
    from harness import ramcheck

    t0 = time.monotonic()
    try:
        runstate = settled_runstate(src.process)
        if runstate != "postmigrate":
            return f"RAM check: the source did not stop ({runstate})"
        # the source is done once it has sent the stream; the destination may still load it
        why = wait_loaded(dest.process, timeout, resume=False)
        if why is not None:
            return f"RAM check: {why}"
        loaded = time.monotonic() - t0
        cmp = ramcheck.compare(src.process, dest.process)
        result.extra["ram_check"] = {**cmp.to_json(), "seconds": round(time.monotonic() - t0, 3),
                                     "load_wait_s": round(loaded, 3)}  # fmt: skip
        if not cmp.ok:
            return cmp.problem()
        dest.process.qmp("cont")
    except HarnessError as exc:
        return f"RAM check failed: {exc}"
    return None


def _restore_bandwidth(inc: Incarnation, cap: int | None) -> None:
    """Give a source that keeps the guest its stream cap back after a capped migration."""
    if cap is None or not inc.process.running:
        return
    try:
        inc.process.qmp("migrate-set-parameters", **{"max-bandwidth": cap})
    except HarnessError as exc:
        log.warning("could not restore max-bandwidth on %s: %s", inc.process.name, exc)


# --- save / restore ----------------------------------------------------------------------


def outgoing_uri(build: QemuBuild, path: Path) -> str:
    if build.capabilities.file_uri:
        return f"file:{path}"
    return f"exec:cat > {shlex.quote(str(path))}"


def incoming_uri(build: QemuBuild, path: Path) -> str:
    if build.capabilities.file_uri:
        return f"file:{path}"
    return f"exec:cat {shlex.quote(str(path))}"


def save(
    vm: Machine,
    path: Path,
    *,
    mode: str = "normal",
    capabilities: Sequence[str] = (),
    resume: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> MigrationResult:
    """Save the guest's state to ``path`` (written under a temporary name, renamed on success).

    The source is left paused (``postmigrate``) unless ``resume``; a previous file at
    ``path`` survives a failed save untouched."""
    src = vm.current
    result = _new_result("save", mode, vm, None, machine_type(vm))
    result.destination = str(path)
    params = {"mode": mode} if _has_mode(src) else {}
    t0 = time.monotonic()
    saved = _save_to_file(vm, result, path, list(capabilities), params, timeout)
    result.wall_s = time.monotonic() - t0
    if not saved:
        return _check(result, check)
    result.status = Status.COMPLETED
    if resume:
        why = resume_saved(src.process, 30.0)
        if why:
            result.fail(why)
    return _check(result, check)


def _save_to_file(vm: Machine, result: MigrationResult, path: Path, caps: list[str],
                  params: dict[str, Any], timeout: float) -> bool:
    """Migrate the guest's state to ``path``, written under a temporary name and renamed on
    success (a previous file at ``path`` survives a failure untouched).  On failure the
    temporary file is removed, the result failed, and the source recovered as it was with
    plain settings; False."""
    src = vm.current
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    was_running = guest_running(src)
    try:
        _set_up(src, caps, params)
        start(src.process, uri=outgoing_uri(vm.build, tmp))
        info = watch(src.process, timeout)
    except HarnessError as exc:
        info = {"status": "failed", "error-desc": str(exc)}
    fill_stats(result, info)
    if info.get("status") != "completed":
        if tmp.is_file():  # ours, half written (whatever else is there is not ours)
            tmp.unlink()
        result.fail(str(info.get("error-desc") or f"{result.op} save failed"))
        recover_source(src, result, was_running=was_running, reset_caps=caps)
        return False
    os.replace(tmp, path)
    result.state_file, result.state_file_size = str(path), path.stat().st_size
    return True


def restore(
    vm: Machine,
    path: Path,
    *,
    to: QemuBuild | None = None,
    mode: str = "normal",
    capabilities: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    params: dict[str, Any] | None = None,
) -> MigrationResult:
    """Load the guest's state from ``path`` into a new QEMU (the file is only read).
    ``params``: more migration parameters for the load (``announce-rounds``, ...)."""
    dest_build = to or vm.build
    prev = vm._current
    mtype = machine_type(vm) if prev is not None else vm.spec.machine
    result = _new_result("restore", mode, vm, dest_build, mtype)
    result.source = str(path)
    result.state_file = str(path)
    if not path.is_file():
        return _check(result.fail(f"state file {path} does not exist"), check)
    result.state_file_size = path.stat().st_size
    t0 = time.monotonic()
    params = {**({"mode": mode} if "mode" in dest_build.capabilities.migration_parameters else {}),
              **(params or {})}
    return _load_into_new_qemu(vm, result, dest_build, mtype, path, capabilities, params,
                               timeout=timeout, t0=t0, check=check)  # fmt: skip


def _load_into_new_qemu(
    vm: Machine,
    result: MigrationResult,
    dest_build: QemuBuild,
    mtype: str,
    path: Path,
    caps: Sequence[str],
    params: dict[str, Any],
    *,
    timeout: float,
    t0: float,
    check: bool,
    verify_against: Incarnation | None = None,
) -> MigrationResult:
    """Start a QEMU with ``-incoming defer``, load ``path`` (only read) and adopt it.
    ``verify_against``: the saved source, still there and stopped; the new QEMU starts
    paused and runs the guest only once its RAM equals the source's (:func:`_verify_ram`)."""
    dest = _spawn_dest(vm, result, build=dest_build, machine=mtype, incoming=["defer"],
                       extra_args=("-S",) if verify_against is not None else ())  # fmt: skip
    if dest is None:
        result.wall_s = time.monotonic() - t0
        return _check(result, check)
    try:
        _set_up(dest, caps, params)
        incoming(dest.process, incoming_uri(dest_build, path))
        if verify_against is not None:
            why = _verify_ram(verify_against, dest, result, timeout) or wait_running(dest.process, 60)
        else:
            why = wait_loaded(dest.process, timeout)
    except HarnessError as exc:
        why = str(exc)
    result.wall_s = time.monotonic() - t0
    if why:
        _dest_failure(vm, dest, result, why)
        return _check(result, check)
    return _completed(vm, dest, result, check, caps)


def save_restore(
    vm: Machine,
    path: Path | None = None,
    *,
    to: QemuBuild | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    keep_source_until_loaded: bool = False,
    verify_ram: bool = False,
) -> MigrationResult:
    """Save to a file, quit, and restore into a new QEMU (``to``, default the same build).

    ``keep_source_until_loaded``: as for :func:`cpr_reboot`, the saved QEMU quits only
    once the new one runs the guest, and resumes it if the load is refused.
    ``verify_ram``: the saved QEMU also stays until the new one has loaded the file, and
    the guests' RAM is compared page by page before the new one runs it (as for
    :func:`live`); a difference fails the hop and the guest goes on in the saved QEMU."""
    path = path or vm.workdir / f"state-{time.monotonic_ns()}.bin"
    return _save_and_load(vm, "save-restore", "normal", [], to or vm.build, path,
                          keep_source_until_loaded or verify_ram, timeout, check,
                          verify_ram=verify_ram)  # fmt: skip


def _save_and_load(vm: Machine, op: str, mode: str, caps: list[str], dest_build: QemuBuild,
                   path: Path, keep_source: bool, timeout: float, check: bool, *,
                   verify_ram: bool = False) -> MigrationResult:
    """Save the guest to ``path`` and load it into a new QEMU of ``dest_build``: the old
    QEMU quits before the load, or (``keep_source``) only once the new one runs the guest,
    and is resumed if the load is refused."""
    mtype = machine_type(vm)
    result = _new_result(op, mode, vm, dest_build, mtype)
    src = vm.current
    was_running = guest_running(src)
    t0 = time.monotonic()
    if not _save_to_file(vm, result, path, caps, {"mode": mode} if _has_mode(src) else {}, timeout):
        result.wall_s = time.monotonic() - t0
        return _check(result, check)
    params = {"mode": mode} if "mode" in dest_build.capabilities.migration_parameters else {}
    if not keep_source:
        vm.release(src)  # the old QEMU quits; shared RAM stays in its file
        return _load_into_new_qemu(vm, result, dest_build, mtype, path, caps, params,
                                   timeout=timeout, t0=t0, check=check)  # fmt: skip
    result.extra["source_kept_until_loaded"] = True
    _load_into_new_qemu(vm, result, dest_build, mtype, path, caps, params, timeout=timeout, t0=t0,
                        check=False, verify_against=src if verify_ram else None)  # fmt: skip
    if result.status != "completed":  # the new QEMU never ran the guest: RAM is as saved
        recover_source(src, result, was_running=was_running, reset_caps=caps)
    return _check(result, check)


# --- CPR -------------------------------------------------------------------------------


def cpr_reboot(
    vm: Machine,
    *,
    to: QemuBuild | None = None,
    path: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    keep_source_until_loaded: bool = False,
) -> MigrationResult:
    """cpr-reboot: stop and save to a file, quit the old QEMU, load in a new one.

    With file-backed shared RAM the ``x-ignore-shared`` capability saves RAM in place;
    otherwise all RAM is copied to the state file.

    ``keep_source_until_loaded`` leaves the old QEMU paused (its disks released, as after
    any completed migration) until the new one runs the guest, and resumes it if the
    load is refused: for a failure that depends on the instant of the stop (a TCG L1
    caught in L2 guest mode), where losing the guest would end the run.  The state file
    is the same; only the old process quits after the load instead of before it."""
    dest_build = to or vm.build
    mode = "cpr-reboot"
    why = _unsupported(vm, dest_build, mode)
    if why:
        result = _new_result("cpr-reboot", mode, vm, dest_build, machine_type(vm))
        return _check(result.fail(why, status=Status.UNSUPPORTED), check)
    caps = ["x-ignore-shared"] if vm.spec.memory_backend == "file" else []
    return _save_and_load(vm, "cpr-reboot", mode, caps, dest_build, path or vm.workdir / "cpr-reboot.state",
                          keep_source_until_loaded, timeout, check)  # fmt: skip


def cpr_transfer(
    vm: Machine,
    *,
    to: QemuBuild | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    hooks: Hooks | None = None,
) -> MigrationResult:
    """cpr-transfer: a new QEMU beside the old one receives RAM through the CPR channel
    (file descriptors over a unix socket) and the rest over the main channel.  ``hooks``:
    as for :func:`live` (``target`` is not offered: the CPR channel needs our destination)."""
    h = hooks or Hooks()
    if h.target is not None:
        raise UnsupportedError("a caller's target", "cpr-transfer", "it needs a destination QEMU of ours")
    dest_build = to or vm.build
    mode = "cpr-transfer"
    mtype = machine_type(vm)
    result = _new_result("cpr-transfer", mode, vm, dest_build, mtype)
    why = _unsupported(vm, dest_build, mode, shared_ram=True)
    if why:
        return _check(result.fail(why, status=Status.UNSUPPORTED), check)
    src = vm.current
    was_running = guest_running(src)
    stamp = time.monotonic_ns() % 10**9
    main_sock = vm.sock_dir / f"cprm-{stamp}.sock"
    cpr_sock = vm.sock_dir / f"cprc-{stamp}.sock"
    cpr_channel = json.dumps({"channel-type": "cpr",
                              "addr": {"transport": "socket", "type": "unix", "path": str(cpr_sock)}})
    t0 = time.monotonic()
    dest = _spawn_dest(vm, result, build=dest_build, machine=mtype, extra_args=h.dest_args,
                       incoming=[f"unix:{main_sock}", cpr_channel], defer_qmp=True)  # fmt: skip
    if dest is None:
        result.source_running = guest_running(src)
        result.wall_s = time.monotonic() - t0
        return _check(result, check)
    deadline = time.monotonic() + 60
    # Listening, not just present: QEMU binds the path before it listens, and a connect in
    # between is refused ("Failed to connect to '...cprc-*.sock': Connection refused", met
    # under load here in cycle 10 of 12).  Probing by connecting would take the destination's
    # one CPR connection, so the kernel's socket table is asked instead.
    while not unix_listening(cpr_sock):
        if not dest.process.running or time.monotonic() > deadline:
            result.source_running = guest_running(src)
            _dest_failure(vm, dest, result, "destination never listened on its CPR channel")
            result.wall_s = time.monotonic() - t0
            return _check(result, check)
        time.sleep(0.002)  # a read of /proc/net/unix: cheap, and QEMU listens within ms
    try:
        if h.on_destination is not None:
            h.on_destination(dest)
        _set_up(src, [], {"mode": mode})
        start(src.process, channels=[
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(main_sock)}},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(cpr_sock)}},
        ])  # fmt: skip
        info = watch(src.process, timeout, on_status=h.on_status, stuck_after=h.stuck_after)
    except HarnessError as exc:
        info = {"status": "failed", "error-desc": str(exc)}
    _settled(src, info, result, hooks)
    if info.get("status") != "completed":
        _dest_failure(vm, dest, result, str(info.get("error-desc") or "cpr-transfer failed"),
                      status=Status.CANCELLED if info.get("status") == Status.CANCELLED else Status.FAILED)
        recover_source(src, result, was_running=was_running, reset_caps=[])
        result.wall_s = time.monotonic() - t0
        return _check(result, check)
    try:
        dest.process.connect_qmp()
        why = wait_running(dest.process, 60)
    except (HarnessError, OSError, EOFError) as exc:
        why = f"destination QMP did not come up: {exc}"
    result.wall_s = time.monotonic() - t0
    if why:
        _dest_failure(vm, dest, result, why)
        recover_source(src, result, was_running=was_running, reset_caps=[])
        return _check(result, check)
    return _completed(vm, dest, result, check)


def cpr_exec(vm: Machine, *, to: QemuBuild | None = None, timeout: float = DEFAULT_TIMEOUT,
             check: bool = True, command: Sequence[str] | None = None) -> MigrationResult:
    """cpr-exec: the QEMU process saves the guest's state to a file and exec's the new QEMU
    (``to``, default the same build) in place: same pid, RAM kept in its memfds, the new
    image loading the state with ``-incoming file:``.  The :class:`QemuProcess` that owned
    the old image owns the new one; QMP reconnects to the new image's socket.

    An exec that fails leaves the old image running: QEMU turns the completed migration
    into a failed one and resumes the guest, and the result records that (with the
    source's recovery).  ``command`` replaces the exec'd program and its leading argv
    (``build.command()``): for fault injection, e.g. a binary that does not exist."""
    dest_build = to or vm.build
    mode = "cpr-exec"
    mtype = machine_type(vm)
    result = _new_result("cpr-exec", mode, vm, dest_build, mtype)
    why = _unsupported(vm, dest_build, mode, shared_ram=True)
    if why:
        return _check(result.fail(why, status=Status.UNSUPPORTED), check)
    if not dest_build.capabilities.file_uri:
        return _check(result.fail(f"QEMU {dest_build.label} has no file: URI",
                                  status=Status.UNSUPPORTED), check)  # fmt: skip
    src = vm.current
    proc = src.process
    path = vm.workdir / "cpr-exec.state"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # the previous cycle's, already loaded
    was_running = guest_running(src)
    new, argv, qmp_path = vm.prepare_exec(build=dest_build, machine=mtype,
                                          incoming=[f"file:{path}"])  # fmt: skip
    if command is not None:
        argv = [*command, *argv[len(dest_build.command()):]]
    result.state_file = str(path)
    result.extra["exec_argv0"] = argv[0]
    pid = proc.pid
    t0 = time.monotonic()

    def give_up(why: str) -> MigrationResult:
        new.console.close()
        if new.tpm is not None:
            new.tpm.stop()
        result.fail(why)
        result.wall_s = time.monotonic() - t0
        return _check(result, check)

    events = vm.build.capabilities.has_capability("events")  # (on from the start, or by _set_up)
    caps: list[str] = []
    proc.events()  # earlier operations' MIGRATION events: only this one's count here
    with contextlib.suppress(FileNotFoundError):  # its appearing says the exec happened:
        qmp_path.unlink()  # none before the migration starts (each image's has its own name)
    try:
        _set_up(src, caps, {"mode": mode, "cpr-exec-command": argv})
        start(proc, uri=f"file:{path}")
    except HarnessError as exc:
        recover_source(src, result, was_running=was_running, reset_caps=caps)
        return give_up(f"cpr-exec could not start: {exc}")
    # Wait for the exec.  QEMU reports 'completed' and execs from a bottom half a moment
    # later; a QMP command in flight then would wait for an answer that never comes (the
    # monitor's descriptor may outlive the exec), so none is sent: the MIGRATION events
    # say 'completed' or 'failed' (a failed exec turns completed into failed), and the
    # kernel's view of the argv says when the exec has happened.
    deadline = t0 + timeout
    completed_at: float | None = None
    since = time.monotonic()
    looked = since
    with _quiet_qmp_library():
        # only the new image creates its QMP socket: its appearing is the exec (a stat; the
        # argv in /proc would say it a moment earlier, at a read of the whole command line)
        while not os.path.lexists(qmp_path):
            if not proc.running:
                return give_up(f"QEMU exited during cpr-exec (code {proc.exitcode})"
                               + _tail(proc.output()))  # fmt: skip
            if time.monotonic() > deadline:
                return give_up(f"cpr-exec: no exec within {timeout:.0f} s "
                               f"({'completed' if completed_at else 'not completed'})")  # fmt: skip
            # before 'completed', the event itself ends the wait; after it, the new image
            # is a moment away: its socket is looked for every millisecond, and the events
            # (a failed exec turns completed into failed) read every 10 ms (a wait of 0
            # would not read the socket at all)
            if completed_at is None or time.monotonic() - looked >= 0.01:
                looked = time.monotonic()
                ev = proc.poll_event("MIGRATION", (0.02 if completed_at is None else 0.001) if events else 0.0)
            else:
                ev = None
                time.sleep(0.001)
            status = ((ev or {}).get("data") or {}).get("status")
            if status == "completed" and completed_at is None:
                completed_at = time.monotonic()
                result.total_time_ms = round((completed_at - t0) * 1000, 1)
            if status in ("failed", "cancelled"):
                # the save failed, or the exec did (completed -> failed): the old image
                # resumes the guest itself
                result.extra["exec_failed"] = completed_at is not None
                info = proc.qmp("query-migrate") or {}
                recover_source(src, result, was_running=was_running, reset_caps=caps)
                return give_up(str(info.get("error-desc") or f"cpr-exec {status}")
                               + _tail(proc.output()))  # fmt: skip
            if not events:
                _nap(since)
        result.extra["pid_kept"] = proc.pid == pid
        taken_in = False
        try:
            proc.reexeced(dest_build, argv, qmp_path, timeout=60)
            taken_in = True
            why = wait_running(new.process, 60)
        except HarnessError as exc:
            why = str(exc)
    result.wall_s = time.monotonic() - t0
    if taken_in:
        proc.record_exec()
    if why:
        # after the exec there is no old image to go back to: the guest is lost
        result.source_running = False
        return give_up(f"{why}{_tail(proc.output())}")
    vm.adopt_exec(new)
    with contextlib.suppress(OSError):
        result.state_file_size = path.stat().st_size
    result.status = Status.COMPLETED
    _incomplete_load(new, result)
    return _check(result, check)


@contextlib.contextmanager
def _quiet_qmp_library() -> Iterator[None]:
    """The QMP library logs an ERROR when its peer vanishes; across an exec that is expected."""
    logger = logging.getLogger("qemu.qmp")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


_QEMU_OUTPUT = "QEMU output:"


def _tail(output: str, n: int = 4000) -> str:
    out = output.strip()
    return f"\n{_QEMU_OUTPUT}\n{out[-n:]}" if out else ""


# --- dispatch and back-to-back ------------------------------------------------------------

Operation = Callable[..., MigrationResult]


def operation(name: str) -> Operation:
    """The operation for a scenario name (live, save-restore, cpr-reboot, cpr-transfer, cpr-exec)."""
    ops: dict[str, Operation] = {
        Op.LIVE: live, Op.SAVE_RESTORE: save_restore, Op.CPR_REBOOT: cpr_reboot,
        Op.CPR_TRANSFER: cpr_transfer, Op.CPR_EXEC: cpr_exec,
    }  # fmt: skip
    if name not in ops:
        raise ConfigError(f"unknown migration operation {name!r}; known: {', '.join(ops)}")
    return ops[name]


def spec_fields_for(op: str) -> dict[str, Any]:
    """Spec fields a guest needs for ``op`` (shared RAM for the CPR modes)."""
    if op == Op.CPR_REBOOT:
        return {"memory_backend": "file"}
    if op in (Op.CPR_TRANSFER, Op.CPR_EXEC):
        return {"memory_backend": "memfd", "aux_ram_share": True}
    return {}


CYCLE_VAR = "HarnessCycle"




def back_to_back(
    vm: Machine,
    op: str,
    cycles: int,
    *,
    builds: Sequence[QemuBuild] = (),
    until_fail: bool = False,
    check_guest: bool = True,
    max_pause: float | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    on_cycle: Callable[[MigrationResult], None] | None = None,
    verify_ram: bool = False,
) -> list[MigrationResult]:
    """``cycles`` consecutive updates of one guest (``until_fail``: stop at the first failure;
    otherwise also stop there, since the guest is gone).  ``builds`` alternates the
    destination build per cycle (10.0 -> 7.2 -> 10.0 ...).  After every cycle the guest is
    checked: same boot, heartbeat advanced, memory checksum intact, and an EFI variable
    rewritten before the cycle reads back in the guest and in the host-side varstore.
    ``verify_ram`` (live and save-restore): every hop also compares the guests' RAM before
    the new QEMU runs the guest."""
    from harness import state

    fn = operation(op)
    kw: dict[str, Any] = {}
    if verify_ram:
        if op not in (Op.LIVE, Op.SAVE_RESTORE):
            raise UnsupportedError("verify_ram", f"{op}", "the RAM comparison is made for live and save-restore hops")
        kw["verify_ram"] = True
    results: list[MigrationResult] = []
    has_vars = vm.spec.firmware is not None and vm.spec.firmware_mode == "split"
    var = state.efivar_id(CYCLE_VAR)
    for i in range(1, cycles + 1):
        dest = builds[(i - 1) % len(builds)] if builds else None
        before = None
        value = f"cycle-{i}-{time.time_ns()}".encode()
        if check_guest:
            if has_vars:
                state.write_efivar(vm, CYCLE_VAR, value)
            # without the memory: the after's checksum is judged against what was written
            before = state.snapshot(vm, memory=False)
        res = fn(vm, to=dest, timeout=timeout, check=False, **kw)
        res.cycle = i
        if res.ok and check_guest and before is not None:
            try:
                after = state.snapshot(vm, efivars=[var] if has_vars else [])  # one command
                res.pause_s = round(state.guest_pause(before, after), 4)
                res.pause_uncertainty_s = round(state.pause_uncertainty(before, after), 4)
                res.problems += state.survival_problems(before, after, max_pause)
                if after.boot_id != before.boot_id:  # it crashed and rebooted: the console says why
                    res.problems += state.kernel_crash_problems(vm)
                if has_vars:
                    got = after.efivars[var]
                    if got != value:
                        res.problems.append(
                            f"EFI variable {CYCLE_VAR} in the guest: expected {value.decode()}, "
                            f"found {got.decode(errors='replace') if got else 'nothing'}"
                        )
                    res.problems += _host_varstore_problems(vm, value)
            except HarnessError as exc:
                res.extra["diagnosis"], problems = state.failed_check_problems(vm, exc)
                res.problems += problems
        if res.problems and res.signature is None:
            _classify_problems(res)
        results.append(res)
        if on_cycle is not None:
            on_cycle(res)
        if not res.ok:
            break
    if not until_fail and results and not results[-1].ok:
        log.info("back-to-back %s stopped at cycle %d: %s", op, results[-1].cycle, results[-1].summary())
    return results


def _host_varstore_problems(vm: Machine, value: bytes) -> list[str]:
    """The cycle variable must also be in the host-side varstore file QEMU writes."""
    from harness import state, varstore

    deadline = time.monotonic() + 10
    while True:
        try:
            model = varstore.read_varstore(vm.varstore_path)
        except HarnessError as exc:
            return [f"host varstore unreadable: {exc}"]
        var = model.variables.get((CYCLE_VAR, state.HARNESS_GUID))
        if var is not None and var.data == value:
            return []
        if time.monotonic() > deadline:
            found = "nothing" if var is None else var.data.decode(errors="replace")
            return [f"host varstore {vm.varstore_path}: {CYCLE_VAR} expected {value.decode()}, found {found}"]
        time.sleep(0.2)


def source_still_running(vm: Machine) -> bool:
    """True when the guest's current QEMU is running the guest (after a failed migration)."""
    return vm.running and guest_running(vm.current)
