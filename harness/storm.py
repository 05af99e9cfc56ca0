"""Migration under fire: hops cut while the guest is writing EFI variables.

The guest agent's storm (``agent storm start``) creates, rewrites, appends to and deletes
the variables ``HarnessStorm0..N-1`` in a loop, numbering every write and logging each one
that returned success (``SEQ OP INDEX SIZE CHAR``) in tmpfs, so the log travels with the
guest's RAM.  With enough volume the firmware's store fills and the Fault Tolerant Write
reclaim runs; a hop then lands at any point of a variable write, including while the
writeable pflash chip is in programming mode.

:func:`run` starts the storm, performs the hops back to back while it runs, and after every
hop pauses it (between two writes) and checks, with :func:`problems`:

- every write the guest saw complete is in the guest's view (efivarfs) and in the host-side
  varstore file QEMU writes, variable by variable (data and attributes);
- the file's store parses completely: every header in range, a known state byte, nothing
  half-written or half-updated once the writes have settled, only erased flash after the
  last header (:func:`harness.varstore.integrity_problems`);
- no firmware or kernel error about variables or flash on the console or in the kernel log.

When the storm stops, the flash as the guest sees it (``pmemsave`` of the varstore chip's
window: a chip left in programming or status mode reads back status bytes, not the store)
must equal the file.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import migration, state, varstore
from harness.errors import HarnessError, MachineError
from harness.inventory.builds import QemuBuild
from harness.machine import Machine

STORM_GUID = state.HARNESS_GUID  # the agent's STORM_GUID
NAME = "HarnessStorm"
DEFAULT_VARIABLES = 6
ATTRS = 0x7  # NV | BS | RT: what the storm sets (the append bit is not stored)

#: Console and kernel-log lines that mean the firmware or the kernel saw a variable or flash
#: error (edk2's ASSERT and variable driver messages, the kernel's efivars/efi errors).
ERROR_PATTERNS = (
    re.compile(r"ASSERT[ _(].*(?:Variable|Ftw|FaultTolerant|Fvb|Flash|NorFlash)", re.I),
    re.compile(r"(?:Variable|FTW|Ftw)\w*: .*(?:error|fail|corrupt)", re.I),
    re.compile(r"efivars?: .*(?:error|fail|corrupt)", re.I),
    re.compile(r"efi: .*(?:error|fail).*(?:variable|SetVariable)", re.I),
    re.compile(r"pflash.*(?:error|fail)", re.I),
)


@dataclass(frozen=True)
class Write:
    """One logged write of the storm."""

    seq: int
    op: str  # set, append, delete, absent (a delete of a variable that did not exist)
    index: int
    size: int
    char: str
    failed: str | None = None  # the error text of a write that did not complete

    @property
    def data(self) -> bytes:
        return b"s%08d" % self.seq + self.char.encode() * (self.size - 9)


def parse_log(text: str) -> list[Write]:
    """The storm's log lines as :class:`Write` records (a torn last line is ignored)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        try:
            if len(parts) >= 6 and parts[1] == "fail":
                out.append(Write(int(parts[0]), parts[2], int(parts[3]), int(parts[4]), parts[5],
                                 failed=" ".join(parts[6:]) or "write failed"))  # fmt: skip
            elif len(parts) == 5:
                out.append(Write(int(parts[0]), parts[1], int(parts[2]), int(parts[3]), parts[4]))
        except ValueError:
            continue
    return out


def expected_state(writes: Sequence[Write]) -> dict[int, bytes | None]:
    """Each variable's data after every completed write (None: deleted or never written)."""
    out: dict[int, bytes | None] = {}
    for w in writes:
        if w.failed is not None:
            continue  # a variable write is atomic: a failed one changed nothing
        if w.op == "set":
            out[w.index] = w.data
        elif w.op == "append":
            out[w.index] = (out.get(w.index) or b"") + w.data
        elif w.op in ("delete", "absent"):
            out[w.index] = None
    return out


def var_name(index: int) -> str:
    return f"{NAME}{index}"


# --- the guest side ------------------------------------------------------------------------


def start(vm: Machine, variables: int = DEFAULT_VARIABLES, first_seq: int = 0) -> None:
    vm.agent("storm", "start", str(variables), str(first_seq))


def pause(vm: Machine) -> int:
    """Pause the storm between two writes; the number of the last write started."""
    return int(vm.agent("storm", "pause", timeout=60)["seq"])


def resume(vm: Machine) -> None:
    vm.agent("storm", "resume")


def stop(vm: Machine) -> int:
    return int(vm.agent("storm", "stop", timeout=60)["seq"])


def read_log(vm: Machine) -> list[Write]:
    return parse_log(vm.ssh.run("cat /run/agent/storm/log", timeout=60).stdout)


def guest_view(vm: Machine) -> dict[int, tuple[int, str]]:
    """index -> (attributes, sha256 of the data) of the storm's variables in efivarfs
    (:func:`harness.state.guest_variables`, which reads again on its own any file whose
    efivarfs size went stale after a refused write).  An empty file, left by a create the
    firmware refused (the store was full: edk2 reclaims only at boot), is no variable."""
    return {i: (attrs, _digest(data)) for (name, guid), (attrs, data) in state.guest_variables(vm).items()
            if (i := _storm_index(name, guid)) is not None}  # fmt: skip


def _storm_index(name: str, guid: str) -> int | None:
    """N of a variable HarnessStormN of the storm's GUID; None for any other variable."""
    digits = name[len(NAME):]
    return int(digits) if guid == STORM_GUID and name.startswith(NAME) and digits.isdigit() else None


# --- the checks ----------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def view_problems(expected: dict[int, bytes | None], view: dict[int, tuple[int, str]],
                  where: str) -> list[str]:  # fmt: skip
    """Differences between the expected variables and one view of them (pure)."""
    problems = []
    for index in sorted(set(expected) | set(view)):
        want = expected.get(index)
        got = view.get(index)
        name = var_name(index)
        if want is None and got is not None:
            problems.append(f"{where}: {name} exists, but its last completed write deleted it")
        elif want is not None and got is None:
            problems.append(f"{where}: {name} is missing ({len(want)} bytes expected)")
        elif want is not None and got is not None:
            if got[1] != _digest(want):
                problems.append(f"{where}: {name} holds other data than its last completed "
                                f"writes ({len(want)} bytes expected)")  # fmt: skip
            if got[0] != ATTRS:
                problems.append(f"{where}: {name} has attributes {got[0]:#x}, expected {ATTRS:#x}")
    return problems


def file_view(path: Path) -> dict[int, tuple[int, str]]:
    """The storm's variables as the host-side varstore file holds them (as far as its store
    can be parsed: :func:`problems` reports a damaged structure on its own)."""
    model = varstore.read_varstore(path, strict=False)
    return {i: (var.attributes, _digest(var.data)) for (name, guid), var in model.variables.items()
            if (i := _storm_index(name, guid)) is not None}  # fmt: skip


def console_errors(text: str) -> list[str]:
    """Lines of console or kernel output that report a variable or flash error."""
    found = []
    for line in text.splitlines():
        if any(p.search(line) for p in ERROR_PATTERNS):
            found.append(line.strip()[:300])
    return found


def problems(vm: Machine, writes: Sequence[Write], *, settle_s: float = 10.0) -> list[str]:
    """Everything wrong after a hop, with the storm paused (see the module docstring)."""
    expected = expected_state(writes)
    out = view_problems(expected, guest_view(vm), "the guest's view")
    deadline = time.monotonic() + settle_s
    while True:  # QEMU writes the flash through to the file; give it a moment under load
        try:
            file_problems = view_problems(expected, file_view(vm.varstore_path),
                                          f"the varstore file {vm.varstore_path}")  # fmt: skip
        except HarnessError as exc:
            file_problems = [f"the varstore file {vm.varstore_path} is unreadable: {exc}"]
        if not file_problems or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    out += file_problems
    try:
        out += varstore.integrity_problems(vm.varstore_path, settled=True)
    except HarnessError as exc:
        out.append(str(exc))
    kernel = vm.ssh.run("dmesg", timeout=60, check=False).stdout
    out += [f"kernel log: {line}" for line in console_errors(kernel)]
    for log in sorted(vm.workdir.glob("qemu-*.serial.log")):  # every process's console
        text = log.read_text(errors="replace")
        out += [f"console {log.name}: {line}" for line in console_errors(text)]
    return out


def flash_window(vm: Machine) -> tuple[int, int]:
    """(guest-physical address, size) of the varstore chip's window."""
    size = vm.varstore_path.stat().st_size
    if vm.spec.arch == "aarch64":
        return 0x04000000, size  # the virt machine's flash1
    code = vm.firmware_code
    if code is None:
        raise MachineError(f"{vm.spec.name}: no pflash firmware")
    return (1 << 32) - code.stat().st_size - size, size  # pc: below the CODE chip, under 4 GiB


def flash_problems(vm: Machine, dump: Path) -> list[str]:
    """The varstore chip as the guest reads it must equal the file QEMU wrote."""
    base, size = flash_window(vm)
    vm.qmp("pmemsave", val=base, size=size, filename=str(dump))
    seen, disk = dump.read_bytes(), vm.varstore_path.read_bytes()
    if seen == disk:
        return []
    first = next((i for i, (a, b) in enumerate(zip(seen, disk, strict=False)) if a != b), min(len(seen), len(disk)))
    return [f"the guest-visible varstore flash at {base:#x} differs from {vm.varstore_path} "
            f"from offset {first:#x} (guest reads {seen[first:first + 8].hex()}, the file has "
            f"{disk[first:first + 8].hex()}): is the chip left out of read-array mode?"]  # fmt: skip


# --- the run -------------------------------------------------------------------------------


@dataclass
class StormHop:
    """One hop made while the storm ran, and what the checks found after it."""

    index: int
    op: str
    source: str
    destination: str
    status: str
    writes: int  # completed writes logged so far
    failed_writes: int
    pause_s: float | None = None
    problems: list[str] = field(default_factory=list)
    error: str = ""
    signature: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the first writes the guest saw fail
    store_used: int | None = None  # bytes of the store in use after the hop (headers and data)
    reclaimed: bool = False  # the store shrank since the previous check: a reclaim ran

    def count(self, writes: Sequence[Write]) -> None:
        self.writes = sum(w.failed is None for w in writes)
        failed = [w for w in writes if w.failed is not None]
        self.failed_writes = len(failed)
        self.failures = [f"#{w.seq} {w.op} {var_name(w.index)} {w.size} B: {w.failed}" for w in failed[:5]]

    @property
    def ok(self) -> bool:
        return self.status == "completed" and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "hop": self.index, "op": self.op, "source": self.source,
            "destination": self.destination, "status": self.status, "ok": self.ok,
            "writes": self.writes, "failed_writes": self.failed_writes, "pause_s": self.pause_s,
            "problems": self.problems, "error": self.error, "signature": self.signature,
            "failures": self.failures, "store_used": self.store_used, "reclaimed": self.reclaimed,
            "result": self.result,
        }  # fmt: skip


def _reboot(vm: Machine, index: int, earlier: list[Write], variables: int) -> StormHop:
    """A warm reboot in the middle of the storm: edk2 reclaims a full store only at boot
    (through the Fault Tolerant Write protocol), so this is where reclaim runs.  The storm
    stops first (no write is cut), every completed write must be there after the boot, and
    the storm starts again numbering on."""
    label = vm.build.label
    hop = StormHop(index, "reboot", label, label, "completed", 0, 0)
    try:
        stop(vm)
        earlier += read_log(vm)
        state.reboot(vm)
        hop.count(earlier)
        hop.problems += problems(vm, earlier)
        start(vm, variables, first_seq=max((w.seq for w in earlier), default=0))
    except HarnessError as exc:
        hop.status = "failed"
        hop.problems.append(f"rebooting in the storm: {exc}")
    return hop


def store_used(path: Path) -> int | None:
    """Bytes of the variable store in use (every header and its data, live or deleted)."""
    try:
        slots, _problems = varstore.store_slots(path)
    except HarnessError:
        return None
    return sum(s.end - s.offset for s in slots)


def wait_full(vm: Machine, timeout: float) -> bool:
    """Let the storm write until the firmware refuses a write (its store is full: edk2
    reclaims only at boot), at most ``timeout`` seconds; whether it filled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if any(w.failed is not None for w in read_log(vm)):
            return True
    return False


def run(vm: Machine, hops: Sequence[tuple[str, QemuBuild | None]], *, variables: int = DEFAULT_VARIABLES,
        warmup_s: float = 6.0, interval_s: float = 2.0, fill_first_s: float = 0.0,
        dump_dir: Path | None = None, bandwidth: int | None = None,
        on_hop: Callable[[StormHop], None] | None = None) -> list[StormHop]:
    """Start the storm, make ``hops`` (operation, destination build) back to back while it
    writes (``warmup_s`` before the first, ``interval_s`` of writes between two), check
    after each, and at the end stop it and compare the flash with the file.  With
    ``fill_first_s`` the first hop waits (that long at most, instead of ``warmup_s``) until
    the store is full, so a slow machine still reaches the refused writes and a reboot's
    reclaim.  ``bandwidth``
    (bytes/s) caps the live hops' stream, so that the guest writes while precopy runs (the
    cut that makes ``varstore-file-lost-writes`` show on aarch64).  Stops at the first hop
    that fails (the guest cannot be trusted after it)."""
    out: list[StormHop] = []
    earlier: list[Write] = []  # the writes of earlier boots (a reboot restarts the storm)
    start(vm, variables)
    if fill_first_s > 0:  # a full store means the writes got going: no warmup on top
        wait_full(vm, fill_first_s)
    else:
        time.sleep(warmup_s)  # let the writes get going before the first cut
    used: int | None = None
    for i, (op, dest) in enumerate(hops, 1):
        if i > 1:
            time.sleep(interval_s)
        src = vm.build.label
        before = state.snapshot(vm, memory=False)
        if op == "reboot":
            hop = _reboot(vm, i, earlier, variables)
        else:
            kw: dict[str, Any] = {"bandwidth": bandwidth} if op == "live" and bandwidth else {}
            res = migration.operation(op)(vm, to=dest, check=False, **kw)
            hop = StormHop(i, op, src, res.destination, res.status, 0, 0, error=res.error,
                           signature=res.signature, result=res.to_json())  # fmt: skip
            if res.ok:
                try:
                    pause(vm)
                    writes = earlier + read_log(vm)
                    hop.count(writes)
                    after = state.snapshot(vm, memory=False)
                    hop.pause_s = round(state.guest_pause(before, after), 4)
                    hop.problems += state.survival_problems(before, after, None)
                    hop.problems += problems(vm, writes)
                    resume(vm)
                except HarnessError as exc:
                    hop.problems.append(f"checking after the hop: {exc}")
            else:
                hop.problems += res.problems
        hop.store_used = store_used(vm.varstore_path)
        hop.reclaimed = used is not None and hop.store_used is not None and hop.store_used < used
        used = hop.store_used
        _classify(hop)
        out.append(hop)
        if on_hop is not None:
            on_hop(hop)
        if not hop.ok:
            return out
    final = StormHop(len(hops) + 1, "stop", vm.build.label, vm.build.label, "completed", 0, 0)
    try:
        stop(vm)
        writes = earlier + read_log(vm)
        final.count(writes)
        final.problems += problems(vm, writes)
        final.store_used = store_used(vm.varstore_path)
        final.reclaimed = used is not None and final.store_used is not None and final.store_used < used
        dump = (dump_dir or vm.workdir) / "flash-dump.fd"
        final.problems += flash_problems(vm, dump)
    except HarnessError as exc:
        final.problems.append(f"checking after the storm stopped: {exc}")
    _classify(final)
    out.append(final)
    if on_hop is not None:
        on_hop(final)
    return out


def _classify(hop: StormHop) -> None:
    """A hop whose checks failed gets the signature of what they found (QEMU's own error,
    when the hop itself failed, keeps its signature)."""
    if hop.problems and not hop.signature:
        from harness import signatures

        sig = signatures.classify("\n".join(hop.problems))
        if sig is not None:
            hop.signature = sig.name
