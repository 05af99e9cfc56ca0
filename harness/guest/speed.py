"""The machine's speed, as the run saw it: every cold boot of the reference guest (x86_64,
the ``minimal`` image, split UEFI flash, no Secure Boot, TCG or KVM as chosen) is noted,
and the median boot-to-SSH time is the run's speed index.  Figures from two machines (a
suite's duration, a benchmark's seconds) compare once each is read against its own index.

Processes of one run share a log named by ``HARNESS_SPEED_LOG`` (the pytest plugin sets it
for a session and its xdist workers; ``make bench`` keeps its own): one JSON line per boot,
appended with ``O_APPEND`` so concurrent writers never interleave.  A boot inside a pytest
test carries the test's id, so a session can say which tests spend its time booting cold
(:func:`cold_boots_by_test`)."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "HARNESS_SPEED_LOG"
REFERENCE = {"arch": "x86_64", "image": "minimal", "firmware_mode": "split", "secure_boot": False}


def note_boot(kind: dict[str, object], seconds: float) -> None:
    """Append one cold boot to the run's log, if the run keeps one."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    rec = {**kind, "seconds": round(seconds, 3)}
    test = os.environ.get("PYTEST_CURRENT_TEST")  # "path::name[param] (call)"
    if test:
        rec["test"] = test.rsplit(" (", 1)[0]
    line = json.dumps(rec) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        return  # the run's log is gone (its session ended): nothing to note
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SpeedIndex:
    median_s: float
    boots: int

    def __str__(self) -> str:
        return (f"median cold boot to SSH of the reference guest (x86_64 minimal, split UEFI) "
                f"{self.median_s:.1f} s over {self.boots} boots")  # fmt: skip


def _records(path: Path) -> list[tuple[dict[str, object], float]]:
    """Each boot in ``path`` with its seconds (unreadable lines skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("seconds"), int | float):
            out.append((rec, float(rec["seconds"])))
    return out


def read_index(path: Path) -> SpeedIndex | None:
    """The speed index of the boots in ``path`` (None without a reference boot)."""
    seconds = [s for rec, s in _records(path) if all(rec.get(k) == v for k, v in REFERENCE.items())]
    if not seconds:
        return None
    return SpeedIndex(statistics.median(seconds), len(seconds))


@dataclass(frozen=True)
class ColdBoots:
    test: str
    boots: int
    seconds: float


def cold_boots_by_test(path: Path) -> list[ColdBoots]:
    """Every test that booted a guest cold (any kind), the one spending most time first:
    where fast start (:mod:`harness.snapshots`) would save the most."""
    per: dict[str, list[float]] = {}
    for rec, seconds in _records(path):
        test = rec.get("test")
        if isinstance(test, str):
            per.setdefault(test, []).append(seconds)
    rows = [ColdBoots(t, len(s), round(sum(s), 1)) for t, s in per.items()]
    return sorted(rows, key=lambda r: (-r.seconds, r.test))
