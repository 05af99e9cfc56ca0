"""Nightly matrix, shards, results joining, comparison, merge and HTML: pure logic on
synthetic results directories (the real run is tests/integration/test_nightly.py)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from harness import cli, scenarios
from harness.errors import CatalogError, ConfigError, HarnessError
from harness.inventory.catalog import Version
from harness.matrix import load_incompatibilities, parse_incompatibilities
from harness.nightly import report
from harness.nightly import runner as nightly
from harness.nightly.results import (
    RunRecord,
    builds_from_id,
    junit_key,
    nodeid_from_junit,
    summarize_steps,
)

pytestmark = pytest.mark.unit

QEMU = [nightly.BuildInfo("5.2", (5, 2, 0), frozenset({"normal"})),
        nightly.BuildInfo("7.2", (7, 2, 0), frozenset({"normal"})),
        nightly.BuildInfo("10.0.2", (10, 0, 2), frozenset({"normal", "cpr-reboot", "cpr-transfer"}))]  # fmt: skip
OVMF = ["2020.11", "2022.11", "2025.02"]


def fake_plans(part: str, qemu: Sequence[str], ovmf: Sequence[str]) -> list[str]:
    if part == "pairs":
        return [f"pair {a} -> {b}" for a in qemu for b in qemu if a != b]
    if part == "firmware":
        return [f"firmware {a} -> {b}" for a, b in zip(ovmf, ovmf[1:], strict=False)]
    return []


def matrix(**kw: Any) -> nightly.Matrix:
    return nightly.build_matrix(nightly.DEFAULT_KINDS, QEMU, OVMF, plans=fake_plans, **kw)


# --- the matrix -------------------------------------------------------------------------------


def test_default_matrix_covers_every_build_and_scenario() -> None:
    m = matrix(cycles=3, registered=["live", "save-restore", "cpr-reboot", "cpr-transfer", "cross-version"])
    ids = {e.id for e in m.entries}
    for q in ("5.2", "7.2", "10.0.2"):
        for f in OVMF:
            assert f"boot-qemu{q}-ovmf{f}" in ids
        assert f"live-qemu{q}-ovmf2022.11" in ids
    assert "live-qemu10.0.2-ovmf2025.02" in ids and "live-qemu7.2-ovmf2025.02" not in ids
    # modes from capabilities: cpr only where the build offers it, cpr-exec nowhere
    assert {e.id for e in m.entries if e.scenario == "cpr-reboot"} == {
        f"cpr-reboot-qemu10.0.2-ovmf{f}" for f in OVMF}
    assert not [e for e in m.entries if e.scenario == "cpr-exec"]
    assert any("cpr-exec" in n and "migration mode cpr-exec" in n for n in m.not_applicable)
    assert any("nested" in n and "not registered" in n for n in m.not_applicable)
    assert len([e for e in m.entries if e.part == "pairs"]) == 6
    assert {e.id for e in m.entries if e.part == "firmware"} == {
        "firmware-upgrade-ovmf2020.11-to-ovmf2022.11", "firmware-upgrade-ovmf2022.11-to-ovmf2025.02"}
    assert all(e.cycles == 3 for e in m.entries if e.scenario == "live")
    assert all(e.cycles == 1 for e in m.entries if e.scenario == "boot")
    costs = [e.cost_s for e in m.entries]
    assert costs == sorted(costs, reverse=True)  # long ones first for xdist
    assert m.selected == [e.id for e in m.entries]


def test_default_pairs_are_neighbours_and_the_newest_full_is_every_pair() -> None:
    five = [*QEMU, nightly.BuildInfo("10.0.13", (10, 0, 13), frozenset({"normal"})),
            nightly.BuildInfo("11.1.3", (11, 1, 3), frozenset({"normal", "cpr-exec"}))]  # fmt: skip
    kw: dict[str, Any] = {"plans": fake_plans, "scenarios": ["cross-version"]}
    full = nightly.build_matrix(nightly.DEFAULT_KINDS, five, OVMF, full=True, **kw)
    default = nightly.build_matrix(nightly.DEFAULT_KINDS, five, OVMF, **kw)
    pairs = {e.qemu for e in default.entries if e.part == "pairs"}
    assert len({e.qemu for e in full.entries if e.part == "pairs"}) == 20
    # neighbours 5.2-7.2, 7.2-10.0.2, 10.0.2-10.0.13, 10.0.13-11.1.3 and every build with the
    # newest (5.2, 7.2, 10.0.2 besides its neighbour), both directions
    assert len(pairs) == 14
    assert ("10.0.2", "10.0.13") in pairs and ("10.0.13", "10.0.2") in pairs
    assert ("5.2", "11.1.3") in pairs and ("11.1.3", "5.2") in pairs
    assert ("5.2", "10.0.2") not in pairs and ("7.2", "10.0.13") not in pairs
    assert any("6 ordered pairs" in n and "--full" in n for n in default.not_applicable)
    # the chains still walk every build
    assert [e.qemu for e in default.entries if e.part == "chains"] == [tuple(b.label for b in five)]


def test_matrix_subset_and_bad_options() -> None:
    m = matrix(scenarios=["boot"])
    assert {e.scenario for e in m.entries} == {"boot"} and len(m.entries) == 9
    with pytest.raises(ConfigError, match="--scenario nosuch: unknown"):
        matrix(scenarios=["nosuch"])
    with pytest.raises(ConfigError, match="--cycles 0"):
        matrix(cycles=0)
    with pytest.raises(ConfigError, match="no QEMU builds"):
        nightly.build_matrix(nightly.DEFAULT_KINDS, [], OVMF, plans=fake_plans)


def test_matrix_roundtrips_through_json(tmp_path: Path) -> None:
    m = matrix()
    m.shard = "1/2"
    m.save(tmp_path / "matrix.json")
    back = nightly.Matrix.load(tmp_path / "matrix.json")
    assert back.entries == m.entries and back.selected == m.selected and back.shard == "1/2"
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json"):
        nightly.Matrix.load(tmp_path / "bad.json")


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_are_deterministic_disjoint_and_complete(n: int) -> None:
    entries = matrix().entries
    shards = [nightly.shard(entries, k, n) for k in range(1, n + 1)]
    again = [nightly.shard(list(reversed(entries)), k, n) for k in range(1, n + 1)]
    assert [[e.id for e in s] for s in shards] == [[e.id for e in s] for s in again]
    ids = [e.id for s in shards for e in s]
    assert sorted(ids) == sorted(e.id for e in entries) and len(ids) == len(set(ids))
    loads = [sum(e.cost_s for e in s) for s in shards]
    assert max(loads) - min(loads) <= max(e.cost_s for e in entries)  # balanced by cost


def test_rotation_runs_the_core_every_night_and_the_rest_once_in_n_nights() -> None:
    import datetime

    base = matrix(cycles=3)
    newest = max(QEMU, key=lambda b: b.version).label
    core = nightly.core_ids(base.entries, newest, "2022.11")
    assert core and all(f"qemu{newest}-ovmf2022.11" in c or c.endswith(f"qemu{newest}") for c in core)
    assert {c.split("-qemu")[0] for c in core} >= {"boot", "live", "save-restore"}
    night = datetime.date(2026, 11, 30)
    shares = []
    for day in range(3):
        m = matrix(cycles=3)
        nightly.rotate(m, 3, night + datetime.timedelta(days=day), core)
        assert set(core) <= set(m.selected)
        assert m.rotation and m.rotation["night"] == str(night + datetime.timedelta(days=day))
        shares.append(set(m.selected) - set(core))
        again = matrix(cycles=3)  # the same night picks the same share
        nightly.rotate(again, 3, night + datetime.timedelta(days=day), core)
        assert again.selected == m.selected
    assert not (shares[0] & shares[1]) and not (shares[1] & shares[2]) and not (shares[0] & shares[2])
    assert shares[0] | shares[1] | shares[2] | set(core) == {e.id for e in base.entries}
    slots = set()
    for day in range(3):
        m = matrix(cycles=3)
        nightly.rotate(m, 3, night + datetime.timedelta(days=day), core)
        slots.add(m.rotation["slot"] if m.rotation else None)
    assert slots == {"1/3", "2/3", "3/3"}  # consecutive nights, consecutive slots
    whole = matrix(cycles=3)
    nightly.rotate(whole, 1, night, core)
    assert whole.selected == base.selected and whole.rotation is None
    with pytest.raises(ConfigError, match="--rotation 0"):
        nightly.rotate(matrix(cycles=3), 0, night, core)
    assert "rotation 1/3" in report.rotation_text({"slot": "1/3", "night": "2026-11-30", "core": core,
                                                    "share": 5, "rest": 15, "next_nights": {}})  # fmt: skip


def test_rotation_defaults_to_the_default_matrix_only() -> None:
    assert nightly.NightlyOptions().rotation_nights() == nightly.DEFAULT_ROTATION
    assert nightly.NightlyOptions(scenarios=["live"]).rotation_nights() == 1
    assert nightly.NightlyOptions(qemu=["10.0.2"]).rotation_nights() == 1
    assert nightly.NightlyOptions(full=True).rotation_nights() == 1
    assert nightly.NightlyOptions(shard="1/4").rotation_nights() == 1  # machines share it all
    assert nightly.NightlyOptions(scenarios=["live"], rotation=2).rotation_nights() == 2
    assert str(nightly.parse_night("2026-12-01")) == "2026-12-01"
    with pytest.raises(ConfigError, match="--night 'tomorrow'"):
        nightly.parse_night("tomorrow")


def test_shard_parsing() -> None:
    assert nightly.parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "1/0", "x", "1-2"):
        with pytest.raises(ConfigError, match="--shard"):
            nightly.parse_shard(bad)


def test_pytest_command_runs_scenario_file_and_pytest_rows(tmp_path: Path) -> None:
    m = matrix(scenarios=["boot", "boot-order"])
    opts = nightly.NightlyOptions(jobs=2, qemu=["10.0.2"])
    cmd = nightly.pytest_command(m, tmp_path, opts)
    assert cmd[cmd.index("-n") + 1] == "2" and "--junitxml" in cmd
    assert nightly.TEST_FILE in cmd and "tests/integration/test_bootorder.py" in cmd
    assert cmd[cmd.index("--qemu") + 1] == "10.0.2"
    cmd0 = nightly.pytest_command(matrix(scenarios=["boot"]), tmp_path, nightly.NightlyOptions(jobs=0))
    assert "-n" not in cmd0 and "--qemu" not in cmd0


def test_registration_options_reach_the_registry(tmp_path: Path) -> None:
    import argparse

    nightly.register_from_options(argparse.Namespace(qemu_deb=[], ovmf_deb=[], qemu_dir=[]))  # nothing asked
    bogus = tmp_path / "x.deb"
    bogus.write_text("not a package")
    with pytest.raises(HarnessError, match="x.deb"):
        nightly.register_from_options(argparse.Namespace(qemu_deb=[bogus], ovmf_deb=[], qemu_dir=[]))


# --- records ----------------------------------------------------------------------------------


def test_junit_keys_and_ids() -> None:
    nid = "harness/nightly/suite/test_matrix.py::test_scenario[live-qemu10.0.2-ovmf2022.11]"
    key = junit_key(nid)
    assert key == "harness.nightly.suite.test_matrix::test_scenario[live-qemu10.0.2-ovmf2022.11]"
    cls, name = key.split("::")
    assert nodeid_from_junit(cls, name) == nid
    assert junit_key("tests/a.py::C::t[x]") == "tests.a.C::t[x]"
    assert builds_from_id("tests/i/t.py::test_x[qemu7.2-ovmf2025.02]") == (["7.2"], ["2025.02"])
    assert builds_from_id("tests/i/t.py::test_x") == ([], [])


def test_record_schema_refuses_bad_records() -> None:
    with pytest.raises(ConfigError, match="outcome 'maybe'"):
        RunRecord.from_json({"id": "a", "scenario": "s", "outcome": "maybe"})
    with pytest.raises(ConfigError, match="'scenario'"):
        RunRecord.from_json({"id": "a", "outcome": "passed"})
    assert RunRecord.from_json({"id": "a", "scenario": "s", "outcome": "passed", "future": 1}).id == "a"


def test_summarize_steps_takes_worst_and_first_unexpected_failure() -> None:
    steps = [
        {"op": "live", "source": "7.2", "destination": "10.0.2", "machine": "pc-q35-7.2", "ok": True,
         "downtime_ms": 40.0, "pause_s": 0.2, "cycle": 1},
        {"op": "live", "source": "10.0.2", "destination": "7.2", "ok": False, "expected_failure": True,
         "signature": "expected-sig", "error": "known"},
        {"op": "live", "source": "10.0.2", "destination": "5.2", "ok": False, "downtime_ms": 90.0,
         "signature": "section-footer", "error": "check_section_footer: Read section footer failed: -5\nmore"},
    ]
    r = summarize_steps(RunRecord(id="x", scenario="s", outcome="failed"), steps)
    assert r.downtime_ms == 90.0 and r.pause_s == 0.2 and r.expected_failures == 1
    assert r.signature == "section-footer" and r.error == "check_section_footer: Read section footer failed: -5"
    assert r.qemu == ["7.2", "10.0.2", "5.2"] and r.machine == "pc-q35-7.2"


# --- a synthetic run directory ----------------------------------------------------------------


def rec(entry: str, outcome: str, scenario: str = "live", steps: list[dict[str, Any]] | None = None,
        **kw: Any) -> dict[str, Any]:
    r = RunRecord(id=f"harness/nightly/suite/test_matrix.py::test_scenario[{entry}]", scenario=scenario,
                  outcome=outcome, entry=entry, **kw)
    summarize_steps(r, steps or [])
    return r.to_json()


def cycles(src: str, dst: str, pauses: Sequence[float], op: str = "live", ok: bool = True) -> list[dict[str, Any]]:
    return [{"op": op, "source": src, "destination": dst, "cycle": i + 1, "ok": ok,
             "status": "completed" if ok else "failed", "downtime_ms": 40.0 + i, "pause_s": p,
             "error": "" if ok else "boom"} for i, p in enumerate(pauses)]  # fmt: skip


def junit_xml(cases: Sequence[tuple[str, str]], extra: Sequence[tuple[str, str, str]] = ()) -> str:
    body = []
    for nodeid, outcome in cases:
        key = junit_key(nodeid)
        cls, name = key.split("::")
        inner = {"passed": "", "failed": "<failure message='boom'>trace</failure>",
                 "error": "<error message='setup broke'>trace</error>",
                 "skipped": "<skipped type='pytest.skip' message='not here'/>",
                 "xfailed": "<skipped type='pytest.xfail' message='expected'/>"}[outcome]  # fmt: skip
        body.append(f"<testcase classname='{cls}' name='{name}' time='1.5'>{inner}</testcase>")
    for cls, name, inner in extra:
        body.append(f"<testcase classname='{cls}' name='{name}' time='2.0'>{inner}</testcase>")
    return f"<?xml version='1.0'?><testsuites><testsuite name='pytest'>{''.join(body)}</testsuite></testsuites>"


def write_run(d: Path, records: Sequence[dict[str, Any]], *, junit: Sequence[tuple[str, str]] | None = None,
              shard: str | None = None, selected: Sequence[str] | None = None,
              entries: Sequence[dict[str, Any]] | None = None, extra_junit: Sequence[tuple[str, str, str]] = ()) -> Path:
    (d / "records").mkdir(parents=True)
    with (d / "records" / "gw0.jsonl").open("w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
        fh.write('{"torn": ')  # a killed worker's last line
    ents = list(entries) if entries is not None else [{"id": r["entry"], "scenario": r["scenario"], "runner": "scenario"} for r in records]
    (d / "matrix.json").write_text(json.dumps({
        "entries": ents, "selected": list(selected) if selected is not None else [e["id"] for e in ents],
        "shard": shard, "qemu": ["7.2", "10.0.2"], "ovmf": ["2022.11"], "cycles": 3}))  # fmt: skip
    cases = junit if junit is not None else [(r["id"], r["outcome"]) for r in records]
    (d / "junit.xml").write_text(junit_xml(cases, extra_junit))
    return d


def test_join_lets_junit_win_and_reports_what_never_ran(tmp_path: Path) -> None:
    a = rec("live-a", "passed", steps=cycles("10.0.2", "10.0.2", [0.1, 0.2]))
    b = rec("live-b", "passed")
    entries = [{"id": "live-a", "scenario": "live", "runner": "scenario"},
               {"id": "live-b", "scenario": "live", "runner": "scenario"},
               {"id": "live-c", "scenario": "live", "runner": "scenario"},
               {"id": "boot-order", "scenario": "boot-order", "runner": "pytest",
                "tests": ["tests/integration/test_bootorder.py"]}]  # fmt: skip
    d = write_run(tmp_path / "r1", [a, b], entries=entries,
                  junit=[(a["id"], "passed"), (b["id"], "error")],
                  extra_junit=[("tests.integration.test_bootorder", "test_fwcfg[2020.11]",
                                "<failure message='BootOrder changed'>x</failure>")])  # fmt: skip
    res = report.build_results(d, previous=None)
    by = {r["id"]: r for r in res["records"]}
    assert by[b["id"]]["outcome"] == "error" and "pytest says error" in by[b["id"]]["notes"][0]
    bo = by["tests/integration/test_bootorder.py::test_fwcfg[2020.11]"]
    assert bo["outcome"] == "failed" and bo["scenario"] == "boot-order" and bo["entry"] == "boot-order"
    assert bo["message"] == "BootOrder changed"
    assert by["matrix::live-c"]["outcome"] == "error" and "never ran" in by["matrix::live-c"]["error"]
    assert res["summary"] == {"passed": 1, "failed": 1, "error": 2, "xfailed": 0, "skipped": 0, "total": 4}


def test_parse_junit_outcomes(tmp_path: Path) -> None:
    ids = [f"tests/x.py::t{i}" for i in range(5)]
    outs = ["passed", "failed", "error", "skipped", "xfailed"]
    p = tmp_path / "j.xml"
    p.write_text(junit_xml(list(zip(ids, outs, strict=True))))
    assert [c.outcome for c in report.parse_junit(p)] == outs
    p.write_text("<testsuites><testsuite>")
    with pytest.raises(ConfigError, match="not valid JUnit XML"):
        report.parse_junit(p)


# --- comparison -------------------------------------------------------------------------------


def test_compare_finds_new_failures_fixed_and_regressions() -> None:
    prev = {"run": {"id": "p"}, "records": [
        rec("a", "passed", duration_s=30.0), rec("b", "failed"), rec("c", "passed", duration_s=30.0),
        rec("d", "passed", steps=cycles("7.2", "10.0.2", [0.1])), rec("gone", "passed"),
        rec("e", "passed", duration_s=30.0)]}  # fmt: skip
    cur = {"records": [
        rec("a", "failed"), rec("b", "passed"), rec("c", "passed", duration_s=60.0),
        rec("d", "passed", steps=cycles("7.2", "10.0.2", [0.5])), rec("new", "error"),
        rec("e", "passed", duration_s=39.0)]}  # fmt: skip
    c = report.compare(cur, prev)
    idf = "harness/nightly/suite/test_matrix.py::test_scenario[{}]".format
    assert c["new_failures"] == [idf("a"), idf("new")]
    assert c["fixed"] == [idf("b")]
    regs = {(r["id"], r["metric"]) for r in c["regressions"]}
    assert regs == {(idf("c"), "duration_s"), (idf("d"), "pause_s")}  # e: +9 s is under the step
    assert c["missing"] == [idf("gone")] and c["new"] == [idf("new")]


def test_previous_run_is_the_newest_earlier_complete_run(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for name, shard in (("20250101-000000", None), ("20250102-000000", None),
                        ("20250103-000000", "1/2"), ("20250105-000000", None)):  # fmt: skip
        d = write_run(root / name, [rec("live-a", "passed")], shard=shard)
        report.write_all(d, report.build_results(d, previous=None))
    cur = write_run(root / "20250104-000000", [rec("live-a", "failed")])
    assert report.previous_run(cur) == (root / "20250102-000000").resolve()
    res = report.build_results(cur)
    assert res["comparison"]["previous_id"] == "20250102-000000"
    assert res["comparison"]["new_failures"] == [rec("live-a", "failed")["id"]]
    assert report.previous_run(root / "20250101-000000") is None


def test_previous_run_of_a_rotation_night_is_the_same_slot_or_a_whole_run(tmp_path: Path) -> None:
    root = tmp_path / "results"

    def night(name: str, slot: str | None) -> Path:
        d = write_run(root / name, [rec("live-a", "passed")])
        if slot:
            m = json.loads((d / "matrix.json").read_text())
            m["rotation"] = {"slot": slot, "night": name[:8], "core": [], "share": 1, "rest": 3}
            (d / "matrix.json").write_text(json.dumps(m))
        return d

    for name, slot in (("20250101-000000", None), ("20250102-000000", "1/3"), ("20250103-000000", "2/3")):
        d = night(name, slot)
        report.write_all(d, report.build_results(d, previous=None))
    assert report.previous_run(night("20250104-000000", "1/3")) == (root / "20250102-000000").resolve()
    assert report.previous_run(night("20250105-000000", "3/3")) == (root / "20250101-000000").resolve()
    res = report.build_results(root / "20250104-000000")
    assert res["run"]["rotation"]["slot"] == "1/3"
    assert any("rotation 1/3" in line for line in report.summary_lines(res))
    assert "rotation 1/3" in report.render_html(res)


# --- merge ------------------------------------------------------------------------------------


def _shards(tmp_path: Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    entries = [{"id": x, "scenario": "live", "runner": "scenario"} for x in ("a", "b", "c")]
    s1 = write_run(tmp_path / "s1", [rec("a", "passed", steps=cycles("10.0.2", "10.0.2", [0.1, 0.1]))],
                   shard="1/2", entries=entries, selected=["a"])  # fmt: skip
    r_b = rec("b", "failed", artifacts="artifacts/t_b")
    s2 = write_run(tmp_path / "s2", [r_b], shard="2/2", entries=entries, selected=["b"])
    (s2 / "artifacts" / "t_b").mkdir(parents=True)
    (s2 / "artifacts" / "t_b" / "qemu.log").write_text("log")
    for d in (s1, s2):
        report.write_all(d, report.build_results(d, previous=None))
    return s1, s2, entries


def test_merge_joins_shards(tmp_path: Path) -> None:
    s1, s2, _ = _shards(tmp_path)
    out = tmp_path / "merged"
    res = report.merge([s1, s2], out)
    assert res["summary"]["total"] == 2 and res["summary"]["passed"] == 1 and res["summary"]["failed"] == 1
    assert "not run by any shard: c" in res["run"]["not_applicable"]
    root = ET.parse(out / "junit.xml").getroot()
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "1"
    failed = next(r for r in res["records"] if r["outcome"] == "failed")
    assert (out / failed["artifacts"] / "qemu.log").read_text() == "log"
    assert (out / "report.html").is_file() and json.loads((out / "results.json").read_text())["schema"] == 1
    cases = {c.key: c.outcome for c in report.parse_junit(out / "junit.xml")}
    assert {junit_key(r["id"]): r["outcome"] for r in res["records"]} == cases


def test_merge_refuses_overlapping_shards(tmp_path: Path) -> None:
    s1, _, _ = _shards(tmp_path)
    with pytest.raises(ConfigError, match="both shard 1/2"):
        report.merge([s1, s1], tmp_path / "m")


def test_report_merge_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s1, s2, _ = _shards(tmp_path)
    rc = cli.main(["report", "merge", "--out", str(tmp_path / "m"), str(s1), str(s2)])
    assert rc == 1  # a shard had a failure
    assert "2 runs: 1 passed, 1 failed" in capsys.readouterr().out
    (tmp_path / "m" / "report.html").unlink()
    assert cli.main(["report", "html", str(tmp_path / "m")]) == 1
    assert (tmp_path / "m" / "report.html").is_file()


# --- HTML -------------------------------------------------------------------------------------


def test_html_matrix_plots_and_escaping() -> None:
    records = [
        rec("cpr", "passed", scenario="cpr-reboot", steps=cycles("10.0.2", "10.0.2", [0.1, 0.3, 0.2], op="cpr-reboot")),
        rec("xv", "failed", scenario="cross-version", steps=cycles("7.2", "10.0.2", [0.1], ok=False),
            artifacts="artifacts/xv"),
        rec("<script>", "passed", scenario="boot", kind="boot", qemu=["10.0.2"], firmware="2022.11",
            steps=[{"op": "boot", "ok": True, "source": "10.0.2", "boot_s": 21.0}]),
    ]  # fmt: skip
    page = report.render_html({"run": {"id": "t"}, "summary": {"passed": 2, "failed": 1},
                               "records": records, "comparison": None})  # fmt: skip
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert not re.search(r"(src|href)=['\"]https?:", page)
    matrix_html = page.split("id='pair-matrix'")[1].split("</table>")[0]
    assert f"background:{report.COLOURS['failed']}'" in matrix_html and "live 0/1" in matrix_html
    assert f"background:{report.COLOURS['passed']}'" in matrix_html and "cpr-reboot 3/3" in matrix_html
    assert "id='boot-grid'" in page and "passed 21 s" in page
    assert page.count("<polyline") == 1  # one back-to-back run with >= 2 cycles
    assert "Downtime per pair" in page and "href='artifacts/xv/'" in page
    assert "Outside the grids" not in page  # every failure already sits in a grid
    nested = rec("nested-live", "failed", scenario="nested", steps=[{"op": "live", "ok": False, "error": "L2 did not start"}])
    page = report.render_html({"run": {"id": "t"}, "summary": {}, "records": [*records, nested]})
    assert "Outside the grids" in page and f"background:{report.COLOURS['failed']};display:inline-block" in page


def test_nice_axis_maxima() -> None:
    assert [report.nice_ceiling(v) for v in (0.7, 1.0, 1.3, 230, 751, 2555, 4100)] == [0.8, 1.0, 1.5, 250, 800, 3000, 5000]


def test_pair_cells_and_step_outcomes() -> None:
    r = rec("x", "failed", steps=[
        {"op": "live", "source": "7.2", "destination": "10.0.2", "ok": True},
        {"op": "live", "source": "10.0.2", "destination": "7.2", "ok": False, "expected_failure": True},
        {"op": "save-restore", "source": "7.2", "destination": "10.0.2", "ok": False, "status": "error"}])  # fmt: skip
    cells = report.pair_cells([r])
    assert cells[("7.2", "10.0.2")] == {"live": ["passed"], "save-restore": ["error"]}
    assert cells[("10.0.2", "7.2")] == {"live": ["xfailed"]}


def test_summary_and_progress_lines() -> None:
    r = rec("a", "failed", steps=cycles("10.0.2", "10.0.2", [0.1], ok=False))
    r["signature"] = "section-footer"
    res = {"run": {"id": "x", "duration_s": 12.0}, "summary": {"total": 1, "failed": 1}, "records": [r],
           "comparison": {"previous_id": "p", "new_failures": [r["id"]], "fixed": [], "regressions": []}}
    lines = report.summary_lines(res)
    assert lines[0].startswith("nightly x: 1 runs: 0 passed, 1 failed") and "in 12 s" in lines[0]
    assert "FAILED" in lines[1] and "[section-footer]" in lines[1]
    assert any(line.startswith("  new failure:") for line in lines)
    assert report.progress_line(r).split()[:2] == ["FAIL", "live"]


def test_expected_boot_failures_are_data_and_judged_both_ways() -> None:
    data = load_incompatibilities()
    known = data.lookup_boot(Version.parse("5.2.0"), Version.parse("2025.02"))
    assert known is not None and "5.2" in known.reason and known.signature == "firmware-silent"
    assert data.lookup_boot(Version.parse("7.2.0"), Version.parse("2025.02")) is None
    assert data.lookup_boot(Version.parse("5.2.0"), Version.parse("2022.11")) is None
    silent = {"op": "boot", "ok": False, "error": "no output at all", "signature": "firmware-silent"}
    failed = nightly.judge_boot(dict(silent), known)
    assert failed["expected_failure"] is True and failed["ok"] is False
    other = nightly.judge_boot({"op": "boot", "ok": False, "error": "QEMU exited", "signature": None}, known)
    assert not other.get("expected_failure") and "not the expected firmware-silent" in other["error"]
    booted = nightly.judge_boot({"op": "boot", "ok": True}, known)
    assert booted["ok"] is False and "remove or narrow the entry" in booted["error"]
    assert not booted.get("expected_failure") and booted["signature"] == "unexpected-pass"
    assert nightly.judge_boot({"op": "boot", "ok": True}, None) == {"op": "boot", "ok": True}


@pytest.mark.parametrize(("table", "message"), [
    ({"qemu": "~5", "firmware": "1", "signature": "firmware-silent", "reason": "r"}, "not a version constraint"),
    ({"qemu": "5", "firmware": "1", "signature": "nope", "reason": "r"}, "unknown failure signature"),
    ({"qemu": "5", "firmware": "1", "signature": "firmware-silent"}, "missing field 'reason'"),
    ({"qemu": "5", "firmware": "1", "signature": "firmware-silent", "reason": "r", "ops": []},
     "unknown field"),
])  # fmt: skip
def test_boot_entries_are_validated(table: dict[str, object], message: str) -> None:
    with pytest.raises(CatalogError, match=message) as info:
        parse_incompatibilities(Path("x.toml"), {"boot": [table]})
    assert "[[boot]] entry 1" in str(info.value) and "x.toml" in str(info.value)


def test_rows_of_another_architecture_and_settings_reach_their_entries() -> None:
    m = matrix(arch_builds={"aarch64": ["7.2", "10.0.2"]})
    by_id = {e.id: e for e in m.entries}
    arm = sorted(i for i, e in by_id.items() if e.arch == "aarch64")
    assert arm == ["secure-boot-aarch64-qemu10.0.2-ovmf2022.11", "secure-boot-aarch64-qemu7.2-ovmf2022.11",
                   "storm-aarch64-qemu10.0.2-ovmf2022.11", "storm-aarch64-qemu7.2-ovmf2022.11"]
    chain = by_id["secure-boot-chains"]
    assert chain.qemu == ("5.2", "7.2", "10.0.2") and dict(chain.settings) == {"ops": "live", "restart": "0"}
    again = nightly.Entry.from_json(chain.to_json())
    assert again == chain  # settings survive the matrix file
    none = matrix()  # no aarch64 builds: the rows are skipped, saying why
    assert not [e for e in none.entries if e.arch == "aarch64"]
    assert any("storm-aarch64: no selected QEMU build has an aarch64 build" in s for s in none.not_applicable)


def test_command_line_settings_reach_every_scenario_row_and_no_boot_row() -> None:
    assert scenarios.parse_settings(["fast=1", "ops=live,reboot", "x="]) == [
        ("fast", "1"), ("ops", "live,reboot"), ("x", "")]
    for bad in ("fast", "=1", " =1"):
        with pytest.raises(ConfigError, match=f"--set '{bad}': expected KEY=VALUE"):
            scenarios.parse_settings([bad])
    m = matrix()
    nightly.apply_settings(m, [("fast", "1"), ("restart", "1")])
    by_id = {e.id: e for e in m.entries}
    scenario_rows = [e for e in m.entries if e.runner == "scenario"]
    assert scenario_rows and all(("fast", "1") in e.settings for e in scenario_rows)
    boot_rows = [e for e in m.entries if e.runner == "boot"]
    assert boot_rows and all(not e.settings for e in boot_rows)  # a boot row checks a cold boot
    chain = by_id["secure-boot-chains"]  # its own settings first: the command line's win
    assert dict(chain.settings) == {"ops": "live", "restart": "1", "fast": "1"}
    assert nightly.Matrix.from_json(m.to_json()).entries == m.entries


# --- merge: every input validated first, the output atomic ----------------------------------


def _edit_results(d: Path, change: Any) -> None:
    data = json.loads((d / "results.json").read_text())
    change(data)
    (d / "results.json").write_text(json.dumps(data))


def test_merge_names_a_results_json_without_run(tmp_path: Path) -> None:
    s1, s2, _ = _shards(tmp_path)
    _edit_results(s2, lambda data: data.pop("run"))
    out = tmp_path / "m"
    with pytest.raises(ConfigError, match=rf"{s2 / 'results.json'}: field 'run' is missing"):
        report.merge([s1, s2], out)
    assert not out.exists() and list(tmp_path.glob(".m.partial-*")) == []


def test_merge_names_a_corrupt_junit_before_copying_anything(tmp_path: Path) -> None:
    s1, s2, _ = _shards(tmp_path)
    (s1 / "junit.xml").write_text("<testsuites><testsuite")  # a shard killed mid-write
    out = tmp_path / "m"
    with pytest.raises(ConfigError, match=rf"{s1 / 'junit.xml'}: not a readable JUnit XML"):
        report.merge([s1, s2], out)
    assert not out.exists()


@pytest.mark.parametrize("art", ["../../..", "/etc", "artifacts/../../s1"])
def test_merge_refuses_an_artifacts_path_leading_outside_its_shard(tmp_path: Path, art: str) -> None:
    s1, s2, _ = _shards(tmp_path)
    _edit_results(s2, lambda data: data["records"][0].update(artifacts=art))
    out = tmp_path / "m"
    with pytest.raises(ConfigError, match=r"records\[0\] .*field 'artifacts'"):
        report.merge([s1, s2], out)
    assert not out.exists(), "nothing may be copied before every input is validated"


def test_merge_into_a_non_empty_directory_is_refused_and_leaves_it_alone(tmp_path: Path) -> None:
    s1, s2, _ = _shards(tmp_path)
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an empty directory"):
        report.merge([s1, s2], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_merge_failing_midway_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s1, s2, _ = _shards(tmp_path)
    out = tmp_path / "m"

    def boom(*a: Any, **k: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_all", boom)
    with pytest.raises(OSError, match="No space left"):
        report.merge([s1, s2], out)
    assert not out.exists() and list(tmp_path.glob(".m.partial-*")) == []


def test_report_merge_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s1, s2, _ = _shards(tmp_path)
    _edit_results(s2, lambda data: data.pop("run"))
    assert cli.main(["report", "merge", "--out", str(tmp_path / "m"), str(s1), str(s2)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "field 'run'" in err
