"""The CI templates' shards against the nightly's real default matrix (its cross-version rows
name plans from the provisioned builds' probed machine types): every entry run by exactly
one shard; the merge job reads every shard's results."""

from __future__ import annotations

import re
import shlex
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import cli
from harness.nightly import runner as nightly

TEMPLATES = Path(__file__).resolve().parents[2] / ".ci" / "templates"
QEMU = [nightly.BuildInfo("5.2", (5, 2, 0), frozenset({"normal"})),
        nightly.BuildInfo("7.2", (7, 2, 0), frozenset({"normal"})),
        nightly.BuildInfo("10.0.2", (10, 0, 2), frozenset({"normal", "cpr-reboot", "cpr-transfer"})),
        nightly.BuildInfo("11.1.3", (11, 1, 3), frozenset({"normal", "cpr-reboot", "cpr-transfer",
                                                           "cpr-exec"}))]  # fmt: skip


OVMF = ["2020.11", "2022.11", "2025.02"]


def _harness_args(line: str, variables: dict[str, str]) -> list[str] | None:
    """The arguments of the ``harness`` call in a script line, variables filled in."""
    for name, value in variables.items():
        line = line.replace(name, value)
    words = shlex.split(line)
    for i, w in enumerate(words):
        if w.endswith("harness"):
            return words[i + 1:]
    return None


def gitlab_shards() -> Iterator[tuple[list[str], list[str]]]:
    doc = yaml.safe_load((TEMPLATES / "gitlab-ci.yml").read_text())
    (job,) = [j for j in doc.values() if isinstance(j, dict) and "parallel" in j]
    n = int(job["parallel"])
    merge = [j for j in doc.values() if isinstance(j, dict) and any("report merge" in s for s in j.get("script", []))]
    assert len(merge) == 1 and merge[0].get("when") == "always", "one merge job that runs after failures too"
    needs = [x["job"] if isinstance(x, dict) else x for x in merge[0]["needs"]]
    assert [k for k, j in doc.items() if j is job] == needs
    merge_args = [_harness_args(s, {"$SHARDS_DIR": doc["variables"]["SHARDS_DIR"]})
                  for s in merge[0]["script"] if "report merge" in s][0]  # fmt: skip
    for k in range(1, n + 1):
        env = {"$CI_NODE_INDEX": str(k), "$CI_NODE_TOTAL": str(n), "$SHARDS_DIR": doc["variables"]["SHARDS_DIR"]}
        (args,) = [a for s in job["script"] if (a := _harness_args(s, env)) and a[0] == "nightly"]
        yield args, merge_args or []


def github_shards() -> Iterator[tuple[list[str], list[str]]]:
    doc = yaml.safe_load((TEMPLATES / "github-actions-nightly.yml").read_text())
    jobs: dict[str, Any] = doc["jobs"]
    (name, job) = [(k, j) for k, j in jobs.items() if "strategy" in j][0]
    indexes = job["strategy"]["matrix"]["shard"]
    assert job["strategy"].get("fail-fast") is False, "one failing shard must not cancel the others"
    (merge,) = [j for j in jobs.values() if any("report merge" in s.get("run", "") for s in j["steps"])]
    assert merge["needs"] == name and merge.get("if") == "always()"
    merge_args = [_harness_args(s["run"], {}) for s in merge["steps"] if "report merge" in s.get("run", "")][0]
    for k in indexes:
        env = {"${{ matrix.shard }}": str(k), "${{ strategy.job-total }}": str(len(indexes))}
        (args,) = [a for s in job["steps"] if (a := _harness_args(s.get("run", ""), env)) and a[0] == "nightly"]
        yield args, merge_args or []


@pytest.mark.parametrize("shards", [gitlab_shards, github_shards], ids=["gitlab", "github"])
def test_shards_cover_the_matrix_exactly_once(shards: Any) -> None:
    matrix = nightly.build_matrix(nightly.DEFAULT_KINDS, QEMU, OVMF)
    parser = cli.build_parser()
    covered: Counter[str] = Counter()
    results_dirs = []
    splits = set()
    for args, merge_args in shards():
        ns = parser.parse_args(args)
        k, n = nightly.parse_shard(ns.shard)
        splits.add(n)
        covered.update(e.id for e in nightly.shard(matrix.entries, k, n))
        results_dirs.append(str(ns.results))
        merged = parser.parse_args(merge_args)
        assert merged.report_command == "merge" and merged.out is not None
    assert len(splits) == 1 and len(results_dirs) == splits.pop() > 1
    assert len(set(results_dirs)) == len(results_dirs), "two shards write one results directory"
    assert sorted(covered) == sorted(e.id for e in matrix.entries), "an entry is run by no shard"
    assert max(covered.values()) == 1, "an entry is run by two shards"


def test_merge_job_globs_every_shards_directory() -> None:
    for shards in (gitlab_shards, github_shards):
        pairs = list(shards())
        merge_glob = [a for a in pairs[0][1] if "*" in a]
        assert len(merge_glob) == 1
        pattern = re.escape(merge_glob[0]).replace(r"\*", ".*")
        dirs = [str(cli.build_parser().parse_args(a).results) for a, _ in pairs]
        # GitHub downloads each shard's artifact into a directory named after the artifact
        assert all(re.fullmatch(pattern, d) or re.fullmatch(pattern, d.replace("shard-", "nightly-shard-"))
                   for d in dirs), (merge_glob, dirs)  # fmt: skip
