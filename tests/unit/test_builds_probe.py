"""Capability probing against QMP answers recorded from the real provisioned builds.

The recordings (tests/unit/data/probe/qemu-*.json.gz) are `harness.inventory.builds.probe_raw`
output of QEMU 5.2, 7.2 and 10.0.2 as provisioned from Debian's archive."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from harness.errors import UnknownVersionError
from harness.inventory.builds import (
    Capabilities,
    MachineType,
    capabilities_from_qmp,
    newest_common_machine,
)

DATA = Path(__file__).parent / "data" / "probe"


def recorded(version: str) -> dict[str, Any]:
    with gzip.open(DATA / f"qemu-{version}.json.gz") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


@pytest.fixture(scope="module")
def caps() -> dict[str, Capabilities]:
    return {v: capabilities_from_qmp(**recorded(v)) for v in ("5.2", "7.2", "10.0.2")}


def test_versions(caps: dict[str, Capabilities]) -> None:
    assert caps["5.2"].version == "5.2.0"
    assert caps["7.2"].version.startswith("7.2.")
    assert caps["10.0.2"].version == "10.0.2"


def test_modes_come_from_the_schema(caps: dict[str, Capabilities]) -> None:
    assert caps["10.0.2"].migration_modes == ("normal", "cpr-reboot", "cpr-transfer")
    assert caps["7.2"].migration_modes == ("normal",)
    assert caps["5.2"].migration_modes == ("normal",)
    assert not caps["10.0.2"].has_mode("cpr-exec")


def test_file_uri_and_channels(caps: dict[str, Capabilities]) -> None:
    assert caps["10.0.2"].file_uri and caps["10.0.2"].migrate_channels
    assert not caps["7.2"].file_uri and not caps["5.2"].file_uri


def test_capabilities(caps: dict[str, Capabilities]) -> None:
    for c in caps.values():
        assert c.has_capability("x-ignore-shared")
        assert c.has_capability("postcopy-ram")
    assert caps["10.0.2"].has_capability("multifd")
    assert not caps["5.2"].has_capability("no-such-capability")


def test_machine_types_and_alias(caps: dict[str, Capabilities]) -> None:
    assert "pc-q35-5.2" in caps["10.0.2"].machine_names()
    assert caps["10.0.2"].resolve_machine("q35") == "pc-q35-10.0"
    assert caps["7.2"].resolve_machine("q35") == "pc-q35-7.2"
    assert "pc-q35-10.0" not in caps["7.2"].machine_names()


def test_newest_common_machine_is_numeric(caps: dict[str, Capabilities]) -> None:
    assert newest_common_machine(caps["7.2"], caps["10.0.2"]) == "pc-q35-7.2"
    assert newest_common_machine(caps["10.0.2"], caps["5.2"]) == "pc-q35-5.2"
    assert newest_common_machine(caps["10.0.2"], caps["10.0.2"]) == "pc-q35-10.0"


def test_no_common_machine_is_an_error() -> None:
    a = Capabilities("1.0.0", "", (MachineType("pc-q35-1.0"),), ("normal",), (), (), False, False, ())
    b = Capabilities("2.0.0", "", (MachineType("pc-q35-2.0"),), ("normal",), (), (), False, False, ())
    with pytest.raises(UnknownVersionError):
        newest_common_machine(a, b)


def test_json_round_trip(caps: dict[str, Capabilities]) -> None:
    c = caps["10.0.2"]
    assert Capabilities.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_missing_mode_parameter_means_normal_only() -> None:
    raw = recorded("10.0.2")
    raw["schema"] = [e for e in raw["schema"] if e.get("name") != "migrate-set-parameters"]
    assert capabilities_from_qmp(**raw).migration_modes == ("normal",)


def test_an_own_libc_build_runs_through_its_loader_from_any_environment(tmp_path: Path) -> None:
    from harness.inventory.builds import QemuBuild

    lib = tmp_path / "usr/lib/x86_64-linux-gnu"
    (lib / "qemu").mkdir(parents=True)
    loader = lib / "ld-linux-x86-64.so.2"
    loader.write_bytes(b"")
    own = QemuBuild("11.1.3", "x86_64", tmp_path / "usr/bin/qemu-system-x86_64", (), (lib,),
                    prefix=tmp_path, loader=loader)  # fmt: skip
    assert own.wrapper() == [str(loader), "--library-path", str(lib)]
    assert "LD_LIBRARY_PATH" not in own.env or own.env["LD_LIBRARY_PATH"] != str(lib)
    assert own.env["QEMU_MODULE_DIR"] == str(lib / "qemu")
    cmd = own.command()
    # env first (clean LD_LIBRARY_PATH, this build's modules), then the loader, then QEMU
    assert cmd[:3] == ["/usr/bin/env", "-u", "LD_LIBRARY_PATH"]
    assert f"QEMU_MODULE_DIR={lib / 'qemu'}" in cmd
    assert cmd[-4:] == [str(loader), "--library-path", str(lib), str(own.binary)]
    host = QemuBuild("10.0.2", "x86_64", tmp_path / "qemu", (), (lib,), prefix=tmp_path)
    assert host.wrapper() == [] and host.env["LD_LIBRARY_PATH"].startswith(str(lib))
    assert host.command()[:2] == ["/usr/bin/env", f"LD_LIBRARY_PATH={lib}"]
    bare = QemuBuild("5.2", "x86_64", tmp_path / "qemu", (), (tmp_path,), prefix=None)
    # env's options come before its assignments (`env VAR=x -u NAME` runs a program '-u')
    assert bare.command()[:4] == ["/usr/bin/env", "-u", "QEMU_MODULE_DIR", f"LD_LIBRARY_PATH={tmp_path}"]
    assert host.command()[-1] == str(host.binary)
