"""Shared test wiring: pytester for the plugin's own tests, short private run dirs, and a
way to find the QEMU processes one test started (by a marker in their command lines)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.inventory import builds, firmware, registry, sources
from harness.paths import cache_root

pytest_plugins = ["pytester"]

# A suite started as a background job of a non-interactive shell (`make test &`, `nohup
# make soak &`) inherits SIGINT ignored, and so would every child the tests start: the
# tests that interrupt a harness or pytest child with SIGINT (Ctrl-C, `kill -INT`) would
# then see it ignored and fail, or pass without testing anything.  A handler, unlike an
# ignored signal, is reset by exec, so the children start with the ordinary disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# avocado-instrumented tests are run by avocado (tests/integration/test_avocado.py does),
# never collected by pytest as unittest classes
collect_ignore = ["avocado"]

# pytester points HOME at its scratch directory; inner sessions must still find the
# provisioned builds and images (otherwise they would provision everything again)
CACHE = cache_root()


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("HARNESS_CACHE", str(CACHE))
    return pytester


def qemu_pids(marker: str) -> list[int]:
    """PIDs of live (non-zombie) QEMU processes whose command line contains ``marker``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z" or not argv or b"qemu-system" not in argv[0]:
            continue
        if any(marker.encode() in a for a in argv):
            out.append(int(entry.name))
    return out


@pytest.fixture
def harness_rundir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private directory used as ``HARNESS_RUNDIR`` (unix socket paths must stay
    under 107 bytes): every QEMU of the test has it in its command line."""
    path = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))
    monkeypatch.setenv("HARNESS_RUNDIR", str(path))
    yield path
    for pid in qemu_pids(str(path)):  # never leave one behind, even when the test failed
        os.kill(pid, 9)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def find_qemu() -> Callable[[str], list[int]]:
    return qemu_pids


# --- the build registry ---------------------------------------------------------------


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A private registry path; everything registered during the test is forgotten after."""
    path = tmp_path / "registry.json"
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    before_q = dict(builds._REGISTERED)
    before_f = dict(firmware._REGISTERED)
    yield path
    registry.forget(path)
    builds._REGISTERED.clear()
    builds._REGISTERED.update(before_q)
    firmware._REGISTERED.clear()
    firmware._REGISTERED.update(before_f)


def _fake_source_build(root: Path, version: str = "10.0.2") -> sources.SourceBuild:
    """A finished source build's record and a stub binary under ``root`` (nothing compiled)."""
    key = "ab" * 32
    build_dir = root / key / "build"
    (build_dir / "pc-bios").mkdir(parents=True)
    binary = build_dir / "qemu-system-x86_64"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    sb = sources.SourceBuild(key=key, root=root / key, label=sources.label_for(version, key),
                             version=version, source="/src/qemu.tar.xz", patches=(),
                             configure_args=sources.DEFAULT_CONFIGURE_ARGS, configure_s=1.0,
                             build_s=2.0)  # fmt: skip
    (root / key / "build.json").write_text(json.dumps(sb.to_json()))
    return sb


@pytest.fixture
def fake_source_build() -> Callable[..., sources.SourceBuild]:
    return _fake_source_build
