"""The bench's summary lines: each figure with its ratio or target, the run's CPU share and
speed index (pure logic over a results dict like the one ``python -m bench`` writes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

# bench/ is a directory of the checkout, not a package pytest's path reaches: load it by path
_spec = importlib.util.spec_from_file_location(
    "bench_main", Path(__file__).resolve().parents[2] / "bench" / "__main__.py")
assert _spec is not None and _spec.loader is not None
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
summary = _bench.summary


def _results(**overhead: dict[str, Any]) -> dict[str, Any]:
    return {"cpu_share": 0.5, "machine": {"cpus": 2},
            "speed_index": {"median_cold_boot_s": 8.2, "boots": 3}, "overhead": overhead}  # fmt: skip


def test_an_overhead_line_gives_the_medians_ratio_its_target_and_the_means_ratio() -> None:
    lines = summary(_results(**{"cpr-exec": {"harness_median_s": 0.0493, "raw_median_s": 0.0461, "ratio": 1.069,
                                             "mean_ratio": 1.034, "target": 1.05}}))  # fmt: skip
    assert lines[0].startswith("CPU share 0.50 of 2 CPUs; speed index: median cold boot to SSH 8.2 s (3 boots)")
    line = next(x for x in lines if x.startswith("cpr-exec:"))
    assert "= 1.07x (target <= 1.05x); means 1.03x" in line, line


def test_a_results_file_from_before_the_means_still_reads() -> None:
    lines = summary(_results(live={"harness_median_s": 0.87, "raw_median_s": 0.91, "ratio": 0.956, "target": 1.05}))
    line = next(x for x in lines if x.startswith("live:"))
    assert line.endswith("= 0.96x (target <= 1.05x)"), line
    assert "fast_start: not run (--only)" in lines
