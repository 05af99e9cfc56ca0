"""Benchmarks: ratios measured within one run (``make bench``), written to bench/out/.

Every figure is a ratio against a baseline measured in the same run on the same machine,
so a slow or busy machine shifts both sides:

- fast start: restore-to-ready vs cold UEFI boot-to-ready;
- harness overhead: the harness's live migration and cpr-reboot cycle vs the same QMP
  sequence driven by a minimal script (plain subprocess + qemu.qmp) with the same QEMU
  command line;
- guest-visible pause per CPR mode vs QEMU's reported downtime;
- ``pytest -n 2`` vs ``-n 1`` on a fixed set of booting tests (``--xdist``);
- peak memory (VmHWM) per guest kind.

Usage: ``python -m bench [--quick] [--xdist] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import migration, snapshots
from harness.machine import Machine
from harness.spec import VmSpec, qemu_args

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


def bench_fast_start(b: Bench, results: dict[str, Any]) -> None:
    spec = VmSpec(name="bfast")
    colds, restores, hwm = [], [], []
    for _ in range(1 if b.quick else 3):
        vm = b.machine(spec)
        dt, _ = timed(vm.start)
        colds.append(dt)
        hwm.append(vm_hwm_kib(vm.process.pid))
        vm.stop()
    b.fast(spec).stop()  # make sure the snapshot exists before timing restores
    for _ in range(3 if b.quick else 5):
        vm = b.machine(spec)
        dt, _ = timed(lambda vm=vm: snapshots.start_fast(vm, make_template=lambda: b.machine(spec)))
        restores.append(dt)
        vm.stop()
    cold, rest = statistics.median(colds), statistics.median(restores)
    results["fast_start"] = {"cold_boot_s": colds, "restore_s": restores, "cold_median_s": cold,
                             "restore_median_s": rest, "speedup": cold / rest, "target": 10.0}  # fmt: skip
    results.setdefault("peak_memory_kib", {})["minimal-uefi-1G"] = max(h for h in hwm if h)


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
    proc = subprocess.Popen(cmd, env=vm.build.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def _raw_qemu(vm: Machine, tag: str, machine: str) -> tuple[subprocess.Popen[bytes], Any]:
    """A QEMU with the guest's command line and ``-incoming defer``, and its QMP."""
    r = vm._resolve(900 + int(time.monotonic_ns()) % 100, vm.new_varstore(f"raw-{time.monotonic_ns()}.fd"),
                    ["defer"], machine, vm.build)  # fmt: skip
    qsock = vm.workdir / f"rawq-{tag}-{time.monotonic_ns() % 10**6}.sock"
    cmd = [str(vm.build.binary), *vm.build.data_args(), "-display", "none", "-vga", "none",
           "-qmp", f"unix:{qsock},server=on,wait=off", *qemu_args(vm.spec, r)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=vm.build.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc, raw_qmp(qsock)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _wait_status(cmd: Callable[..., Any], wanted: tuple[str, ...], what: str) -> str:
    deadline = time.monotonic() + 120
    while True:
        status = cmd()
        if status in wanted:
            return str(status)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: still {status} after 120 s")
        time.sleep(RAW_POLL_S)


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


def raw_cpr_reboot_chain(vm: Machine, cycles: int) -> list[float]:
    """The same cpr-reboot cycles as migration.cpr_reboot(), driven by a minimal script.

    The first source is the harness's QEMU (released, as the harness does); every later
    source is the previous raw destination.  Each cycle: x-ignore-shared and mode
    cpr-reboot on the source, migrate to a file, the source quits, a new QEMU loads the
    file and runs.  The guest is left in the last raw QEMU, which is killed at the end."""
    times: list[float] = []
    machine = migration.machine_type(vm)
    path = vm.workdir / "raw-cpr.state"
    caps = [{"capability": "x-ignore-shared", "state": True}]

    def src_cmd(cmd: str, **args: Any) -> Any:
        return vm.process.qmp(cmd, **args)

    src_proc: subprocess.Popen[bytes] | None = None
    src_q: Any = None
    try:
        for i in range(cycles):
            t0 = time.monotonic()
            src_cmd("migrate-set-capabilities", capabilities=caps)
            src_cmd("migrate-set-parameters", mode="cpr-reboot")
            src_cmd("migrate", uri=f"file:{path}")
            _wait_status(lambda: src_cmd("query-migrate").get("status"), ("completed",), "raw cpr-reboot save")
            if src_proc is None:
                vm.release(vm.current)
            else:
                _quit_raw(src_proc, src_q)
            proc, q = _raw_qemu(vm, f"c{i}", machine)
            q.cmd("migrate-set-capabilities", capabilities=caps)
            q.cmd("migrate-set-parameters", mode="cpr-reboot")
            q.cmd("migrate-incoming", uri=f"file:{path}")

            def dest_status(q: Any = q) -> str:
                st = q.cmd("query-status").get("status")
                if st in ("paused", "postmigrate") and q.cmd("query-migrate").get("status") == "completed":
                    q.cmd("cont")
                return str(st)

            _wait_status(dest_status, ("running",), "raw cpr-reboot load")
            times.append(time.monotonic() - t0)
            src_proc, src_q = proc, q

            def src_cmd(cmd: str, q: Any = q, **args: Any) -> Any:  # the next cycle's source
                return q.cmd(cmd, **args)
    finally:
        if src_proc is not None:
            src_proc.kill()
            src_proc.wait()
            with contextlib.suppress(Exception):  # its QEMU is gone
                src_q.close()
    return times


def bench_overhead(b: Bench, results: dict[str, Any]) -> None:
    n = 3 if b.quick else 5
    vm = b.fast(VmSpec(name="bover"))
    harness_t, raw_t = [], []
    for _ in range(n):
        raw_t.append(raw_live(vm))
        res = migration.live(vm)
        harness_t.append(res.wall_s)
    vm.stop()
    h, r = statistics.median(harness_t), statistics.median(raw_t)
    results["overhead_live"] = {"harness_s": harness_t, "raw_s": raw_t, "ratio": h / r, "target": 1.15}
    vm = b.fast(VmSpec(name="bcpr", **migration.spec_fields_for("cpr-reboot")))
    harness_t = [migration.cpr_reboot(vm).wall_s for _ in range(n)]
    raw_t = raw_cpr_reboot_chain(vm, n)
    vm.stop()
    h, r = statistics.median(harness_t), statistics.median(raw_t)
    results["overhead_cpr_reboot"] = {"harness_s": harness_t, "raw_s": raw_t, "ratio": h / r, "target": 1.15}


def bench_pause(b: Bench, results: dict[str, Any]) -> None:
    out: dict[str, Any] = {}
    for op in ("live", "cpr-reboot", "cpr-transfer"):
        vm = b.fast(VmSpec(name=f"bp{op.replace('-', '')}", **migration.spec_fields_for(op)))
        rs = migration.back_to_back(vm, op, 3 if b.quick else 5)
        vm.stop()
        ok = [r for r in rs if r.ok]
        out[op] = {
            "cycles": len(rs), "ok": len(ok),
            "pause_ms": [round((r.pause_s or 0) * 1000, 1) for r in ok],
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
    args = ap.parse_args()
    b = Bench(args.quick)
    results: dict[str, Any] = {"machine": machine_info(), "started": time.time()}
    try:
        for name, fn in (("fast_start", bench_fast_start), ("overhead", bench_overhead), ("pause", bench_pause)):
            t0 = time.monotonic()
            fn(b, results)
            print(f"{name}: done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    except BaseException:
        print(f"bench failed; its guests' logs are kept in {b.base}", file=sys.stderr)
        raise
    shutil.rmtree(b.base, ignore_errors=True)
    if args.xdist:
        bench_xdist(results)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    fs, ov = results["fast_start"], results["overhead_live"]
    print(f"restore-to-ready vs cold boot: {fs['restore_median_s']:.2f} s vs {fs['cold_median_s']:.2f} s "
          f"= {fs['speedup']:.1f}x faster (target >= 10x)")
    print(f"harness live migration vs raw QMP script: {ov['ratio']:.2f}x (target <= 1.15x)")
    oc = results["overhead_cpr_reboot"]
    print(f"harness cpr-reboot cycle vs raw QMP script: {oc['ratio']:.2f}x (target <= 1.15x)")
    for op, d in results["pause_vs_downtime"].items():
        print(f"{op}: pause {d['pause_ms']} ms, QEMU downtime {d['downtime_ms']} ms")
    if "xdist" in results:
        print(f"pytest -n 2 vs -n 1: {results['xdist']['speedup']:.2f}x (target >= 1.6x)")
    print(f"peak memory: {results['peak_memory_kib']}")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
