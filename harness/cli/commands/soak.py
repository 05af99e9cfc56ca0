"""``harness soak``: CPR live updates back to back and repeated integration-suite runs,
counting failures, leaked QEMU processes and leftover work files, and the longest guest
pause.

Each piece runs as a child process (``harness repro OP --cycles N --out F``, then
``pytest tests/integration``) with its own ``HARNESS_RUNDIR`` and a ``HARNESS_SOAK_PIECE``
token in its environment, so whatever it leaves behind is found once the child has
exited: any process still carrying the token (every descendant inherits it, whatever
session or parent it ended up with: a QEMU, a pytest worker, a helper), any QEMU whose
command line names the directory, and any file left in it, is a leak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from harness.cli import command, emit_json, register_parser, sigterm_interrupts

DEFAULT_OPS = ("cpr-reboot", "cpr-transfer")
# the CLI in a child (``-m harness.cli`` would import the command registry twice)
HARNESS_CLI = (sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())")


@register_parser
def _parser(sub: Any) -> None:
    p = sub.add_parser("soak", help="CPR cycles back to back and repeated integration runs; "
                       "counts failures and leaked processes")  # fmt: skip
    p.add_argument("--cycles", type=int, default=50, help="cycles per operation (default 50; 0 skips the CPR pieces)")
    p.add_argument("--op", action="append", default=[], metavar="OP",
                   help=f"operation to cycle (repeatable; default {' and '.join(DEFAULT_OPS)})")
    p.add_argument("--suite-runs", type=int, default=10,
                   help="repeated runs of the integration suite (default 10; 0 skips them)")
    p.add_argument("--suite", default="tests/integration", help="pytest path for the suite runs")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "2")),
                   help="xdist workers for the suite runs")
    p.add_argument("--qemu", default=None, metavar="VERSION", help="QEMU build for the CPR cycles")
    p.add_argument("--fast", action="store_true",
                   help="restore the CPR pieces' guests from a saved boot instead of booting them cold")
    p.add_argument("--out", type=Path, default=Path("results/soak"),
                   help="where the per-piece JSON, junit files and logs go")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--timeout", type=float, default=4 * 3600,
                   help="limit for each piece in seconds (default 4 h)")


def _rundir(out: Path, tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"hvsoak-{os.getpid()}-{tag}-",
                                 dir=os.environ.get("HARNESS_RUNDIR")))  # fmt: skip


SHM = Path("/dev/shm")


def _shm_orphans() -> set[Path]:
    """Guest-RAM directories in /dev/shm whose owner is gone (``hv-ram-<pid>-*``)."""
    from harness.machine import orphan_dirs

    return set(orphan_dirs(SHM, "hv-ram"))


PIECE_ENV = "HARNESS_SOAK_PIECE"


def _leaks(rundir: Path, shm_before: set[Path]) -> dict[str, Any]:
    """Processes and files the piece run in ``rundir`` left behind (processes are killed):
    those carrying its environment token, and QEMUs that name the directory; files in the
    directory, and guest-RAM directories in /dev/shm orphaned since ``shm_before``."""
    from harness import faults

    found = set(faults.find_qemu(rundir)) | set(faults.processes_with_env(PIECE_ENV, rundir.name))
    pids = faults.wait_gone(sorted(found), timeout=5)
    commands = faults.describe_pids(pids)
    faults.kill_pids(pids)
    files = sorted(str(p.relative_to(rundir)) for p in rundir.rglob("*")) if rundir.exists() else []
    files += sorted(str(d) for d in _shm_orphans() - shm_before)
    return {"processes": pids, "commands": commands, "files": files[:50], "file_count": len(files)}


def _run(cmd: list[str], rundir: Path, log: Path, timeout: float) -> tuple[int, float]:
    """Run one piece; a timeout, Ctrl-C or SIGTERM takes its whole process group down."""
    from harness.nightly.runner import owned_process

    env = {**os.environ, "HARNESS_RUNDIR": str(rundir), PIECE_ENV: rundir.name}
    t0 = time.monotonic()
    with log.open("w") as fh, owned_process(cmd, env, None, stdout=fh) as proc:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = -9  # owned_process interrupts, then kills, the group on the way out
    return rc, time.monotonic() - t0


def _cpr_piece(op: str, args: argparse.Namespace) -> dict[str, Any]:
    rundir = _rundir(args.out, op)
    out_json = args.out / f"{op}.json"
    out_json.unlink(missing_ok=True)
    cmd = [*HARNESS_CLI, "repro", op, "--cycles", str(args.cycles),
           "--out", str(out_json), "--artifacts", str(args.out / f"{op}-artifacts")]  # fmt: skip
    if args.qemu:
        cmd += ["--qemu", args.qemu]
    if args.fast:
        cmd += ["--set", "fast=1"]
    shm_before = _shm_orphans()
    rc, wall = _run(cmd, rundir, args.out / f"{op}.log", args.timeout)
    leaks = _leaks(rundir, shm_before)
    records: list[dict[str, Any]] = []
    if out_json.is_file():
        records = json.loads(out_json.read_text()).get("records", [])
    cycles = [r for r in records if r.get("cycle") is not None]
    pauses = [float(r["pause_s"]) for r in cycles if r.get("pause_s") is not None]
    walls = [float(r["wall_s"]) for r in cycles if r.get("wall_s") is not None]
    failed = [r for r in records if not r.get("ok")]
    shutil.rmtree(rundir, ignore_errors=True)
    return {
        "piece": op, "exit_code": rc, "wall_s": round(wall, 1),
        "cycles_asked": args.cycles, "cycles_done": len(cycles),
        "failures": len(failed) + (args.cycles - len(cycles) if not failed and rc != 0 else 0),
        "first_failure": (failed[0].get("error") or "; ".join(failed[0].get("problems") or []))[:500]
        if failed else None,
        "longest_pause_s": max(pauses) if pauses else None,
        "median_pause_s": sorted(pauses)[len(pauses) // 2] if pauses else None,
        "longest_cycle_s": max(walls) if walls else None,
        "leaked_processes": len(leaks["processes"]), "leaked_files": leaks["file_count"],
        "leaks": leaks,
    }  # fmt: skip


def _junit_counts(path: Path) -> dict[str, int]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, "0"))
    return counts


def _suite_piece(i: int, args: argparse.Namespace) -> dict[str, Any]:
    rundir = _rundir(args.out, f"suite{i}")
    junit = args.out / f"suite-{i}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", str(args.jobs), "--dist", "worksteal", args.suite,
           "-p", "no:cacheprovider", f"--junitxml={junit}",
           f"--harness-artifacts={args.out / f'suite-{i}-artifacts'}"]  # fmt: skip
    shm_before = _shm_orphans()
    rc, wall = _run(cmd, rundir, args.out / f"suite-{i}.log", args.timeout)
    counts = _junit_counts(junit)
    leaks = _leaks(rundir, shm_before)
    shutil.rmtree(rundir, ignore_errors=True)
    return {
        "piece": f"suite-{i}", "exit_code": rc, "wall_s": round(wall, 1), **counts,
        "leaked_processes": len(leaks["processes"]), "leaked_files": leaks["file_count"],
        "leaks": leaks,
    }  # fmt: skip


@command("soak")
def _soak(args: argparse.Namespace) -> int:
    from harness.errors import ConfigError

    if args.cycles < 0 or args.suite_runs < 0 or args.cycles + args.suite_runs == 0:
        raise ConfigError("--cycles and --suite-runs must not be negative, and one of them positive")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    pieces: list[dict[str, Any]] = []
    interrupted = None
    with sigterm_interrupts():
        try:
            for op in (args.op or DEFAULT_OPS) if args.cycles else ():
                piece = _cpr_piece(op, args)
                pieces.append(piece)
                print(f"soak {op}: {piece['cycles_done']}/{piece['cycles_asked']} cycles, "
                      f"{piece['failures']} failed, {piece['leaked_processes']} leaked processes, "
                      f"{piece['leaked_files']} leftover files, longest pause "
                      f"{piece['longest_pause_s']} s, {piece['wall_s']} s", file=sys.stderr, flush=True)  # fmt: skip
            for i in range(1, args.suite_runs + 1):
                piece = _suite_piece(i, args)
                pieces.append(piece)
                print(f"soak suite run {i}: {piece['tests']} tests, {piece['failures']} failures, "
                      f"{piece['errors']} errors, {piece['leaked_processes']} leaked processes, "
                      f"{piece['wall_s']} s", file=sys.stderr, flush=True)  # fmt: skip
        except KeyboardInterrupt:  # the running piece's process group was stopped
            interrupted = f"interrupted after {len(pieces)} piece(s); the running one is not counted"
            print(f"soak: {interrupted}", file=sys.stderr, flush=True)
    pauses = [p["longest_pause_s"] for p in pieces if p.get("longest_pause_s") is not None]
    summary = {
        "duration_s": round(time.monotonic() - t0, 1),
        "cycles": sum(p.get("cycles_done", 0) for p in pieces),
        "suite_runs": sum(1 for p in pieces if p["piece"].startswith("suite-")),
        "suite_runs_asked": args.suite_runs,
        "interrupted": interrupted,
        "failures": sum(p.get("failures", 0) + p.get("errors", 0) for p in pieces),
        "leaked_processes": sum(p["leaked_processes"] for p in pieces),
        "leaked_files": sum(p["leaked_files"] for p in pieces),
        "longest_pause_s": max(pauses) if pauses else None,
        "pieces": pieces,
    }
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        emit_json(summary)
    else:
        print(f"soak: {summary['cycles']} cycles, {summary['suite_runs']} suite runs, "
              f"{summary['failures']} failures, {summary['leaked_processes']} leaked processes, "
              f"{summary['leaked_files']} leftover files, longest pause "
              f"{summary['longest_pause_s']} s; {args.out / 'soak.json'}")  # fmt: skip
    if interrupted:
        return 130
    ok = summary["failures"] == 0 and summary["leaked_processes"] == 0 and (
        summary["leaked_files"] == 0) and all(p["exit_code"] == 0 for p in pieces)  # fmt: skip
    return 0 if ok else 1
