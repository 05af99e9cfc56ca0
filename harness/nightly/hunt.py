"""Hunting rare failures: a scenario run again and again, within a time budget, until a hop
fails; everything of the first failure is kept.

Each run is one call of a registered scenario (:mod:`harness.scenarios`) with its own
artifacts directory; a run whose records all passed leaves nothing behind, the first run
with a failing record keeps its directory (serial logs of both sides, QMP transcripts, QEMU's
output, varstores, state files: what the scenario saves for a failure) and ends the hunt.
``signatures`` narrows what counts: only a record with one of them ends the hunt (an
expected failure too, to hunt a listed intermittent finding); without it, any record that
is neither ok nor an expected failure does.  The result says how many runs and hops it took,
how long, and the one-line command that repeats the case.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.scenarios import ScenarioOptions, ScenarioReport


@dataclass
class HuntResult:
    """What a hunt did and found."""

    scenario: str
    runs: int = 0
    hops: int = 0
    duration_s: float = 0.0
    budget_s: float = 0.0
    found: dict[str, Any] | None = None
    artifacts: str | None = None
    repeat: str = ""
    signatures_seen: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "runs": self.runs, "hops": self.hops,
            "duration_s": round(self.duration_s, 1), "budget_s": self.budget_s,
            "found": self.found, "artifacts": self.artifacts, "repeat": self.repeat,
            "signatures_seen": self.signatures_seen,
        }  # fmt: skip

    def summary(self) -> str:
        what = f"{self.runs} runs, {self.hops} hops, {self.duration_s:.0f} s"
        if self.found is None:
            return f"{self.scenario}: not found in {what} (budget {self.budget_s:.0f} s)"
        rec = self.found
        sig = f" [{rec.get('signature')}]" if rec.get("signature") else ""
        why = "; ".join(rec.get("problems") or []) or str(rec.get("error") or rec.get("status"))
        return (f"{self.scenario}: found after {what}: {rec.get('op')} {rec.get('source')} -> "
                f"{rec.get('destination')}{sig}: {why[:400]}")  # fmt: skip


def repro_line(scenario: str, opts: ScenarioOptions) -> str:
    """The ``harness repro`` command that runs the same case once."""
    argv = ["harness", "repro", scenario]
    for q in opts.qemu:
        argv += ["--qemu", q]
    for f in opts.ovmf:
        argv += ["--ovmf", f]
    if opts.cycles != 1:
        argv += ["--cycles", str(opts.cycles)]
    if opts.mode:
        argv += ["--mode", opts.mode]
    for k, v in sorted(opts.extra.items()):
        if k == "incompatibilities":
            continue
        argv += ["--set", f"{k}={','.join(map(str, v)) if isinstance(v, list | tuple) else v}"]
    return shlex.join(argv)


def _ends_hunt(rec: dict[str, Any], signatures: Sequence[str]) -> bool:
    if signatures:
        return rec.get("signature") in signatures
    return not rec.get("ok") and not rec.get("expected_failure")


def hunt(scenario: str, opts: ScenarioOptions, budget_s: float, out: Path, *,
         signatures: Sequence[str] = (), max_runs: int | None = None,
         run: Callable[[ScenarioOptions], ScenarioReport] | None = None,
         on_run: Callable[[int, ScenarioReport], None] | None = None) -> HuntResult:
    """Run ``scenario`` until a record ends the hunt or ``budget_s`` is spent (a run that
    has started finishes).  ``out`` receives ``hunt.json`` and the first failure's
    artifacts (``out/failure``)."""
    if budget_s <= 0:
        raise ConfigError(f"--budget {budget_s}: expected a positive number of seconds")
    if run is None:
        from harness import scenarios

        run = scenarios.get(scenario)
    out.mkdir(parents=True, exist_ok=True)
    result = HuntResult(scenario, budget_s=budget_s, repeat=repro_line(scenario, opts))
    t0 = time.monotonic()
    while time.monotonic() - t0 < budget_s and (max_runs is None or result.runs < max_runs):
        run_dir = out / f"run-{result.runs + 1}"
        report = run(replace(opts, artifacts=run_dir))
        result.runs += 1
        result.hops += len(report.records)
        for rec in report.records:
            if rec.get("signature"):
                sig = str(rec["signature"])
                result.signatures_seen[sig] = result.signatures_seen.get(sig, 0) + 1
        if on_run is not None:
            on_run(result.runs, report)
        found = next((r for r in report.records if _ends_hunt(r, signatures)), None)
        if found is not None:
            result.found = found
            if run_dir.exists():
                final = out / "failure"
                if final.exists():
                    shutil.rmtree(final)
                run_dir.rename(final)
                result.artifacts = str(final)
            (out / "failure-report.json").write_text(json.dumps(report.to_json(), indent=2, default=str))
            break
        shutil.rmtree(run_dir, ignore_errors=True)
    result.duration_s = time.monotonic() - t0
    (out / "hunt.json").write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    return result
