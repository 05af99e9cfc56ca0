"""What must survive: a snapshot of guest state and the assertion that it survived.

A :class:`GuestState` records, through the guest agent over SSH, the boot id, uptime,
heartbeat counter, the checksum of the agent's seeded memory region, and hashes of chosen
files.  :func:`assert_survived` compares two snapshots and fails with a message that says
what changed and by how much.

Guest-visible pause: the guest's clock (``/proc/uptime``) stands still while the VM is
stopped (QEMU's virtual clock is stopped with it), so the time the guest lost is the host
time elapsed minus the guest time elapsed between two samples.  Each sample takes the
host time at the midpoint of the fastest of three round trips, so the error is at most
half of that round trip (recorded in ``rtt``).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from harness.errors import StateError
from harness.guest.ssh import DETACHED

if TYPE_CHECKING:
    from harness.guest.ssh import CommandResult, Conversation, SshClient
    from harness.machine import Machine
    from harness.spec import VmSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClockSample:
    """The guest's uptime against the host's monotonic clock."""

    host: float
    guest: float
    rtt: float


@dataclass(frozen=True)
class GuestState:
    """A snapshot of what must survive."""

    boot_id: str
    uptime: float
    heartbeat: int
    mem_checksum: str | None
    mem_expected: str | None
    clock: ClockSample
    files: Mapping[str, str] = field(default_factory=dict)
    #: EFI variables read with the status (``NAME-GUID`` -> data, None when absent)
    efivars: Mapping[str, bytes | None] = field(default_factory=dict)
    #: the period the guest's heartbeat ticks at (None: unknown, every check expects a tick)
    heartbeat_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: Answers every line of input with the guest's uptime: builtins only (ash's ``read`` and
#: ``echo``), so a sample costs the guest no process, and all of them one SSH channel.
UPTIME_LOOP = 'while read -r _; do read -r u _ </proc/uptime && echo "$u"; done'


def clock_sample_over(ssh: SshClient, tries: int = 3, *, timeout: float = 30.0,
                      who: str = "guest") -> ClockSample:
    """The guest's uptime paired with the host time at the midpoint of the fastest of
    ``tries`` exchanges with :data:`UPTIME_LOOP` over one channel, the one with the shortest round
    trip kept (the first also waits for the shell to start)."""
    with ssh.converse(UPTIME_LOOP, timeout=timeout) as conv:
        return _fastest_uptime(conv, tries, who)


def _fastest_uptime(conv: Conversation, tries: int, who: str) -> ClockSample:
    best: ClockSample | None = None
    for _ in range(tries):
        t0 = time.monotonic()
        out = conv.ask()
        t1 = time.monotonic()
        try:
            guest = float(out.split()[0])
        except (IndexError, ValueError) as exc:
            raise StateError(f"{who} /proc/uptime unreadable: {out[:100]!r}") from exc
        sample = ClockSample(host=(t0 + t1) / 2, guest=guest, rtt=t1 - t0)
        if best is None or sample.rtt < best.rtt:
            best = sample
    assert best is not None
    return best


#: ends each part of :func:`status_and_clock`'s answer, with the part's exit status
PART_END = "HARNESS-PART-END"


@dataclass(frozen=True)
class StatusAndClock:
    status: Mapping[str, Any]
    mem: Mapping[str, Any]  # empty without the memory
    efivars: Mapping[str, bytes | None]
    clock: ClockSample


def status_and_clock(ssh: SshClient, memory: bool = True, efivars: Sequence[str] = (), *,
                     tries: int = 3, timeout: float = 120.0, who: str = "guest") -> StatusAndClock:
    """The agent's ``status``, (``memory``) its ``mem-checksum``, the EFI variables
    ``efivars`` (``NAME-GUID``) and a clock sample (:func:`clock_sample_over`), all over one
    SSH channel and one shell in the guest: a nested L2 pays about a second for each
    command under TCG.  Each part's lines end with a :data:`PART_END` line carrying its
    exit status; then the shell answers uptime questions."""
    parts = ["agent status" + (" && agent mem-checksum" if memory else "")]
    parts += [f"agent efivar get {shlex.quote(v)}" for v in efivars]
    script = "".join(f"{p}; echo \"{PART_END} $?\"; " for p in parts) + UPTIME_LOOP
    with ssh.converse(script, timeout=timeout) as conv:
        answers = [_part(conv, p, who) for p in parts]
        clock = _fastest_uptime(conv, tries, who)
    (rc, lines), found = answers[0], {}
    if rc != 0 or len(lines) != 1 + memory or not all(isinstance(a, dict) for a in lines):
        raise StateError(f"{who} {parts[0]!r} answered {lines!r} with status {rc} "
                         f"(expected {1 + memory} JSON object lines and 0)")  # fmt: skip
    for var, (rc, out) in zip(efivars, answers[1:], strict=True):
        answer = None if rc != 0 else out[-1] if out else {}  # no answer line: malformed
        found[var] = efivar_data(answer, f"{who} agent efivar get {var}")
    return StatusAndClock(lines[0], lines[1] if memory else {}, found, clock)


def _part(conv: Conversation, command: str, who: str) -> tuple[int, list[Any]]:
    """One part of :func:`status_and_clock`'s answer: its exit status and its JSON lines."""
    lines: list[Any] = []
    while True:
        line = conv.read_line(command)
        if line.startswith(PART_END + " "):
            try:
                return int(line.split()[1]), lines
            except (IndexError, ValueError) as exc:
                raise StateError(f"{who} {command!r}: malformed end line {line!r}") from exc
        try:
            lines.append(json.loads(line))
        except (ValueError, RecursionError) as exc:  # untrusted: deep nesting too
            raise StateError(f"{who} {command!r} printed {line[:200]!r}, not JSON") from exc


def snapshot(vm: Machine, files: Iterable[str] = (), memory: bool = True,
             efivars: Sequence[str] = ()) -> GuestState:
    """Record the guest's state now (``efivars``: ``NAME-GUID`` of EFI variables read with
    it, into :attr:`GuestState.efivars`)."""
    got = status_and_clock(vm.ssh, memory, efivars, timeout=120.0, who="guest")
    hashes: dict[str, str] = {}
    for path in files:
        out = vm.ssh.run(f"sha256sum {shlex.quote(path)}", timeout=60, check=True).stdout
        hashes[path] = out.split()[0] if out.split() else ""
    return guest_state(got, files=hashes, who="guest", heartbeat_s=heartbeat_period(vm.spec))


def guest_state(got: StatusAndClock, files: Mapping[str, str] | None = None, who: str = "guest",
                heartbeat_s: float | None = None) -> GuestState:
    """A :class:`GuestState` from what :func:`status_and_clock` read."""
    status, mem = got.status, got.mem
    try:
        return GuestState(
            boot_id=str(status["boot_id"]),
            uptime=float(status["uptime"]),
            heartbeat=int(status["heartbeat"]["count"]),
            mem_checksum=mem.get("checksum"),
            mem_expected=mem.get("expected"),
            clock=got.clock,
            files=dict(files or {}),
            efivars=dict(got.efivars),
            heartbeat_s=heartbeat_s,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{who} agent status malformed: {status!r}") from exc


def guest_pause(before: GuestState | ClockSample, after: GuestState | ClockSample) -> float:
    """Seconds the guest's clock stood still between two samples (never negative)."""
    a = before.clock if isinstance(before, GuestState) else before
    b = after.clock if isinstance(after, GuestState) else after
    return max(0.0, (b.host - a.host) - (b.guest - a.guest))


def pause_uncertainty(before: GuestState | ClockSample, after: GuestState | ClockSample) -> float:
    a = before.clock if isinstance(before, GuestState) else before
    b = after.clock if isinstance(after, GuestState) else after
    return (a.rtt + b.rtt) / 2


#: A guest kernel's crash on its serial console (the harness boots with panic=-1: a panicked
#: guest reboots, and the next check sees only a new boot id; the console says why).
KERNEL_CRASH_RE = re.compile(
    r"(Kernel panic - not syncing: .*|BUG: kernel NULL pointer dereference.*|BUG: unable to handle .*|"
    r"general protection fault.*|Oops: .*|kernel BUG at .*)"
)


def kernel_crashes(vm: Machine) -> list[str]:
    """Every kernel crash line on the consoles of the guest's QEMU processes so far, each
    named with its console (``qemu-<n>.serial.log``: the n-th process that ran the guest)."""
    found = []
    for log in sorted(vm.workdir.glob("qemu-*.serial.log")):
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        found += [f"{log.name}: {m.group(1).strip()[:200]}" for m in KERNEL_CRASH_RE.finditer(text)]
    return found


def kernel_crash_problems(vm: Machine, seen: Sequence[str] = ()) -> list[str]:
    """The console's kernel crash lines (:func:`kernel_crashes`) not in ``seen``, as problems."""
    return [f"the guest's kernel crashed: {line}" for line in kernel_crashes(vm) if line not in seen]


#: the agent's heartbeat period unless the guest's config sets ``heartbeat_s``
#: (guests/agent/init)
DEFAULT_HEARTBEAT_S = 0.1
#: how late a tick may be besides two periods (the loop's own ``sleep`` and write, in a
#: busy guest under TCG)
HEARTBEAT_SLACK_S = 0.2


def heartbeat_period(spec: VmSpec) -> float:
    """The period a guest of ``spec`` ticks its heartbeat at (its config's ``heartbeat_s``;
    the agent takes its default for a value that is not a number, and so does this)."""
    try:
        value = float(spec.guest_config.get("heartbeat_s", DEFAULT_HEARTBEAT_S))
    except (TypeError, ValueError):
        return DEFAULT_HEARTBEAT_S
    return value if value > 0 else DEFAULT_HEARTBEAT_S


def tick_expected(before: GuestState, after: GuestState) -> bool:
    """Whether the guest ran long enough between the two for its heartbeat to tick: two
    periods and the slack of guest time (the guest's clock stands while it is paused).
    Two samples 0.08 s of guest time apart need not see a 0.1 s heartbeat tick (a failed
    migration's before and after in make test, 2026-12-02)."""
    if before.heartbeat_s is None:
        return True
    return after.uptime - before.uptime >= 2 * before.heartbeat_s + HEARTBEAT_SLACK_S


def survival_problems(before: GuestState, after: GuestState, max_pause: float | None = None) -> list[str]:
    """Everything that did not survive, in words, each saying by how much (empty when all did)."""
    problems: list[str] = []
    host_dt = after.clock.host - before.clock.host
    if after.boot_id != before.boot_id:
        problems.append(
            f"guest rebooted: boot id {before.boot_id} -> {after.boot_id} "
            f"(uptime {before.uptime:.2f} s -> {after.uptime:.2f} s, {host_dt:.2f} s of host time later)"
        )
    else:
        if after.uptime < before.uptime:
            problems.append(
                f"guest uptime went backwards by {before.uptime - after.uptime:.2f} s: "
                f"{before.uptime:.2f} s -> {after.uptime:.2f} s"
            )
        if after.heartbeat < before.heartbeat or (after.heartbeat == before.heartbeat
                                                  and tick_expected(before, after)):
            problems.append(
                f"heartbeat did not advance: {before.heartbeat} -> {after.heartbeat} "
                f"({after.heartbeat - before.heartbeat:+d} ticks while guest time advanced "
                f"{after.uptime - before.uptime:.2f} s and host time {host_dt:.2f} s)"
            )
    # The region's reference is what the guest wrote (``mem_expected``); a ``before`` taken
    # without the memory (``snapshot(memory=False)``, as the harness's cycles take theirs)
    # leaves that comparison as the whole check: it catches everything the before/after
    # one does, and a changed region is then reported as different from what was written.
    if before.mem_checksum is not None or after.mem_checksum is not None:
        if before.mem_checksum is not None and after.mem_checksum != before.mem_checksum:
            problems.append(f"memory region checksum changed: {before.mem_checksum} -> {after.mem_checksum}")
        if after.mem_expected is not None and after.mem_checksum != after.mem_expected:
            problems.append(
                f"memory region differs from what was written: {after.mem_checksum} != {after.mem_expected}"
            )
        elif after.mem_expected is None and before.mem_checksum is None:
            problems.append("memory region: no checksum before and no record of what was written to compare with")
    for path, digest in before.files.items():
        now = after.files.get(path)
        if now is None:
            problems.append(f"file {path} is gone (was sha256 {digest[:16]})")
        elif now != digest:
            problems.append(f"file {path} changed: sha256 {digest[:16]} -> {now[:16]}")
    for path in sorted(set(after.files) - set(before.files)):
        problems.append(f"file {path} was not in the first snapshot; nothing to compare")
    if max_pause is not None:
        pause = guest_pause(before, after)
        if pause > max_pause:
            problems.append(
                f"guest paused {pause:.3f} s, {pause - max_pause:.3f} s more than the allowed "
                f"{max_pause:.3f} s (+/- {pause_uncertainty(before, after):.3f} s)"
            )
    return problems


def assert_survived(before: GuestState, after: GuestState, max_pause: float | None = None,
                    *, vm: Machine | None = None) -> None:
    """Fail with every difference when the guest's state did not survive; given the
    guest's ``vm``, also with its consoles' kernel crash lines (a reboot's oops)."""
    problems = survival_problems(before, after, max_pause)
    if problems and vm is not None:
        problems += kernel_crash_problems(vm)
    if problems:
        raise StateError("guest state did not survive:\n  - " + "\n  - ".join(problems))


EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
HARNESS_GUID = "4a1c2d3e-5b6f-4708-9a1b-2c3d4e5f6071"


def efivar_id(name: str, guid: str = HARNESS_GUID) -> str:
    """``NAME-GUID``: how the agent (and efivarfs) names a variable."""
    return f"{name}-{guid}"


def write_efivar(vm: Machine, name: str, data: bytes, guid: str = HARNESS_GUID, attrs: int = 7) -> None:
    """Write an EFI variable from inside the guest (non-volatile by default)."""
    vm.agent("efivar", "set", efivar_id(name, guid), data.hex(), str(attrs))


def read_efivar(vm: Machine, name: str, guid: str = HARNESS_GUID) -> bytes | None:
    """An EFI variable as the guest sees it (None when absent)."""
    res = vm.ssh.run(f"agent efivar get {shlex.quote(efivar_id(name, guid))}", timeout=60)
    return efivar_data(res.json() if res.rc == 0 else None, res.command)


def efivar_data(answer: Any, what: str) -> bytes | None:
    """The data of an ``agent efivar get`` answer (None: the command failed, no variable)."""
    if answer is None:
        return None
    try:
        return bytes.fromhex(str(answer["data"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{what} answered {answer!r}") from exc


def efivar_problem(name: str, guid: str, expected: bytes, got: bytes | None, where: str) -> str | None:
    """A variable's value compared, in words (None when it is as expected)."""
    if got == expected:
        return None
    if got is None:
        return f"EFI variable {name}-{guid}: expected {_show(expected)} in {where}, found nothing"
    return (f"EFI variable {name}-{guid} in {where}: expected {_show(expected)}, found {_show(got)} "
            f"({_bytes_differ(expected, got)})")  # fmt: skip


def _show(data: bytes) -> str:
    text = data.decode("ascii", "replace")
    if data and all(32 <= b < 127 for b in data) and len(data) <= 64:
        return repr(text)
    return f"{len(data)} bytes {data[:24].hex()}{'...' if len(data) > 24 else ''}"


def _bytes_differ(a: bytes, b: bytes) -> str:
    if len(a) != len(b):
        return f"{len(a)} -> {len(b)} bytes"
    first = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    count = sum(1 for x, y in zip(a, b, strict=True) if x != y)
    return f"{count} of {len(a)} bytes differ, first at offset {first}"


def assert_efivar(vm: Machine, name: str, expected: bytes, guid: str = HARNESS_GUID) -> None:
    """Fail unless the guest reads ``expected`` from variable ``name``."""
    problem = efivar_problem(name, guid, expected, read_efivar(vm, name, guid), "the guest")
    if problem is not None:
        if vm.spec.firmware_mode == "stateless":
            problem += (" (this guest runs stateless firmware: variables live in guest RAM "
                        "only and are lost when QEMU restarts)")  # fmt: skip
        raise StateError(problem)


# --- the guest's whole efivarfs view ---------------------------------------------------------

# Three processes for the whole of efivarfs: each file's size and name (stat), "@@", then
# od's hex of head's output, which puts a "==> NAME <==" line before each file's bytes when
# there are several.  Under TCG a process costs the guest 20-30 ms: the per-variable dump
# below took 0.8-1.4 s for 40-44 variables, this one 0.15-0.25 s.
DUMP_VARS_BULK = (
    "cd /sys/firmware/efi/efivars || exit 3; set -- *; [ -e \"$1\" ] || exit 0; "
    "stat -c '%s %n' -- \"$@\" || exit 4; echo @@; head -c 16777216 -- \"$@\" | od -An -v -tx1"
)
_GUID_TAIL = 36


def dump_vars_each(files: Sequence[str] | None = None) -> str:
    """The per-variable dump, of ``files`` (efivarfs names) or of all: one record per
    variable, a newline, "@", NAME-GUID, a tab, then od's hex of the file (attributes first)
    over as many lines as it takes; one od process per variable.  Read for the files whose
    bytes in the bulk dump disagree with their size: efivarfs keeps a stale size after a
    write the firmware refused, and a variable may change between stat and head."""
    names = " ".join(shlex.quote(f) for f in files) if files is not None else "*"
    return ("cd /sys/firmware/efi/efivars || exit 3; "
            f"for f in {names}; do [ -e \"$f\" ] || continue; "
            "printf '\\n@%s\\t' \"$f\"; od -An -v -tx1 \"$f\"; done")  # fmt: skip


DUMP_VARS_EACH = dump_vars_each()


def _split_fname(fname: str, what: str) -> tuple[str, str]:
    """NAME-GUID as efivarfs names a file -> (name, lower-case guid)."""
    if len(fname) < _GUID_TAIL + 2 or fname[-_GUID_TAIL - 1] != "-":
        raise StateError(f"efivarfs dump record malformed: {what[:120]!r}")
    return fname[: -_GUID_TAIL - 1], fname[-_GUID_TAIL:].lower()


def _header(fname: str, first: bool) -> bytes:
    return (b"" if first else b"\n") + b"==> " + fname.encode() + b" <==\n"


def parse_efivar_bulk(text: str) -> tuple[dict[tuple[str, str], tuple[int, bytes]], list[str]] | None:
    """Parse the one-process dump (:data:`DUMP_VARS_BULK`): the variables whose bytes fill
    exactly the size stat gave, up to the next file's header, and the files to read again
    one by one (:func:`dump_vars_each`), whose bytes did not.  None when the dump's
    structure is not there (no separator, a listing line that is not SIZE NAME, a header
    missing).  Files shorter than the 4 bytes of attributes are skipped, as in
    :func:`parse_efivar_dump`."""
    if not text.strip():
        return {}, []
    listing, sep, hexdata = text.partition("@@\n")
    if not sep:
        return None
    entries = []
    for line in listing.splitlines():
        digits, _, fname = line.partition(" ")
        if not digits.isdigit() or not fname:
            return None
        entries.append((int(digits), fname))
    try:
        raw = bytes.fromhex("".join(hexdata.split()))
    except ValueError:
        return None
    several = len(entries) > 1
    out: dict[tuple[str, str], tuple[int, bytes]] = {}
    again: list[str] = []
    pos = 0
    for i, (size, fname) in enumerate(entries):
        if several:
            header = _header(fname, first=i == 0)
            if raw[pos:pos + len(header)] != header:
                return None
            pos += len(header)
        if i + 1 < len(entries):
            after = _header(entries[i + 1][1], first=False)
            if raw[pos + size:pos + size + len(after)] == after:
                end = pos + size
            else:  # not where the size says: the next header is the end, the size is stale
                end = raw.find(after, pos)
                if end < 0:
                    return None
        else:
            end = len(raw)
        if end - pos != size:
            again.append(fname)
        elif size >= 4:
            out[_split_fname(fname, fname)] = (int.from_bytes(raw[pos:pos + 4], "little"), raw[pos + 4:end])
        pos = end
    return out, again


def parse_efivar_dump(text: str) -> dict[tuple[str, str], tuple[int, bytes]]:
    """Parse the dump of efivarfs: (name, guid) -> (attributes, data)."""
    out: dict[tuple[str, str], tuple[int, bytes]] = {}
    for record in text.split("\n@")[1:] if text.startswith("\n@") else _records(text):
        fname, sep, hexdata = record.partition("\t")
        if not sep:
            raise StateError(f"efivarfs dump record malformed: {record[:120]!r}")
        name, guid = _split_fname(fname, record)
        try:
            raw = bytes.fromhex("".join(hexdata.split()))
        except ValueError as exc:
            raise StateError(f"efivarfs dump of {fname}: not hex: {hexdata[:60]!r}") from exc
        if len(raw) < 4:
            # efivarfs files always start with 4 bytes of attributes; a shorter read is a
            # variable removed while listing.
            continue
        out[(name, guid)] = (int.from_bytes(raw[:4], "little"), raw[4:])
    return out


def _records(text: str) -> list[str]:
    if text.strip():
        raise StateError(f"efivarfs dump record malformed: {text[:120]!r}")
    return []


def guest_variables(vm: Machine) -> dict[tuple[str, str], tuple[int, bytes]]:
    """Every EFI variable the guest can see: (name, guid) -> (attributes, data); one SSH
    round trip, and a second for the files whose size efivarfs does not tell right
    (:func:`dump_vars_each`).  The shape :func:`harness.varstore.compare_guest_view` takes."""
    def run(command: str) -> CommandResult:
        res = vm.ssh.run(command, timeout=120)
        if res.rc == 3:
            raise StateError(f"{vm.spec.name}: no efivarfs in the guest (not booted through UEFI?)")
        return res

    res = run(DUMP_VARS_BULK)
    parsed = parse_efivar_bulk(res.stdout) if res.rc == 0 else None
    if parsed is not None and not parsed[1]:
        return parsed[0]
    found, again = parsed if parsed is not None else ({}, None)
    log.debug("%s: the one-process efivarfs dump (rc %s) leaves %s to read one by one",
              vm.spec.name, res.rc, "every variable" if again is None else ", ".join(again))  # fmt: skip
    res = run(dump_vars_each(again))
    res.check()
    return {**found, **parse_efivar_dump(res.stdout)}


# --- guest-initiated reboot and poweroff -------------------------------------------------------



def reboot(vm: Machine, timeout: float = 300.0) -> int:
    """Reboot from inside the guest (``reboot -f``) and wait for its next ready line and
    SSH.  Returns the console offset where the new boot's output starts (for
    :func:`harness.bootorder.assert_booted`)."""
    mark = vm.console.mark()
    before = vm.ready.boot_id if vm.ready else None
    vm.ssh.run(DETACHED.format(cmd="reboot -f"), timeout=30, check=True)
    vm.ssh.close()
    ready = vm.wait_ready(timeout, since=mark)
    if before is not None and ready.boot_id == before:
        raise StateError(f"{vm.spec.name}: ready line after reboot has the old boot id {before}")
    vm.ssh.connect(timeout=min(120.0, timeout))
    return mark


def poweroff(vm: Machine, timeout: float = 120.0) -> None:
    """Power the guest off from inside (``poweroff -f``) and wait for QEMU to exit; QEMU
    has then written every flash change to the varstore file."""
    vm.poweroff_from_inside(timeout)


# --- a guest that stopped answering --------------------------------------------------------

_PC_RE = re.compile(r"\b(?:RIP|EIP|PC)=([0-9a-fA-F]+)")
_HLT_RE = re.compile(r"\bHLT=([01])")
_FLAGS_RE = re.compile(r"\b(?:RFL|EFL)=([0-9a-fA-F]+)")


def _registers(text: str) -> dict[str, Any]:
    """Program counter, halt state and (x86) the interrupt flag from HMP 'info registers'."""
    out: dict[str, Any] = {}
    if m := _PC_RE.search(text):
        out["pc"] = hex(int(m.group(1), 16))
    if m := _HLT_RE.search(text):
        out["halted"] = m.group(1) == "1"
    if m := _FLAGS_RE.search(text):  # EFLAGS.IF: a vCPU halted with interrupts off never wakes
        out["interrupts"] = bool(int(m.group(1), 16) & 0x200)
    return out


def diagnose(vm: Machine, interval: float = 1.0, console_tail: int = 800) -> dict[str, Any]:
    """What QEMU says about a guest that stopped answering SSH: the run state, the first
    vCPU's program counter sampled twice ``interval`` apart (moving, halted, or stuck), and
    the end of the console since the last mark.  Never raises: a failure to ask is
    recorded as ``error``.  For records and artifacts of failed guest checks."""
    out: dict[str, Any] = {}
    try:
        out["status"] = vm.qmp("query-status").get("status")
        samples = []
        for i in range(2):
            if i:
                time.sleep(interval)
            text = vm.qmp("human-monitor-command", **{"command-line": "info registers"})
            samples.append(_registers(str(text)))
        out["vcpu"] = samples
        pcs = [s.get("pc") for s in samples]
        if None not in pcs:
            out["pc_moving"] = pcs[0] != pcs[1]
    except Exception as exc:  # noqa: BLE001 - a diagnosis must not hide the failure it explains
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        out["console_tail"] = vm.console.read_log()[-console_tail:]
    except Exception as exc:  # noqa: BLE001
        out.setdefault("error", f"console: {exc}"[:300])
    return out


def describe_diagnosis(diag: Mapping[str, Any]) -> str:
    """One line for a problem list: ``QEMU status running; vCPU pc 0x.. -> 0x.. (moving)``."""
    parts = [f"QEMU status {diag.get('status', '?')}"]
    vcpu = diag.get("vcpu") or []
    if vcpu:
        pcs = " -> ".join(str(s.get("pc", "?")) for s in vcpu)
        if all(s.get("halted") for s in vcpu):
            how = "halted, interrupts off" if not any(s.get("interrupts", True) for s in vcpu) else "halted"
        else:
            how = "moving" if diag.get("pc_moving") else "stuck"
        parts.append(f"vCPU pc {pcs} ({how})")
    if diag.get("error"):
        parts.append(f"diagnosis incomplete: {diag['error']}")
    return "; ".join(parts)


def failed_check_problems(vm: Machine, exc: Exception,
                          seen: Sequence[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """A guest check that raised: the :func:`diagnose` record, its problem line, and the
    console's kernel crash lines not in ``seen`` (a guest that crashed without rebooting -
    an oops that killed sshd, a hang with interrupts off - answers no check; its console
    says why)."""
    diag = diagnose(vm)
    return diag, [f"guest check failed: {exc} [{describe_diagnosis(diag)}]", *kernel_crash_problems(vm, seen)]
