"""Registering user builds: QEMU .debs (with borrowed libraries), directories, OVMF .debs,
source builds by label, and the registry file that makes them visible to other processes.

Uses the .deb files provisioning cached (real packages; unpacking them needs no guest).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.errors import ConfigError, ProvisionError, UnknownVersionError
from harness.inventory import builds, registry, sources

pytestmark = pytest.mark.unit


# --- QEMU from .debs ---------------------------------------------------------------------


def test_not_a_deb(tmp_path: Path) -> None:
    bogus = tmp_path / "x.txt"
    bogus.write_text("no")
    with pytest.raises(ConfigError, match="not a .deb file"):
        registry.register_qemu_debs([bogus])
    with pytest.raises(ConfigError, match="no QEMU .deb files"):
        registry.register_qemu_debs([])


# --- QEMU from a directory ---------------------------------------------------------------


def test_qemu_dir_that_is_not_qemu(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="is not a QEMU binary"):
        registry.register_qemu_dir(tmp_path)


# --- the registry file and other processes -------------------------------------------------


@pytest.mark.parametrize("content", ["{not json", '{"format": 99}', "[]"])
def test_malformed_registry_file(clean_registry: Path, monkeypatch: pytest.MonkeyPatch,
                                 content: str) -> None:  # fmt: skip
    clean_registry.write_text(content)
    monkeypatch.setenv(registry.ENV_VAR, str(clean_registry))
    with pytest.raises(ConfigError, match="registry file"):
        builds.get_build("10.0.2")


def test_malformed_qemu_record() -> None:
    with pytest.raises(ConfigError, match="malformed QEMU record"):
        registry.qemu_from_record({"label": "x"})


# --- source builds by label -----------------------------------------------------------------


def test_unknown_source_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_registry: Path,
                              fake_source_build: Callable[..., Any]) -> None:  # fmt: skip
    monkeypatch.setattr(sources, "builds_root", lambda: tmp_path)
    fake_source_build(tmp_path)
    with pytest.raises(UnknownVersionError, match="src:10.0.2\\+deadbeef"):
        builds.get_build("src:10.0.2+deadbeef")


def test_incomplete_source_build_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            fake_source_build: Callable[..., Any]) -> None:  # fmt: skip
    monkeypatch.setattr(sources, "builds_root", lambda: tmp_path)
    sb = fake_source_build(tmp_path)
    sb.binary.unlink()  # build.json without its binary: an interrupted or wiped build
    assert sources.find_cached(sb.key) is None
    assert registry.source_build(sb.label) is None
