"""``harness nightly`` end to end on a small matrix: one real scenario (cpr-reboot, two
cycles, QEMU 10.0.2, OVMF 2022.11) and a deliberately failing entry (``--inject-failure``).
The three outputs must agree, the failure must show in all of them, the exit status must
be non-zero, and the HTML report, rendered by headless Chromium, must show the matrix
colours (and the colour check must fail on a report without a failure)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from harness.nightly import report
from harness.nightly.results import junit_key
from harness.paths import REPO_ROOT

pytestmark = pytest.mark.integration

HARNESS = REPO_ROOT / ".venv" / "bin" / "harness"
INJECTED = "harness/nightly/suite/test_matrix.py::test_scenario[injected-failure]"
CPR = "harness/nightly/suite/test_matrix.py::test_scenario[cpr-reboot-qemu10.0.2-ovmf2022.11]"
MIN_CHIP_PIXELS = 1500  # one matrix chip is ~110 x 28 px; the legend's glyphs are far fewer


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    dir: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One ``harness nightly`` run for the module's tests, shared by the xdist workers that
    run them (a worker's base temp is in the session's, whose first worker runs it under a
    lock and leaves its output there): each worker used to run its own."""
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "nightly-run"
    with FileLock(f"{shared}.lock", timeout=2400):
        done = shared / "proc.json"
        if done.exists():
            data = json.loads(done.read_text())
            proc = subprocess.CompletedProcess(data["args"], data["returncode"], data["stdout"], data["stderr"])
        else:
            root = shared / "results"
            root.mkdir(parents=True)
            proc = subprocess.run(
                [str(HARNESS), "nightly", "--scenario", "cpr-reboot", "--qemu", "10.0.2", "--ovmf", "2022.11",
                 "--cycles", "2", "--jobs", "2", "--inject-failure", "--results-root", str(root),
                 "--set", "fast=1"],  # the machinery is what is checked here, not a cold boot
                cwd=REPO_ROOT, capture_output=True, text=True, timeout=2400, check=False,
            )  # fmt: skip
            done.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode,
                                        "stdout": proc.stdout, "stderr": proc.stderr}))  # fmt: skip
    dirs = [d for d in (shared / "results").iterdir() if d.is_dir()]
    assert len(dirs) == 1, f"expected one results directory in {shared}: {dirs}\n{proc.stdout}\n{proc.stderr}"
    return Run(proc, dirs[0])


def test_exit_status_progress_and_summary(run: Run) -> None:
    out = run.proc.stdout
    assert run.proc.returncode == 1, out + run.proc.stderr
    assert "[gw" in out and "PASSED" in out  # pytest-xdist's live progress
    # one line per finished scenario run, besides pytest's
    assert re.search(r"^\s+ok\s+cpr-reboot\s+cpr-reboot-qemu10\.0\.2-ovmf2022\.11\s.*pause<= \d+ ms", out, re.M), out
    assert "2 runs: 1 passed, 1 failed" in out
    assert f"FAILED {INJECTED} [injected-failure]" in out
    for name in ("junit.xml", "results.json", "report.html"):
        assert (run.dir / name).is_file()


def test_results_json_and_junit_agree(run: Run) -> None:
    results = json.loads((run.dir / "results.json").read_text())
    cases = {c.key: c for c in report.parse_junit(run.dir / "junit.xml")}
    records = {r["id"]: r for r in results["records"]}
    assert {junit_key(i) for i in records} == set(cases)
    for rid, r in records.items():
        assert r["outcome"] == cases[junit_key(rid)].outcome, rid
    assert results["summary"]["total"] == len(cases) == 2
    assert results["summary"]["failed"] == sum(c.outcome == "failed" for c in cases.values()) == 1

    inj = records[INJECTED]
    assert inj["outcome"] == "failed" and inj["signature"] == "injected-failure"
    assert "deliberate failure" in cases[junit_key(INJECTED)].message

    cpr = records[CPR]
    assert cpr["outcome"] == "passed" and cpr["scenario"] == "cpr-reboot"
    entries = {e["id"]: e for e in json.loads((run.dir / "matrix.json").read_text())["entries"]}
    assert entries[CPR.split("[")[1].rstrip("]")]["settings"] == [["fast", "1"]]  # --set reached the row
    assert cpr["qemu"] == ["10.0.2"] and cpr["firmware"] == "2022.11"
    assert cpr["machine"].startswith("pc-q35-10.")
    assert [s["cycle"] for s in cpr["steps"]] == [1, 2] and all(s["ok"] for s in cpr["steps"])
    assert cpr["pause_s"] == max(s["pause_s"] for s in cpr["steps"]) and cpr["pause_s"] > 0
    assert cpr["downtime_ms"] is not None and cpr["duration_s"] > 0 and cpr["worker"].startswith("gw")


def test_report_html_shows_the_failure(run: Run) -> None:
    page = (run.dir / "report.html").read_text()
    assert "<script" not in page  # self-contained: no script, nothing fetched from elsewhere
    assert not re.search(r"(src|href)\s*=\s*['\"]?https?:|url\(\s*['\"]?https?:|@import", page)
    matrix = page.split("id='pair-matrix'")[1].split("</table>")[0]
    assert f"background:{report.COLOURS['failed']}'" in matrix and "injected 0/1" in matrix
    assert f"background:{report.COLOURS['passed']}'" in matrix and "cpr-reboot 2/2" in matrix
    assert "injected-failure</code>" in page and "class='o-failed'" in page
    assert "<polyline" in page  # per-cycle pause of the back-to-back run


# --- the browser ---------------------------------------------------------------------------


def screenshot(html: Path, tmp_path: Path) -> Path:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `make setup` installs it (HOST_PACKAGES)")
    png = tmp_path / f"{html.stem}.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={png}",
         "--window-size=1400,1000", html.resolve().as_uri()],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and png.is_file(), f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return png


def colour_pixels(png: Path, colour: str, tolerance: int = 10) -> int:
    """How many pixels of the screenshot are within ``tolerance`` of ``colour``."""
    from PIL import Image

    want = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    with Image.open(png) as img:
        rgb = img.convert("RGB")
        return sum(n for n, px in rgb.getcolors(maxcolors=1 << 24) or []
                   if all(abs(a - b) <= tolerance for a, b in zip(px, want, strict=True)))  # fmt: skip


def test_browser_renders_the_matrix_colours(run: Run, tmp_path: Path) -> None:
    png = screenshot(run.dir / "report.html", tmp_path)
    assert colour_pixels(png, report.COLOURS["passed"]) >= MIN_CHIP_PIXELS
    assert colour_pixels(png, report.COLOURS["failed"]) >= MIN_CHIP_PIXELS

    # the same check on the same run without its failure finds no failure colour
    results = json.loads((run.dir / "results.json").read_text())
    results["records"] = [r for r in results["records"] if r["outcome"] == "passed"]
    clean = tmp_path / "clean"
    clean.mkdir()
    report.write_all(clean, results)
    png2 = screenshot(clean / "report.html", tmp_path)
    assert colour_pixels(png2, report.COLOURS["passed"]) >= MIN_CHIP_PIXELS
    assert colour_pixels(png2, report.COLOURS["failed"]) < MIN_CHIP_PIXELS
