"""Benchmarks: ratios measured within one run (``make bench``), written to bench/out/.

Every figure is a ratio against a baseline measured in the same run on the same machine,
so a slow or busy machine shifts both sides:

- fast start: restore-to-ready vs cold UEFI boot-to-ready;
- harness overhead: each operation (live, save-restore, cpr-reboot, cpr-transfer,
  cpr-exec) by the harness vs the same QMP sequence driven by a minimal script (plain
  subprocess + qemu.qmp) with the same QEMU command line;
- guest-visible pause per CPR mode vs QEMU's reported downtime;
- ``pytest -n 2`` vs ``-n 1`` on a fixed set of booting tests (``--xdist``);
- peak memory (VmHWM) per guest kind.

Every run also records the CPU share it ran on (``make bench-halved`` runs it on half the
machine's CPU time) and the run's speed index (:mod:`harness.guest.speed`: the median cold
boot of the reference guest), so figures from different machines can be compared.

Usage: ``python -m bench [--quick] [--xdist] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from harness import migration, snapshots
from harness import state as guest_state
from harness.guest import cpu_share, speed
from harness.guest.qemu_process import die_with_parent, unix_listening
from harness.guest.ssh import SshClient, load_client_key, parse_host_key, tcp_connect
from harness.machine import Machine
from harness.spec import RamImage, VmSpec, qemu_args

OUT = Path(__file__).resolve().parent / "out"
#: the raw scripts poll QMP as often as harness.migration does in its first second
RAW_POLL_S = 0.004
REPO = Path(__file__).resolve().parent.parent


def machine_info() -> dict[str, Any]:
    mem = Path("/proc/meminfo").read_text().split("\n")[0]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem": mem, "kernel": platform.release(),
            "load_at_start": os.getloadavg()}  # fmt: skip


def vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Bench:
    def __init__(self, quick: bool) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="hvb-"))
        self.n = 0
        self.quick = quick

    def machine(self, spec: VmSpec) -> Machine:
        self.n += 1
        return Machine(spec, self.base / f"m{self.n}")

    def fast(self, spec: VmSpec) -> Machine:
        return snapshots.start_fast(self.machine(spec), make_template=lambda: self.machine(spec))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def raw_restore(vm: Machine, snap: snapshots.Snapshot) -> float:
    """Restore-to-ready as a minimal script does it: the same QEMU command line started
    with ``-incoming defer``, the snapshot's state loaded, plain paramiko connected (host
    key pinned, Nagle off) - no clock or RNG refresh.  QEMU's start, its load and the
    guest's first SSH handshake are the floor no harness can go below.  A snapshot with a
    RAM image is mapped as the harness maps it (``x-ignore-shared``, private, read-only)."""
    import paramiko

    image = None if snap.ram is None else RamImage(snap.ram, shared=False, readonly=True)
    argv, qsock, port = _raw_argv_port(vm, "restore", str(snap.meta["machine"]), ["defer"], image)
    assert port is not None
    t0 = time.monotonic()  # the harness's time has its copy of the varstore too
    if snap.varstore is not None:  # the script's own varstore, from the snapshot's
        shutil.copyfile(snap.varstore, next(vm.workdir.glob("raw-*.fd")))
    proc = popen_raw(argv, vm.build.env)
    q = None
    try:
        q = raw_qmp(qsock)
        if image is not None:
            q.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        params = snapshots.restore_params(vm)  # one self-announce round, as the harness's restore
        if params:
            q.cmd("migrate-set-parameters", **params)
        q.cmd("migrate-incoming", uri=migration.incoming_uri(vm.build, snap.state))
        _wait_status(partial(_dest_running, q), ("running",), "raw restore")
        client = paramiko.SSHClient()
        hk = parse_host_key(vm.image.host_key)
        client.get_host_keys().add(f"[127.0.0.1]:{port}", hk.get_name(), hk)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        sock = tcp_connect("127.0.0.1", port, timeout=30)
        client.connect("127.0.0.1", port=port, username="root", sock=sock, allow_agent=False,
                       look_for_keys=False, pkey=load_client_key(vm.image.client_key))  # fmt: skip
        dt = time.monotonic() - t0
        client.close()
    finally:
        if q is not None:
            _quit_raw(proc, q)
        else:
            proc.kill()
            proc.wait()
    return dt


def bench_fast_start(b: Bench, results: dict[str, Any]) -> None:
    spec = VmSpec(name="bfast")
    colds, restores, raws, hwm = [], [], [], []
    b.fast(spec).stop()  # make sure the snapshot exists before timing restores
    snap = snapshots.valid(snapshots.snapshots_dir() / snapshots.snapshot_key(b.machine(spec)))
    assert snap is not None
    restored_hwm = []
    # Each cold boot is followed by its share of restores (the harness's and the script's
    # in turn): a machine whose speed drifts over the minute the part takes (a shared
    # host's does, by a quarter) drifts both sides of the ratio alike.
    for _ in range(1 if b.quick else 3):
        vm = b.machine(spec)
        dt, _ = timed(vm.start)
        colds.append(dt)
        hwm.append(vm_hwm_kib(vm.process.pid))
        vm.stop()
        for _ in range(3 if b.quick else 4):
            vm = b.machine(spec)
            dt, _ = timed(partial(snapshots.start_fast, vm, make_template=partial(b.machine, spec)))
            restores.append(dt)
            restored_hwm.append(vm_hwm_kib(vm.process.pid))
            vm.stop()
            with b.machine(spec) as script_vm:  # its private directories go with it
                raws.append(raw_restore(script_vm, snap))
    cold, rest, raw = statistics.median(colds), statistics.median(restores), statistics.median(raws)
    results["fast_start"] = {"cold_boot_s": colds, "restore_s": restores, "cold_median_s": cold,
                             "restore_median_s": rest, "speedup": cold / rest, "target": 40.0,
                             "raw_restore_s": raws, "raw_restore_median_s": raw,
                             "raw_speedup": cold / raw, "vs_raw": rest / raw}  # fmt: skip
    peak = results.setdefault("peak_memory_kib", {})
    peak["minimal-uefi-1G"] = max(h for h in hwm if h)
    peak["minimal-uefi-1G-restored"] = max(h for h in restored_hwm if h)  # its RAM mapped from the image


def raw_qmp(sock: Path) -> Any:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    deadline = time.monotonic() + 30
    while not sock.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("raw QEMU never opened its QMP socket")
        time.sleep(0.005)
    while True:  # the socket file appears at bind(), a moment before listen()
        q = QEMUMonitorProtocol(str(sock))
        try:
            q.connect()
            return q
        except Exception:
            q.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def raw_live(vm: Machine) -> float:
    """The same live migration as migration.live(), driven by a minimal script."""
    r = vm._resolve(900 + int(time.monotonic()) % 100, vm.new_varstore(f"raw-{time.monotonic_ns()}.fd"),
                    ["defer"], migration.machine_type(vm), vm.build)  # fmt: skip
    qsock = vm.workdir / f"rawq-{time.monotonic_ns() % 10**6}.sock"
    msock = vm.workdir / f"rawm-{time.monotonic_ns() % 10**6}.sock"
    cmd = [str(vm.build.binary), *vm.build.data_args(), "-display", "none", "-vga", "none",
           "-qmp", f"unix:{qsock},server=on,wait=off", *qemu_args(vm.spec, r)]  # fmt: skip
    t0 = time.monotonic()
    proc = popen_raw(cmd, vm.build.env)
    try:
        q = raw_qmp(qsock)
        q.cmd("migrate-incoming", uri=f"unix:{msock}")
        vm.process.qmp("migrate", uri=f"unix:{msock}")
        while vm.process.qmp("query-migrate").get("status") not in ("completed", "failed"):
            time.sleep(RAW_POLL_S)
        while q.cmd("query-status").get("status") != "running":
            time.sleep(RAW_POLL_S)
        dt = time.monotonic() - t0
        with contextlib.suppress(Exception):  # the destination may close first
            q.close()
    finally:
        proc.kill()
        proc.wait()
    vm.process.qmp("cont")  # give the source back its guest for the next round
    return dt




def _wait_status(cmd: Callable[..., Any], wanted: tuple[str, ...], what: str) -> str:
    deadline = time.monotonic() + 120
    while True:
        status = cmd()
        if status in wanted:
            return str(status)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: still {status} after 120 s")
        time.sleep(RAW_POLL_S)


#: every QEMU the raw scripts started: killed when the bench ends, however it ends
_RAW: list[subprocess.Popen[bytes]] = []


def popen_raw(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A raw QEMU, as the minimal script starts it, but owned like the harness's: it gets
    the parent-death signal (:func:`die_with_parent`) and :func:`kill_raw` reaps it."""
    argv, env = die_with_parent(argv, dict(os.environ if env is None else env))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _RAW.append(proc)
    return proc


def kill_raw() -> None:
    while _RAW:
        proc = _RAW.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _quit_raw(proc: subprocess.Popen[bytes], q: Any) -> None:
    """Quit a raw QEMU and close its QMP.  After ``quit`` the monitor goes away under the
    client: the reply, or the legacy client's ``close()``, can meet end-of-file (EOFError,
    ConnectionResetError, ...) depending on timing; a slower machine meets it more often.
    QEMU's own exit is what counts."""
    with contextlib.suppress(Exception):
        q.cmd("quit")
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(Exception):
        q.close()


class RawQemu:
    """A QEMU the minimal script started (plain subprocess + qemu.qmp), or the harness's
    own first source, driven only through QMP."""

    def __init__(self, proc: subprocess.Popen[bytes] | None, q: Any, cmd: Callable[..., Any]) -> None:
        self.proc, self.q, self.cmd = proc, q, cmd

    @classmethod
    def of_harness(cls, vm: Machine) -> RawQemu:
        return cls(None, None, lambda c, **a: vm.process.qmp(c, **a))

    @classmethod
    def connect(cls, proc: subprocess.Popen[bytes] | None, qsock: Path) -> RawQemu:
        q = raw_qmp(qsock)
        return cls(proc, q, lambda c, **a: q.cmd(c, **a))

    def quit(self, vm: Machine) -> None:
        if self.proc is None and self.q is None:
            vm.release(vm.current)  # the harness's own QEMU quits as the harness does it
        elif self.proc is not None:
            _quit_raw(self.proc, self.q)
        else:  # the harness's process after an exec: kill it (the harness reaps it at stop)
            with contextlib.suppress(Exception):
                self.q.cmd("quit")
            with contextlib.suppress(Exception):
                self.q.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        if self.q is not None:
            with contextlib.suppress(Exception):  # its QEMU is gone
                self.q.close()


def _raw_argv(vm: Machine, tag: str, machine: str, incoming: list[str]) -> tuple[list[str], Path]:
    argv, qsock, _ = _raw_argv_port(vm, tag, machine, incoming)
    return argv, qsock


def _raw_argv_port(vm: Machine, tag: str, machine: str, incoming: list[str],
                   ram_image: RamImage | None = None) -> tuple[list[str], Path, int | None]:
    """The guest's QEMU command line (as the harness builds it) with ``incoming`` and a QMP
    socket of the script's own; ``build.command()`` first, as for an exec."""
    r = vm._resolve(900 + int(time.monotonic_ns()) % 100, vm.new_varstore(f"raw-{time.monotonic_ns()}.fd"),
                    incoming, machine, vm.build, ram_image)  # fmt: skip
    qsock = vm.workdir / f"rawq-{tag}-{time.monotonic_ns() % 10**6}.sock"
    argv = [*vm.build.command(), *vm.build.data_args(), "-display", "none", "-vga", "none",
            "-qmp", f"unix:{qsock},server=on,wait=off", *qemu_args(vm.spec, r)]  # fmt: skip
    return argv, qsock, r.ssh_port


def _dest_running(q: Any) -> str:
    st = q.cmd("query-status").get("status")
    if st in ("paused", "postmigrate") and q.cmd("query-migrate").get("status") == "completed":
        q.cmd("cont")
    return str(st)


def _src_completed(src: RawQemu, what: str) -> None:
    _wait_status(lambda: src.cmd("query-migrate").get("status"), ("completed",), what)


def raw_chain(vm: Machine, op: str, cycles: int, pauses: list[float] | None = None) -> list[float]:
    """``cycles`` hops of ``op`` as a minimal script does them, timed from the first QMP
    command (or the destination's start) to the destination running the guest, like the
    harness's ``wall_s``.  The first source is the harness's QEMU; every later one is the
    previous raw destination; the guest is left in the last, killed at the end.

    ``pauses``: also measure each hop's guest-visible pause as the harness does (guest
    uptime against host time over SSH, before and after the hop, outside the timing)."""
    times: list[float] = []
    first: SshClient = vm.ssh  # the harness's session to its own first source
    ssh = first
    ports: list[int | None] = []

    def raw_argv(tag: str, incoming: list[str]) -> tuple[list[str], Path]:
        argv, qsock, port = _raw_argv_port(vm, tag, machine, incoming)
        ports.append(port)
        return argv, qsock

    machine = migration.machine_type(vm)
    state = vm.workdir / f"raw-{op}.state"
    src = RawQemu.of_harness(vm)
    ignore_shared = op == "cpr-reboot" and vm.spec.memory_backend == "file"
    try:
        for i in range(cycles):
            before = guest_state.clock_sample_over(ssh) if pauses is not None else None
            if op in ("save-restore", "cpr-reboot"):
                t0 = time.monotonic()
                if ignore_shared:
                    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
                if op == "cpr-reboot":
                    src.cmd("migrate-set-parameters", mode="cpr-reboot")
                src.cmd("migrate", uri=f"file:{state}")
                _src_completed(src, f"raw {op} save")
                src.quit(vm)
                argv, qsock = raw_argv(f"c{i}", ["defer"])
                proc = popen_raw(argv)
                dest = RawQemu.connect(proc, qsock)
                if ignore_shared:
                    dest.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
                if op == "cpr-reboot":
                    dest.cmd("migrate-set-parameters", mode="cpr-reboot")
                dest.cmd("migrate-incoming", uri=f"file:{state}")
                _wait_status(lambda d=dest: _dest_running(d.q), ("running",), f"raw {op} load")
            elif op == "cpr-transfer":
                stamp = time.monotonic_ns() % 10**9
                main_sock, cpr_sock = vm.sock_dir / f"rm-{stamp}.sock", vm.sock_dir / f"rc-{stamp}.sock"
                cpr = {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(cpr_sock)}}
                main = {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(main_sock)}}
                t0 = time.monotonic()
                argv, qsock = raw_argv(f"c{i}", [f"unix:{main_sock}", json.dumps(cpr)])
                proc = popen_raw(argv)
                while not unix_listening(cpr_sock):
                    if proc.poll() is not None:
                        raise RuntimeError("raw cpr-transfer destination exited")
                    time.sleep(RAW_POLL_S)
                src.cmd("migrate-set-parameters", mode="cpr-transfer")
                src.cmd("migrate", channels=[main, cpr])
                _src_completed(src, "raw cpr-transfer")
                dest = RawQemu.connect(proc, qsock)
                _wait_status(lambda d=dest: _dest_running(d.q), ("running",), "raw cpr-transfer load")
                times.append(time.monotonic() - t0)
                src.quit(vm)
                src = dest
                ssh = _sample_pause(vm, ssh, first, ports[-1], before, pauses)
                continue
            elif op == "cpr-exec":
                with contextlib.suppress(FileNotFoundError):
                    state.unlink()
                argv, qsock = raw_argv(f"c{i}", [f"file:{state}"])
                t0 = time.monotonic()
                src.cmd("migrate-set-parameters", mode="cpr-exec", **{"cpr-exec-command": argv})
                src.cmd("migrate", uri=f"file:{state}")
                with contextlib.suppress(Exception):  # the monitor goes away with the exec
                    if src.q is not None:
                        src.q.close()
                deadline = time.monotonic() + 120
                while not qsock.exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError("raw cpr-exec: the new image never opened its QMP socket")
                    time.sleep(RAW_POLL_S)
                dest = RawQemu.connect(src.proc, qsock)
                _wait_status(lambda d=dest: _dest_running(d.q), ("running",), "raw cpr-exec load")
            else:
                raise ValueError(op)
            times.append(time.monotonic() - t0)
            src = dest
            ssh = _sample_pause(vm, ssh, first, ports[-1], before, pauses)
    finally:
        if ssh is not first:
            ssh.close()
        src.kill()
    return times


def _sample_pause(vm: Machine, ssh: SshClient, first: SshClient, port: int | None, before: Any,
                  pauses: list[float] | None) -> SshClient:
    """After a raw hop: SSH to the new QEMU's forward, and the pause since ``before``."""
    if pauses is None or port is None:
        return ssh
    if ssh is not first:
        ssh.close()
    ssh = SshClient("127.0.0.1", port, vm.image.host_key, vm.image.client_key, name="raw").connect(timeout=60)
    pauses.append(guest_state.guest_pause(before, guest_state.clock_sample_over(ssh)))
    return ssh


#: each operation's guest: spec fields beyond the operation's own (cpr-exec needs QEMU 10.1+)
OP_SPECS: dict[str, dict[str, Any]] = {"cpr-exec": {"qemu": "11.1.3"}}
OPS = ("live", "save-restore", "cpr-reboot", "cpr-transfer", "cpr-exec")


def bench_overhead(b: Bench, results: dict[str, Any]) -> None:
    """Harness vs minimal script, per operation: the medians of ``rounds x k`` hops each,
    the two interleaved (each round restores a fresh guest, hops it once uncounted, ``k``
    times with the harness, then ``k`` times with the script), so a drift of the machine's
    speed during the run falls on both sides alike.  A CPR hop takes 50-80 ms, where a
    few ms of noise is 5%: those get 10 rounds of 10 (a second each)."""
    out: dict[str, Any] = {}
    for op in OPS:
        rounds, k = (1, 3) if b.quick else ((10, 10) if op.startswith("cpr-") else (3, 5))
        spec = VmSpec(name=f"bo{op.replace('-', '')}", **migration.spec_fields_for(op), **OP_SPECS.get(op, {}))
        harness_t: list[float] = []
        raw_t: list[float] = []
        for _ in range(rounds):
            vm = b.fast(spec)
            try:
                if op == "live":  # the source stays: raw and harness hops alternate
                    for _ in range(k):
                        raw_t.append(raw_live(vm))
                        harness_t.append(migration.live(vm).wall_s)
                else:
                    # the first hop of a freshly restored guest is slower (its RAM not yet
                    # touched on this host): one uncounted hop, as the script's first hop
                    # always follows the harness's
                    migration.operation(op)(vm)
                    harness_t += [migration.operation(op)(vm).wall_s for _ in range(k)]
                    raw_t += raw_chain(vm, op, k)
            finally:
                vm.stop(hard=True)
        h, r = statistics.median(harness_t), statistics.median(raw_t)
        # Under a CPU quota a short hop is throttled or not (two groups of times, the median in
        # whichever holds more): the means' ratio says what each side costs on average.
        mean_ratio = statistics.fmean(harness_t) / statistics.fmean(raw_t)
        out[op] = {"harness_s": [round(x, 4) for x in harness_t], "raw_s": [round(x, 4) for x in raw_t],
                   "harness_median_s": h, "raw_median_s": r, "ratio": h / r, "mean_ratio": mean_ratio,
                   "target": 1.05}  # fmt: skip
        print(f"  {op}: harness {h:.3f} s vs raw {r:.3f} s = {h / r:.2f}x (means {mean_ratio:.2f}x)",
              file=sys.stderr, flush=True)  # fmt: skip
    results["overhead"] = out


#: guest-visible pause targets (median, under the halved CPU share)
PAUSE_TARGET_MS = {"cpr-reboot": 100.0, "cpr-transfer": 20.0, "cpr-exec": 20.0}


def bench_pause(b: Bench, results: dict[str, Any]) -> None:
    out: dict[str, Any] = {}
    for op in ("live", "cpr-reboot", "cpr-transfer", "cpr-exec"):
        vm = b.fast(VmSpec(name=f"bp{op.replace('-', '')}", **migration.spec_fields_for(op), **OP_SPECS.get(op, {})))
        migration.operation(op)(vm)  # uncounted: a freshly restored guest's first hop is slower
        cycles = 3 if b.quick else 8
        rs = migration.back_to_back(vm, op, cycles)
        raw_pauses: list[float] = []
        if op != "live":  # the same hops from the minimal script: the floor QEMU itself sets
            raw_chain(vm, op, cycles, pauses=raw_pauses)
        vm.stop(hard=True)
        ok = [r for r in rs if r.ok]
        out[op] = {
            "cycles": len(rs), "ok": len(ok),
            "pause_ms": [round((r.pause_s or 0) * 1000, 1) for r in ok],
            "pause_median_ms": round(statistics.median([(r.pause_s or 0) * 1000 for r in ok]), 1) if ok else None,
            "target_ms": PAUSE_TARGET_MS.get(op),
            "raw_pause_ms": [round(p * 1000, 1) for p in raw_pauses],
            "raw_pause_median_ms": round(statistics.median(raw_pauses) * 1000, 1) if raw_pauses else None,
            "downtime_ms": [r.downtime_ms for r in ok],
            "wall_s": [round(r.wall_s, 3) for r in ok],
            "pause_over_downtime": (statistics.median([(r.pause_s or 0) * 1000 for r in ok])
                                    / max(1e-3, statistics.median([r.downtime_ms or 0 for r in ok]))) if ok else None,
        }  # fmt: skip
    results["pause_vs_downtime"] = out


def bench_xdist(results: dict[str, Any]) -> None:
    tests = ["tests/integration/test_boot.py::test_uefi_split_pflash_boot_and_ssh"]
    times = {}
    for n in (1, 2):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(n), *tests],
                       cwd=REPO, check=False, stdout=subprocess.DEVNULL)  # fmt: skip
        times[n] = time.monotonic() - t0
    results["xdist"] = {"n1_s": times[1], "n2_s": times[2], "speedup": times[1] / times[2], "target": 1.6}


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--xdist", action="store_true", help="also time pytest -n 2 vs -n 1 (slow)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", choices=("fast_start", "overhead", "pause"), action="append",
                    help="run only this part (repeatable); the summary names what was not run")
    args = ap.parse_args()
    # the raw scripts connect as soon as a QMP socket exists and retry a refused greeting
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    b = Bench(args.quick)
    results: dict[str, Any] = {"machine": machine_info(), "started": time.time(),
                               "cpu_share": cpu_share.current_share()}  # fmt: skip
    speed_log = b.base / "speed.jsonl"
    os.environ[speed.ENV_VAR] = str(speed_log)
    try:
        for name, fn in (("fast_start", bench_fast_start), ("overhead", bench_overhead), ("pause", bench_pause)):
            if args.only and name not in args.only:
                continue
            t0 = time.monotonic()
            fn(b, results)
            print(f"{name}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        index = speed.read_index(speed_log)
        results["speed_index"] = {"median_cold_boot_s": index.median_s, "boots": index.boots} if index else None
    except BaseException:
        print(f"bench failed; its guests' logs are kept in {b.base}", file=sys.stderr)
        raise
    finally:
        kill_raw()  # a raw QEMU left by a failure (an exception between its start and its quit)
    shutil.rmtree(b.base, ignore_errors=True)
    if args.xdist:
        bench_xdist(results)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    for line in summary(results):
        print(line)
    print(f"written to {path}")
    return 0


def summary(results: dict[str, Any]) -> list[str]:
    """The figures, each with its ratio or target, the CPU share and the speed index."""
    idx = results.get("speed_index") or {}
    lines = [f"CPU share {results['cpu_share']:.2f} of {results['machine']['cpus']} CPUs; speed index: median "
             f"cold boot to SSH {idx.get('median_cold_boot_s', float('nan')):.1f} s ({idx.get('boots', 0)} boots)"]
    for part in ("fast_start", "overhead", "pause_vs_downtime"):
        if part not in results:
            lines.append(f"{part}: not run (--only)")
    fs = results.get("fast_start")
    if fs:
        lines.append(f"restore-to-ready vs cold boot: {fs['restore_median_s']:.2f} s vs {fs['cold_median_s']:.2f} s "
                     f"= {fs['speedup']:.1f}x faster (target >= {fs['target']:.0f}x)")
        lines.append(f"  the minimal script's restore (QEMU start, load, first SSH handshake; the floor): "
                     f"{fs['raw_restore_median_s']:.2f} s = {fs['raw_speedup']:.1f}x a cold boot; "
                     f"harness/script {fs['vs_raw']:.2f}x")
    for op, d in results.get("overhead", {}).items():
        lines.append(f"{op}: harness {d['harness_median_s']:.3f} s vs raw QMP script {d['raw_median_s']:.3f} s "
                     f"= {d['ratio']:.2f}x (target <= {d['target']:.2f}x)"
                     + (f"; means {d['mean_ratio']:.2f}x" if "mean_ratio" in d else ""))
    for op, d in results.get("pause_vs_downtime", {}).items():
        target = f" (target <= {d['target_ms']:.0f} ms)" if d.get("target_ms") else ""
        floor = f"; raw QMP script's median {d['raw_pause_median_ms']} ms" if d.get("raw_pause_median_ms") else ""
        lines.append(f"{op} pause: median {d['pause_median_ms']} ms{target}{floor}; all {d['pause_ms']} ms, "
                     f"QEMU downtime {d['downtime_ms']} ms")
    if "xdist" in results:
        lines.append(f"pytest -n 2 vs -n 1: {results['xdist']['speedup']:.2f}x (target >= 1.6x)")
    lines.append(f"peak memory: {results.get('peak_memory_kib', {})}")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
