"""Varstores of the real OVMF packages: their templates read, private copies made from them,
what a boot added (golden diff), the varstore CLI on them."""

from __future__ import annotations

import json

import pytest

from harness import cli
from harness.inventory import catalog
from harness.inventory.firmware import FirmwareBuild, get_firmware
from harness.varstore import (
    read_varstore,
)

VERSIONS = [e.version for e in catalog.default().firmware if e.arch == "x86_64"]
IMAGE_SECURITY_DB = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"


@pytest.fixture(scope="module", params=VERSIONS)
def build(request: pytest.FixtureRequest) -> FirmwareBuild:
    return get_firmware(request.param)


def test_empty_templates_have_no_boot_entries(build: FirmwareBuild) -> None:
    model = read_varstore(build.vars_template)
    assert model.size == build.vars_template.stat().st_size
    assert model.variables == {}
    assert model.boot_entries == {} and model.boot_order == [] and model.boot_next is None
    assert model.problems == ()


def test_enrolled_template_holds_secure_boot_keys(build: FirmwareBuild) -> None:
    model = read_varstore(build.select(secure_boot=True).vars_template)
    for name in ("PK", "KEK"):
        var = model.get(name)
        assert var is not None and var.non_volatile and len(var.data) > 100
    assert model.get("db", IMAGE_SECURITY_DB) is not None
    assert model.get("db") is None  # keyed by (name, GUID), not by name alone
    for number, entry in model.boot_entries.items():
        assert entry.number == number and entry.title


@pytest.mark.parametrize("version", ["2020.11", "2022.11"])
def test_2m_template_reads(version: str) -> None:
    tmpl = get_firmware(version).variant("2m").vars_template
    assert read_varstore(tmpl).size == tmpl.stat().st_size == 128 * 1024


def test_cli_show_prints_boot_order_for_each_template(
    build: FirmwareBuild, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["varstore", "show", str(build.vars_template)]) == 0
    out = capsys.readouterr().out
    assert "BootOrder: (none)" in out and "Boot entries: (none)" in out
    assert cli.main(["varstore", "show", "--json", str(build.vars_template)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["boot_order"] == [] and data["variables"] == []


