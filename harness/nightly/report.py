"""Results of a nightly run as files people and CI read: ``results.json``, ``junit.xml``
(merged for shards) and ``report.html``, plus the comparison with the previous run.

- :func:`build_results` joins the records the scenario tests wrote (``records/*.jsonl``)
  with pytest's ``junit.xml`` (authoritative for outcomes: a teardown error or a crashed
  worker shows there) and the matrix (an entry with neither is reported as never run).
- :func:`compare` lists new failures, fixed ones and timing regressions against the newest
  complete earlier run in the same ``results/`` directory (:func:`previous_run`).
- :func:`render_html` draws one self-contained page: a source x destination matrix of
  outcome chips, a QEMU x OVMF boot grid, a table per scenario, inline SVG plots of
  per-cycle pause and of downtime per pair, links to artifacts.  No script, no CDN.
- :func:`merge` joins shards' result directories into one.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import socket
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.nightly.results import (
    FAILING,
    SCHEMA,
    RunRecord,
    builds_from_id,
    count,
    first_line,
    junit_key,
    nodeid_from_junit,
)
from harness.terms import Outcome

RESULTS_JSON = "results.json"
JUNIT_XML = "junit.xml"
REPORT_HTML = "report.html"

# outcome colours: matrix chips use these saturated ones only (the browser test looks for them)
COLOURS = {"passed": "#1b9e3e", "failed": "#d7263d", "error": "#8e24aa", "xfailed": "#f0a202",
           "skipped": "#9e9e9e"}  # fmt: skip
TINTS = {"passed": "#e3f4e7", "failed": "#fbe0e3", "error": "#f1e1f5", "xfailed": "#fdf0d5",
         "skipped": "#eeeeee"}  # fmt: skip
SEVERITY = {"failed": 4, "error": 5, "xfailed": 2, "skipped": 1, "passed": 3}
PALETTE = ("#1f77b4", "#ff7f0e", "#637939", "#393b79", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip

# timing regressions: worse than both the ratio and the absolute step
DURATION_RATIO, DURATION_STEP_S = 1.5, 10.0
DOWNTIME_RATIO, DOWNTIME_STEP_MS = 2.0, 100.0
PAUSE_RATIO, PAUSE_STEP_S = 2.0, 0.25


# --- junit -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JunitCase:
    """One ``<testcase>`` of pytest's JUnit XML."""

    classname: str
    name: str
    time_s: float
    outcome: str
    message: str

    @property
    def key(self) -> str:
        return f"{self.classname}::{self.name}"


def parse_junit(path: Path) -> list[JunitCase]:
    """Every test case with its outcome (``xfailed`` for pytest's xfail skips)."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        return []
    except ET.ParseError as exc:
        raise ConfigError(f"{path}: not valid JUnit XML: {exc}") from exc
    cases = []
    for tc in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in tc:
            text = (child.get("message") or child.text or "").strip()
            if child.tag == "failure":
                outcome, message = "failed", text
            elif child.tag == "error" and outcome != "failed":
                outcome, message = "error", text
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                message = text
        cases.append(JunitCase(tc.get("classname", ""), tc.get("name", ""),
                               float(tc.get("time") or 0.0), outcome, message))  # fmt: skip
    return cases


def merge_junit(paths: Sequence[Path], dest: Path) -> None:
    """One ``<testsuites>`` with every shard's cases in one suite, counts recomputed."""
    suite = ET.Element("testsuite", name="pytest")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total = 0.0
    for p in paths:
        if not p.exists():
            continue
        for tc in ET.parse(p).getroot().iter("testcase"):
            suite.append(tc)
            counts["tests"] += 1
            total += float(tc.get("time") or 0.0)
            tags = {c.tag for c in tc}
            counts["failures"] += "failure" in tags
            counts["errors"] += "error" in tags
            counts["skipped"] += "skipped" in tags
    for k, v in counts.items():
        suite.set(k, str(v))
    suite.set("time", f"{total:.3f}")
    suite.set("hostname", socket.gethostname())
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(dest, encoding="utf-8", xml_declaration=True)


# --- joining ------------------------------------------------------------------------------------


def load_records(results_dir: Path) -> list[RunRecord]:
    """The records the workers appended (a torn last line of a killed worker is skipped)."""
    out = []
    for path in sorted((results_dir / "records").glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                out.append(RunRecord.from_json(json.loads(line)))
            except (json.JSONDecodeError, ConfigError):
                continue
    return out


def _load_matrix(results_dir: Path) -> dict[str, Any]:
    path = results_dir / "matrix.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _entry_for(nodeid: str, entries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for e in entries:
        for t in e.get("tests") or ():
            if nodeid == t or nodeid.startswith(t.rstrip("/") + "::") or nodeid.startswith(t.rstrip("/") + "/"):
                return e
    return None


def join(records: Sequence[RunRecord], cases: Sequence[JunitCase],
         matrix: Mapping[str, Any], results_dir: Path | None = None) -> list[RunRecord]:
    """Records and JUnit cases joined into one record per test item (JUnit's outcome wins),
    plus an ``error`` record for every selected entry that never ran."""
    by_key = {junit_key(r.id): r for r in records}
    entries = list(matrix.get("entries", []))
    out: list[RunRecord] = []
    seen: set[str] = set()
    for case in cases:
        rec = by_key.get(case.key)
        if rec is None:
            nodeid = nodeid_from_junit(case.classname, case.name)
            entry = _entry_for(nodeid, entries)
            qemu, ovmf = builds_from_id(nodeid)
            rec = RunRecord(id=nodeid, scenario=str(entry["scenario"]) if entry else "other",
                            outcome=Outcome(case.outcome), kind="pytest",
                            entry=str(entry["id"]) if entry else None, qemu=qemu, ovmf=ovmf,
                            firmware=ovmf[0] if ovmf else None, duration_s=case.time_s)  # fmt: skip
            art = _pytest_artifacts(nodeid, results_dir)
            if art:
                rec.artifacts = art
        elif rec.outcome != case.outcome:
            rec.notes.append(f"record said {rec.outcome}, pytest says {case.outcome}")
            rec.outcome = Outcome(case.outcome)
        if case.outcome != "passed" and case.message and not rec.message:
            rec.message = first_line(case.message, 500)
        if rec.failing and rec.error is None:
            rec.error = rec.message
        seen.add(case.key)
        out.append(rec)
    for rec in records:
        if junit_key(rec.id) not in seen:
            rec.notes.append("no JUnit test case (pytest did not finish?)")
            out.append(rec)
    ran_entries = {r.entry for r in out if r.entry}
    for eid in matrix.get("selected", []):
        if eid not in ran_entries:
            e: Mapping[str, Any] = next((x for x in entries if x.get("id") == eid), {})
            out.append(RunRecord(id=f"matrix::{eid}", scenario=str(e.get("scenario", eid)),
                                 outcome=Outcome.ERROR, kind=str(e.get("runner", "scenario")), entry=eid,
                                 qemu=list(e.get("qemu", [])), ovmf=list(e.get("ovmf", [])),
                                 error="never ran: no record and no JUnit test case"))  # fmt: skip
    return out


def _pytest_artifacts(nodeid: str, results_dir: Path | None) -> str | None:
    if results_dir is None:
        return None
    from harness.factory import safe_name

    path = results_dir / "artifacts" / safe_name(nodeid)
    return os.path.relpath(path, results_dir) if path.is_dir() else None


def build_results(results_dir: Path, run_info: Mapping[str, Any] | None = None,
                  previous: Path | None | bool = True) -> dict[str, Any]:
    """``results.json`` content for a finished run directory (``previous``: True = find
    the previous run, a path = use it, None/False = no comparison)."""
    matrix = _load_matrix(results_dir)
    cases = parse_junit(results_dir / JUNIT_XML)
    records = join(load_records(results_dir), cases, matrix, results_dir)
    records.sort(key=lambda r: (r.scenario, r.id))
    info = dict(run_info or {})
    started, finished = info.get("started"), info.get("finished")
    run = {
        "id": results_dir.name, "host": socket.gethostname(), "shard": matrix.get("shard"),
        "cycles": matrix.get("cycles"), "qemu": matrix.get("qemu", []),
        "ovmf": matrix.get("ovmf", []), "matrix": [e["id"] for e in matrix.get("entries", [])],
        "selected": matrix.get("selected", []), "not_applicable": matrix.get("not_applicable", []),
        "rotation": matrix.get("rotation"), **info,
    }  # fmt: skip
    if isinstance(started, int | float) and isinstance(finished, int | float):
        run["duration_s"] = round(finished - started, 1)
    results: dict[str, Any] = {"schema": SCHEMA, "run": run, "summary": count(records),
                               "records": [r.to_json() for r in records], "comparison": None}  # fmt: skip
    prev = previous_run(results_dir) if previous is True else (previous or None)
    if isinstance(prev, Path):
        try:
            results["comparison"] = compare(results, load_results(prev)) | {"previous": str(prev)}
        except ConfigError as exc:
            results["comparison"] = {"previous": str(prev), "error": str(exc)}
    return results


def load_results(path: Path) -> dict[str, Any]:
    """A run's ``results.json`` (``path`` is the file or its directory)."""
    file = path / RESULTS_JSON if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read results: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ConfigError(f"{file}: not a results.json of schema {SCHEMA}")
    return data


def write_all(results_dir: Path, results: Mapping[str, Any]) -> None:
    """Write ``results.json`` and ``report.html`` (atomically: a reader never sees half)."""
    for name, text in ((RESULTS_JSON, json.dumps(results, indent=2, default=str) + "\n"),
                       (REPORT_HTML, render_html(results))):  # fmt: skip
        tmp = results_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(results_dir / name)


# --- the previous run ----------------------------------------------------------------------------


def previous_run(results_dir: Path) -> Path | None:
    """The newest complete (not a shard) earlier run beside ``results_dir``; for a night
    of a rotation, the newest whole run or night of the same slot (the same entries)."""
    here = results_dir.resolve()
    try:
        slot = (_load_matrix(here).get("rotation") or {}).get("slot")
    except ConfigError:
        slot = None
    best: Path | None = None
    for d in sorted(here.parent.iterdir()) if here.parent.is_dir() else []:
        if d == here or not d.is_dir() or d.name >= here.name or not (d / RESULTS_JSON).is_file():
            continue
        try:
            data = load_results(d)
        except ConfigError:
            continue
        if data.get("run", {}).get("shard"):
            continue
        rot = data.get("run", {}).get("rotation")
        if rot and rot.get("slot") != slot:
            continue
        best = d
    return best


def _ratio_worse(before: float | None, after: float | None, ratio: float, step: float) -> bool:
    if before is None or after is None:
        return False
    return after > before * ratio and after - before > step


def compare(current: Mapping[str, Any], previous: Mapping[str, Any]) -> dict[str, Any]:
    """New failures, fixed ones, still failing, new and vanished runs, timing regressions."""
    now = {r["id"]: r for r in current.get("records", [])}
    before = {r["id"]: r for r in previous.get("records", [])}
    out: dict[str, Any] = {"previous_id": previous.get("run", {}).get("id"), "new_failures": [],
                           "fixed": [], "still_failing": [], "new": [], "missing": [],
                           "regressions": []}  # fmt: skip
    for rid, r in sorted(now.items()):
        p = before.get(rid)
        failing = r["outcome"] in FAILING
        if p is None:
            out["new"].append(rid)
            if failing:
                out["new_failures"].append(rid)
            continue
        was_failing = p["outcome"] in FAILING
        if failing and not was_failing:
            out["new_failures"].append(rid)
        elif was_failing and not failing and r["outcome"] != "skipped":
            out["fixed"].append(rid)
        elif failing and was_failing:
            out["still_failing"].append(rid)
        if failing or p["outcome"] in FAILING:
            continue
        for metric, ratio, step in (("duration_s", DURATION_RATIO, DURATION_STEP_S),
                                    ("downtime_ms", DOWNTIME_RATIO, DOWNTIME_STEP_MS),
                                    ("pause_s", PAUSE_RATIO, PAUSE_STEP_S)):  # fmt: skip
            a, b = p.get(metric), r.get(metric)
            if _ratio_worse(a, b, ratio, step):
                out["regressions"].append({"id": rid, "metric": metric, "before": a, "after": b})
    out["missing"] = sorted(set(before) - set(now))
    return out


# --- merging shards ------------------------------------------------------------------------------


def _validated_shard(d: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """One shard's results and matrix, checked through before anything is copied: every
    problem names the file and the field."""
    run = load_results(d)
    file = d / RESULTS_JSON if d.is_dir() else d
    if not isinstance(run.get("run"), dict):
        raise ConfigError(f"{file}: field 'run' is missing or not an object")
    records = run.get("records")
    if not isinstance(records, list):
        raise ConfigError(f"{file}: field 'records' is missing or not a list")
    root = d.resolve()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            raise ConfigError(f"{file}: records[{i}] has no string 'id'")
        try:
            RunRecord.from_json(rec)
        except (ConfigError, TypeError, ValueError) as exc:
            raise ConfigError(f"{file}: records[{i}] ({rec['id']}): {exc}") from None
        art = rec.get("artifacts")
        if art is not None:
            if not isinstance(art, str) or Path(art).is_absolute():
                raise ConfigError(f"{file}: records[{i}] ({rec['id']}): field 'artifacts' "
                                  f"{art!r} is not a path inside {d}")  # fmt: skip
            src = (root / art).resolve()
            if src == root or not src.is_relative_to(root):
                raise ConfigError(f"{file}: records[{i}] ({rec['id']}): field 'artifacts' "
                                  f"{art!r} leads outside {d}")  # fmt: skip
    junit = d / JUNIT_XML
    if junit.exists():
        try:
            ET.parse(junit)
        except (ET.ParseError, OSError) as exc:
            raise ConfigError(f"{junit}: not a readable JUnit XML file: {exc}") from None
    matrix = _load_matrix(d)
    if not isinstance(matrix, dict) or not isinstance(matrix.get("entries", []), list):
        raise ConfigError(f"{d / 'matrix.json'}: field 'entries' is not a list")
    return run, matrix


def merge(dirs: Sequence[Path], dest: Path) -> dict[str, Any]:
    """Join shards' result directories into ``dest`` (records, junit, matrix, artifacts) and
    write its ``results.json``/``report.html``.  Overlapping shards are refused; missing
    ones are named in the merged run's notes.

    Every input is validated before anything is copied, and the merged directory is built
    beside ``dest`` and renamed into place: ``dest`` is either absent (or left as the empty
    directory it was) or complete."""
    if not dirs:
        raise ConfigError("report merge: no result directories given")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"report merge --out {dest}: exists and is not an empty directory")
    checked = [_validated_shard(d) for d in dirs]
    runs = [r for r, _ in checked]
    matrices = [m for _, m in checked]
    shards = [r["run"].get("shard") for r in runs]
    seen: dict[str, Path] = {}
    for d, s in zip(dirs, shards, strict=True):
        if s is not None and s in seen:
            raise ConfigError(f"report merge: {d} and {seen[s]} are both shard {s}")
        if s is not None:
            seen[s] = d
    ids: dict[str, Path] = {}
    for d, r in zip(dirs, runs, strict=True):
        for rec in r["records"]:
            if rec["id"] in ids:
                raise ConfigError(f"report merge: {rec['id']} is in both {ids[rec['id']]} and {d} "
                                  "(overlapping shards?)")  # fmt: skip
            ids[rec["id"]] = d
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        results = _merge_into(dirs, runs, matrices, shards, work, dest)
        if dest.exists():
            dest.rmdir()  # the empty directory checked above
        work.rename(dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return results


def _merge_into(dirs: Sequence[Path], runs: Sequence[dict[str, Any]],
                matrices: Sequence[dict[str, Any]], shards: Sequence[Any], work: Path,
                dest: Path) -> dict[str, Any]:
    records: dict[str, dict[str, Any]] = {}
    for d, r in zip(dirs, runs, strict=True):
        for rec in r["records"]:
            art = rec.get("artifacts")
            if art:
                src = (d.resolve() / art).resolve()
                if src.is_dir():
                    target = work / "artifacts" / src.name
                    shutil.copytree(src, target, dirs_exist_ok=True, symlinks=True)
                    rec = {**rec, "artifacts": os.path.relpath(target, work)}
            records[rec["id"]] = rec
    all_ids: list[str] = []
    for m in matrices:
        for e in m.get("entries", []):
            if e["id"] not in all_ids:
                all_ids.append(e["id"])
    selected = {eid for m in matrices for eid in m.get("selected", [])}
    notes = [f"not run by any shard: {eid}" for eid in all_ids if eid not in selected]
    counts = {s.split("/")[1] for s in shards if s}
    if len(counts) > 1:
        notes.append(f"shards of different splits merged: {', '.join(sorted(s for s in shards if s))}")
    merge_junit([d / JUNIT_XML for d in dirs], work / JUNIT_XML)
    recs = [RunRecord.from_json(r) for r in records.values()]
    recs.sort(key=lambda r: (r.scenario, r.id))
    starts = [r["run"].get("started") for r in runs if isinstance(r["run"].get("started"), int | float)]
    ends = [r["run"].get("finished") for r in runs if isinstance(r["run"].get("finished"), int | float)]
    first = runs[0]["run"]
    run = {"id": dest.name, "host": socket.gethostname(), "shard": None,
           "cycles": first.get("cycles"), "qemu": first.get("qemu", []), "ovmf": first.get("ovmf", []),
           "matrix": all_ids, "selected": sorted(selected),
           "not_applicable": first.get("not_applicable", []) + notes,
           "merged_from": [f"{d} (shard {s})" if s else str(d) for d, s in zip(dirs, shards, strict=True)],
           "started": min(starts) if starts else None, "finished": max(ends) if ends else None,
           "duration_s": round(max(ends) - min(starts), 1) if starts and ends else None,
           "shard_durations_s": [r["run"].get("duration_s") for r in runs]}  # fmt: skip
    results: dict[str, Any] = {"schema": SCHEMA, "run": run, "summary": count(recs),
                               "records": [r.to_json() for r in recs], "comparison": None}  # fmt: skip
    prev = previous_run(dest)
    if prev is not None:
        results["comparison"] = compare(results, load_results(prev)) | {"previous": str(prev)}
    write_all(work, results)
    return results


# --- text ---------------------------------------------------------------------------------------


def progress_line(rec: Mapping[str, Any]) -> str:
    """One line per finished scenario run for the live display."""
    tag = {"passed": "ok", "failed": "FAIL", "error": "ERROR", "xfailed": "XFAIL",
           "skipped": "skip"}.get(str(rec.get("outcome")), str(rec.get("outcome")))  # fmt: skip
    parts = [f"  {tag:<5}", str(rec.get("scenario", "")), str(rec.get("entry") or rec.get("id"))]
    steps = rec.get("steps") or []
    parts.append(f"{float(rec.get('duration_s') or 0):.0f} s")
    if steps:
        parts.append(f"{len(steps)} step{'s' if len(steps) != 1 else ''}")
    if rec.get("downtime_ms") is not None:
        parts.append(f"downtime<= {float(rec['downtime_ms']):.0f} ms")
    if rec.get("pause_s") is not None:
        parts.append(f"pause<= {float(rec['pause_s']) * 1000:.0f} ms")
    if rec.get("outcome") in FAILING:
        if rec.get("signature"):
            parts.append(f"[{rec['signature']}]")
        if rec.get("error") or rec.get("message"):
            parts.append(str(rec.get("error") or rec.get("message"))[:160])
    return "  ".join(parts)


def rotation_text(rot: Mapping[str, Any] | None) -> str:
    """One line for the report and the console: which share of the matrix ran."""
    if not rot:
        return ""
    later = ", ".join(f"{n} on {d}" for d, n in (rot.get("next_nights") or {}).items())
    return (f"rotation {rot.get('slot')} for the night of {rot.get('night')}: "
            f"{len(rot.get('core') or [])} core entries (every night) + {rot.get('share')} of the "
            f"other {rot.get('rest')} (the others: {later}); --rotation 1 runs the whole matrix")


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """The stdout summary: counts, failures, comparison."""
    s = results.get("summary", {})
    run = results.get("run", {})
    lines = [f"nightly {run.get('id')}: {s.get('total', 0)} runs: " + ", ".join(
        f"{s.get(k, 0)} {k}" for k in ("passed", "failed", "error", "xfailed", "skipped"))
        + (f" in {run['duration_s']:.0f} s" if isinstance(run.get("duration_s"), int | float) else "")]  # fmt: skip
    if run.get("rotation"):
        lines.append(f"  {rotation_text(run['rotation'])}")
    for r in results.get("records", []):
        if r["outcome"] in FAILING:
            sig = f" [{r['signature']}]" if r.get("signature") else ""
            why = r.get("error") or r.get("message") or ""
            art = f" (artifacts: {r['artifacts']})" if r.get("artifacts") else ""
            lines.append(f"  {r['outcome'].upper()} {r['id']}{sig}: {str(why)[:200]}{art}")
    c = results.get("comparison")
    if c and "error" not in c:
        lines.append(f"compared with {c.get('previous_id')}: {len(c['new_failures'])} new failures, "
                     f"{len(c['fixed'])} fixed, {len(c['regressions'])} timing regressions")  # fmt: skip
        for rid in c["new_failures"]:
            lines.append(f"  new failure: {rid}")
        for rid in c["fixed"]:
            lines.append(f"  fixed: {rid}")
        for reg in c["regressions"]:
            lines.append(f"  slower: {reg['id']} {reg['metric']} {reg['before']} -> {reg['after']}")
    return lines


# --- HTML -----------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _worst(outcomes: Iterable[str]) -> str:
    return max(outcomes, key=lambda o: SEVERITY.get(o, 0), default="skipped")


def step_outcome(step: Mapping[str, Any], run_outcome: str) -> str:
    """A step's own outcome (a run is failed as a whole; its steps tell which hop)."""
    if step.get("expected_failure"):
        return "xfailed"
    if step.get("ok"):
        return "passed"
    if run_outcome == "skipped":
        return "skipped"
    return "error" if step.get("status") == "error" else "failed"


def pair_cells(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, list[str]]]:
    """(source, destination) -> op -> outcomes of every migration step of every run."""
    cells: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for s in r.get("steps") or []:
            src, dst, op = s.get("source"), s.get("destination"), s.get("op")
            if not src or not dst or not op or op == "boot":
                continue
            cells[(str(src), str(dst))][str(op)].append(step_outcome(s, r["outcome"]))
    return cells


def _build_order(labels: Iterable[str]) -> list[str]:
    def key(label: str) -> tuple[tuple[int, ...], str]:
        nums = tuple(int(p) for p in label.replace("-", ".").split(".") if p.isdigit())
        return nums, label

    return sorted(set(labels), key=key)


def _matrix_html(records: Sequence[Mapping[str, Any]]) -> str:
    cells = pair_cells(records)
    if not cells:
        return "<p>No migration steps in this run.</p>"
    builds = _build_order([b for k in cells for b in k])
    rows = ["<table class='matrix' id='pair-matrix'><tr><th>source \\ destination</th>"
            + "".join(f"<th>{_e(b)}</th>" for b in builds) + "</tr>"]  # fmt: skip
    for src in builds:
        tds = []
        for dst in builds:
            ops = cells.get((src, dst))
            if not ops:
                tds.append("<td class='empty'></td>")
                continue
            chips = []
            for op, outs in sorted(ops.items()):
                o = _worst(outs)
                bad = sum(1 for x in outs if x in FAILING)
                label = f"{op} {len(outs) - bad}/{len(outs)}"
                chips.append(f"<div class='chip' style='background:{COLOURS[o]}' "
                             f"title='{_e(src)} -> {_e(dst)} {_e(op)}: {_e(', '.join(outs))}'>{_e(label)}</div>")  # fmt: skip
            tds.append(f"<td>{''.join(chips)}</td>")
        rows.append(f"<tr><th>{_e(src)}</th>{''.join(tds)}</tr>")
    rows.append("</table>")
    return "".join(rows)


def _elsewhere_html(records: Sequence[Mapping[str, Any]]) -> str:
    """Runs that are not failing/xfailed in a grid cell (no source -> destination step, not a
    boot): a chip each, so no failure hides below the fold."""
    chips = []
    for r in records:
        if r["outcome"] not in ("failed", "error", "xfailed") or r.get("kind") == "boot":
            continue
        if any(s.get("source") and s.get("destination") and s.get("op") != "boot" for s in r.get("steps") or []):
            continue
        o = r["outcome"]
        chips.append(f"<div class='chip' style='background:{COLOURS[o]};display:inline-block' "
                     f"title='{_e(r.get('error') or r.get('message') or '')}'>{_e(r.get('entry') or r['id'])}: {_e(o)}</div>")  # fmt: skip
    if not chips:
        return ""
    return f"<h3>Outside the grids</h3><div id='elsewhere'>{''.join(chips)}</div>"


def _boot_grid_html(records: Sequence[Mapping[str, Any]]) -> str:
    grid: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "boot" and r.get("qemu") and r.get("firmware"):
            grid[(str(r["qemu"][0]), str(r["firmware"]))].append(r)
    if not grid:
        return ""
    qs = _build_order(k[0] for k in grid)
    fs = sorted({k[1] for k in grid})
    out = ["<h3>Boot: QEMU x OVMF</h3><table class='matrix' id='boot-grid'><tr><th>QEMU \\ OVMF</th>"
           + "".join(f"<th>{_e(f)}</th>" for f in fs) + "</tr>"]  # fmt: skip
    for q in qs:
        tds = []
        for f in fs:
            rs = grid.get((q, f))
            if not rs:
                tds.append("<td class='empty'></td>")
                continue
            o = _worst(r["outcome"] for r in rs)
            boot = rs[0].get("boot_s") or next((s.get("boot_s") for s in rs[0].get("steps", []) if s.get("boot_s")), None)
            label = f"{o} {boot:.0f} s" if isinstance(boot, int | float) else o
            tds.append(f"<td><div class='chip' style='background:{COLOURS[o]}'>{_e(label)}</div></td>")
        out.append(f"<tr><th>{_e(q)}</th>{''.join(tds)}</tr>")
    out.append("</table>")
    return "".join(out)


def _fmt_num(v: Any, scale: float = 1.0, unit: str = "", digits: int = 0) -> str:
    if not isinstance(v, int | float):
        return ""
    return f"{v * scale:.{digits}f}{unit}"


def _artifact_link(r: Mapping[str, Any]) -> str:
    art = r.get("artifacts")
    if not art:
        return ""
    return f"<a href='{_e(art)}/'>{_e(art)}</a>"


def _scenario_tables(records: Sequence[Mapping[str, Any]]) -> str:
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[str(r["scenario"])].append(r)
    out = []
    for name in sorted(groups):
        rs = groups[name]
        c = count(RunRecord.from_json(r) for r in rs)
        out.append(f"<h3 id='scenario-{_e(name)}'>{_e(name)} <small>"
                   + ", ".join(f"{c[k]} {k}" for k in ("passed", "failed", "error", "xfailed", "skipped") if c[k])
                   + "</small></h3>")  # fmt: skip
        out.append("<table class='runs'><tr><th>run</th><th>outcome</th><th>QEMU</th><th>OVMF</th>"
                   "<th>machine</th><th>time</th><th>downtime (max)</th><th>pause (max)</th>"
                   "<th>signature / error</th><th>artifacts</th></tr>")  # fmt: skip
        for r in rs:
            o = r["outcome"]
            why = ""
            if o != "passed":
                why = " ".join(x for x in (f"[{r['signature']}]" if r.get("signature") else "",
                                           str(r.get("error") or r.get("message") or "")) if x)  # fmt: skip
            steps = r.get("steps") or []
            detail = ""
            if len(steps) > 1 or (steps and o != "passed"):
                lis = "".join(
                    f"<li class='{step_outcome(s, o)}'>{_e(s.get('op'))} {_e(s.get('source'))} -> "
                    f"{_e(s.get('destination'))}{' cycle ' + _e(s.get('cycle')) if s.get('cycle') is not None else ''}: "
                    f"{step_outcome(s, o)}; downtime {_fmt_num(s.get('downtime_ms'), unit=' ms')}; "
                    f"pause {_fmt_num(s.get('pause_s'), 1000, ' ms')}"
                    f"{'; ' + _e(first_line(str(s.get('error') or ''), 200)) if s.get('error') else ''}</li>"
                    for s in steps
                )  # fmt: skip
                detail = f"<details><summary>{len(steps)} steps</summary><ul>{lis}</ul></details>"
            out.append(
                f"<tr style='background:{TINTS.get(o, '#fff')}'><td><code>{_e(r.get('entry') or r['id'])}</code>{detail}</td>"
                f"<td class='o-{_e(o)}'>{_e(o)}</td><td>{_e(', '.join(r.get('qemu') or []))}</td>"
                f"<td>{_e(', '.join(r.get('ovmf') or []) or r.get('firmware') or '')}</td><td>{_e(r.get('machine'))}</td>"
                f"<td>{_fmt_num(r.get('duration_s'), unit=' s')}</td><td>{_fmt_num(r.get('downtime_ms'), unit=' ms')}</td>"
                f"<td>{_fmt_num(r.get('pause_s'), 1000, ' ms')}</td><td>{_e(why)}</td><td>{_artifact_link(r)}</td></tr>"
            )  # fmt: skip
        out.append("</table>")
    return "".join(out)


def nice_ceiling(v: float) -> float:
    """The smallest 1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 x 10^k at or above ``v`` (axis maxima
    that read well)."""
    import math

    exp = math.floor(math.log10(v))
    for m in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        if m * 10**exp >= v:
            return float(m * 10.0**exp)
    return 10.0 ** (exp + 1)


def svg_line_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str,
                   x_label: str, y_label: str, width: int = 720, height: int = 300) -> str:
    """A small inline SVG line chart: one polyline per series, axes with ticks, a legend."""
    if not series:
        return ""
    left, right, top, bottom = 60, 250, 30, 40
    pw, ph = width - left - right, height - top - bottom
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y1 = nice_ceiling(max(ys) * 1.05) if ys and max(ys) > 0 else 1.0
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - y / y1 * ph

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' class='plot'>",
             f"<text x='{left}' y='18' class='t'>{_e(title)}</text>",
             f"<line x1='{left}' y1='{top + ph}' x2='{left + pw}' y2='{top + ph}' stroke='#333'/>",
             f"<line x1='{left}' y1='{top}' x2='{left}' y2='{top + ph}' stroke='#333'/>"]  # fmt: skip
    for i in range(5):
        v = y1 * i / 4
        parts.append(f"<text x='{left - 6}' y='{py(v) + 4:.1f}' text-anchor='end' class='a'>{v:.0f}</text>"
                     f"<line x1='{left}' y1='{py(v):.1f}' x2='{left + pw}' y2='{py(v):.1f}' stroke='#ddd'/>")  # fmt: skip
    for xv in sorted(set(xs)):
        parts.append(f"<text x='{px(xv):.1f}' y='{top + ph + 16}' text-anchor='middle' class='a'>{xv:g}</text>")
    parts.append(f"<text x='{left + pw / 2}' y='{height - 4}' text-anchor='middle' class='a'>{_e(x_label)}</text>")
    parts.append(f"<text x='14' y='{top + ph / 2}' transform='rotate(-90 14 {top + ph / 2})' "
                 f"text-anchor='middle' class='a'>{_e(y_label)}</text>")  # fmt: skip
    for i, (name, pts) in enumerate(sorted(series.items())):
        colour = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{coords}'/>")
        for x, y in pts:
            parts.append(f"<circle cx='{px(x):.1f}' cy='{py(y):.1f}' r='3' fill='{colour}'><title>{_e(name)}: {y:.0f}</title></circle>")
        ly = top + 14 * i
        parts.append(f"<rect x='{left + pw + 12}' y='{ly}' width='10' height='10' fill='{colour}'/>"
                     f"<text x='{left + pw + 26}' y='{ly + 9}' class='a'>{_e(name[:36])}</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def svg_bar_chart(bars: Sequence[tuple[str, float, str]], *, title: str, unit: str, width: int = 720) -> str:
    """Horizontal bars (label, value, colour) in inline SVG."""
    if not bars:
        return ""
    left, top, bar_h = 230, 30, 18
    pw = width - left - 70
    height = top + len(bars) * (bar_h + 6) + 10
    vmax = max(v for _, v, _ in bars) or 1.0
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' class='plot'>",
             f"<text x='10' y='18' class='t'>{_e(title)}</text>"]  # fmt: skip
    for i, (label, v, colour) in enumerate(bars):
        y = top + i * (bar_h + 6)
        w = max(1.0, v / vmax * pw)
        parts.append(f"<text x='{left - 6}' y='{y + 13}' text-anchor='end' class='a'>{_e(label)}</text>"
                     f"<rect x='{left}' y='{y}' width='{w:.1f}' height='{bar_h}' fill='{colour}'><title>{_e(label)}: {v:.0f} {unit}</title></rect>"
                     f"<text x='{left + w + 4:.1f}' y='{y + 13}' class='a'>{v:.0f} {_e(unit)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def pause_series(records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per-cycle guest pause (ms) of every back-to-back run with two or more cycles."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        pts = [(float(s["cycle"]), float(s["pause_s"]) * 1000) for s in r.get("steps") or []
               if isinstance(s.get("cycle"), int) and isinstance(s.get("pause_s"), int | float)]  # fmt: skip
        if len(pts) >= 2:
            out[str(r.get("entry") or r["id"])] = pts
    return out


def downtime_bars(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, float, str]]:
    """Mean downtime (ms) per (op, source -> destination), coloured by op."""
    acc: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in records:
        for s in r.get("steps") or []:
            d = s.get("downtime_ms")
            if isinstance(d, int | float) and s.get("source") and s.get("destination"):
                acc[(str(s.get("op")), str(s["source"]), str(s["destination"]))].append(float(d))
    ops = sorted({k[0] for k in acc})
    colour = {op: PALETTE[i % len(PALETTE)] for i, op in enumerate(ops)}
    return [(f"{op} {a} -> {b}", sum(v) / len(v), colour[op]) for (op, a, b), v in sorted(acc.items())]


def _comparison_html(c: Mapping[str, Any] | None) -> str:
    if not c:
        return "<p>No previous complete run in this results directory to compare with.</p>"
    if "error" in c:
        return f"<p>Comparison with {_e(c.get('previous'))} failed: {_e(c['error'])}</p>"

    def lst(ids: Sequence[Any]) -> str:
        return "<ul>" + "".join(f"<li><code>{_e(i)}</code></li>" for i in ids) + "</ul>" if ids else " none"

    regs = "".join(f"<li><code>{_e(x['id'])}</code> {_e(x['metric'])}: {_e(x['before'])} -> {_e(x['after'])}</li>"
                   for x in c.get("regressions", []))  # fmt: skip
    return (f"<p>Previous run: <b>{_e(c.get('previous_id'))}</b></p>"
            f"<div class='cmp'><b>New failures ({len(c['new_failures'])}):</b>{lst(c['new_failures'])}"
            f"<b>Fixed ({len(c['fixed'])}):</b>{lst(c['fixed'])}"
            f"<b>Timing regressions ({len(c['regressions'])}):</b>{'<ul>' + regs + '</ul>' if regs else ' none'}"
            f"<b>Still failing ({len(c['still_failing'])}):</b>{lst(c['still_failing'])}"
            f"<b>New runs:</b> {len(c['new'])}; <b>no longer run:</b> {len(c['missing'])}</div>")  # fmt: skip


CSS = """
body{font-family:sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 6px} h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:14px 0 6px} small{color:#555;font-weight:normal}
table{border-collapse:collapse} th,td{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top}
table.matrix td{min-width:130px} table.matrix td.empty{background:#fafafa}
.chip{color:#fff;font-weight:bold;font-size:12px;padding:7px 8px;margin:2px;min-width:110px;border-radius:3px}
.counts span{margin-right:14px} .o-failed,.o-error{font-weight:bold;color:#a00}
li.failed,li.error{color:#a00} .plot{border:1px solid #ddd;margin:6px 0}
.plot .t{font-size:13px;font-weight:bold} .plot .a{font-size:11px} .note{color:#555;font-size:13px}
"""


def render_html(results: Mapping[str, Any]) -> str:
    """The whole report as one HTML page (inline CSS and SVG only)."""
    run = results.get("run", {})
    s = results.get("summary", {})
    records = results.get("records", [])
    counts = "".join(f"<span><b>{s.get(k, 0)}</b> {k}</span>"
                     for k in ("passed", "failed", "error", "xfailed", "skipped"))  # fmt: skip
    meta = " · ".join(x for x in (
        f"host {run.get('host')}" if run.get("host") else "",
        f"{run['duration_s']:.0f} s" if isinstance(run.get("duration_s"), int | float) else "",
        f"shard {run['shard']}" if run.get("shard") else "",
        rotation_text(run.get("rotation")),
        f"merged from {len(run['merged_from'])} runs" if run.get("merged_from") else "",
        f"cycles {run['cycles']}" if run.get("cycles") else "",
        f"QEMU {', '.join(run.get('qemu') or [])}" if run.get("qemu") else "",
        f"OVMF {', '.join(run.get('ovmf') or [])}" if run.get("ovmf") else "",
    ) if x)  # fmt: skip
    legend = " ".join(f"<span style='color:{COLOURS[k]}'>&#9632; {k}</span>" for k in COLOURS)
    notes = "".join(f"<li>{_e(n)}</li>" for n in run.get("not_applicable") or [])
    pause = svg_line_chart(pause_series(records), title="Guest pause per cycle (back-to-back runs)",
                           x_label="cycle", y_label="pause (ms)")  # fmt: skip
    down = svg_bar_chart(downtime_bars(records), title="Downtime per pair (mean of steps)", unit="ms")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>nightly {_e(run.get('id'))}</title><style>{CSS}</style></head><body>"
        f"<h1>Nightly {_e(run.get('id'))}</h1><p class='counts'>{counts}</p><p class='note'>{_e(meta)}</p>"
        f"<h2>Source x destination</h2>{_matrix_html(records)}"
        f"<p class='note'>Each chip: operation, passed/total steps; colour = worst outcome ({legend}).</p>"
        f"{_boot_grid_html(records)}{_elsewhere_html(records)}"
        f"<h2>Compared with the previous run</h2>{_comparison_html(results.get('comparison'))}"
        f"<h2>Plots</h2>{pause or '<p>No back-to-back runs with two or more cycles.</p>'}"
        f"{down or '<p>No downtime measured.</p>'}"
        f"<h2>Scenarios</h2>{_scenario_tables(records)}"
        + (f"<h2>Not run</h2><ul class='note'>{notes}</ul>" if notes else "")
        + "</body></html>\n"
    )
