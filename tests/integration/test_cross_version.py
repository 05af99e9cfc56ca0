"""Cross-version migrations of real UEFI guests (TCG): the ordered pairs of the QEMU builds
(the ``--qemu`` ones: every pair; the catalogue's: neighbours in version order, both ways),
the fleet upgrade and rollback chains through every build, and one firmware upgrade pair;
guest state, varstore and boot order checked after every hop.

Each ordered pair (A, B) boots one guest on A and runs live A -> B, then save-restore
B -> A on the same guest (guests restored from saved boots; `make nightly` boots them cold,
and crosses every build with the newest; `harness nightly --full` every ordered pair).
`make test` runs the pairs of the default build; the other neighbours are ``exhaustive``:
the nightly's cross-version row runs them.  A hop that fails must be listed in firmware/expected-incompatibilities.toml
with the signature it showed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import matrix
from harness.factory import MachineFactory
from harness.inventory.catalog import DEFAULT_QEMU
from harness.matrix import Plan
from harness.scenarios import ScenarioOptions
from harness.scenarios import cross_version as xv
from harness.spec import VmSpec

pytestmark = pytest.mark.integration


def _versions(config: pytest.Config) -> list[str]:
    return list(dict.fromkeys(config.getoption("--qemu") or []))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "pair_plan" in metafunc.fixturenames:
        eps = matrix.endpoints(_versions(metafunc.config))
        plans = matrix.pair_plans(eps)
        params: list[Any] = plans
        if not _versions(metafunc.config):
            # the catalogue's builds: neighbours in version order, both ways, as the
            # nightly's cross-version row crosses them (every ordered pair: `harness nightly
            # --full`); make test keeps the default build's pairs, the others are exhaustive
            order = [e.label for e in eps]
            plans = [p for p in plans
                     if abs(order.index(p.hops[0].source) - order.index(p.hops[0].destination)) == 1]
            params = [p if DEFAULT_QEMU in (p.hops[0].source, p.hops[0].destination)
                      else pytest.param(p, marks=pytest.mark.exhaustive) for p in plans]  # fmt: skip
        metafunc.parametrize("pair_plan", params, ids=[pair_id(p) for p in plans])


def pair_id(plan: Plan) -> str:
    """``A-to-B``: a pair's test id (the nightly's row of the pair is ``cross-version-qemuA-to-qemuB``)."""
    return plan.name.replace("pair ", "").replace(" -> ", "-to-")


def run(tmp_path: Path, artifacts: Path, plans: list[Plan], **extra: Any) -> list[dict[str, Any]]:
    extra = {"fast": True, **extra}  # guests restored from a saved boot (the nightly boots them)
    opts = ScenarioOptions(workdir=tmp_path / "w", artifacts=artifacts, extra=extra)
    report = xv.run_cross_version(opts, plans)
    hops = [(h.plan, h.index) for p in plans for h in p.hops]
    assert [(r["plan"], r["hop"]) for r in report.records] == hops, "every hop has exactly one record"
    return report.records


def assert_hop(rec: dict[str, Any]) -> None:
    where = f"{rec['op']} {rec['source']} -> {rec['destination']} ({rec['machine']})"
    if rec.get("expected_failure"):
        # an entry may name several signatures of one cause
        assert rec["signature"] in rec["expected_signatures"] and rec["reason"], where
        return
    assert rec["ok"], f"{where}: {rec.get('error') or rec.get('problems') or rec.get('note')}"
    assert rec["status"] == "completed" and rec["problems"] == [], where
    assert rec["boot_order"] not in ("", "(none)"), f"{where}: BootOrder was not read"
    assert rec["downtime_ms"] is not None, where


def test_pair(tmp_path: Path, harness_artifacts: Path, pair_plan: Plan) -> None:
    records = run(tmp_path, harness_artifacts, [pair_plan])
    for rec in records:
        assert rec["machine"] == pair_plan.machine
        assert_hop(rec)
    first = records[0]
    assert first["source"] == pair_plan.boot and "boot_s" in first


@pytest.mark.exhaustive  # the pairs run in make test; chains are every pair in a row
def test_upgrade_and_rollback_chains(tmp_path: Path, harness_artifacts: Path, request: pytest.FixtureRequest) -> None:
    eps = matrix.endpoints(_versions(request.config))
    if len(eps) < 2:
        pytest.skip("chains need two QEMU builds")
    plans = matrix.chains(eps)
    records = run(tmp_path, harness_artifacts, plans, parts=("chains",))
    for rec in records:
        assert_hop(rec)
    ok = [r for r in records if r["ok"]]
    if len(ok) == len(records):
        # one guest carried through the whole chain and the rollback: a single boot
        assert [("boot_s" in r) for r in records] == [True] + [False] * (len(records) - 1)
    path = [records[0]["source"]] + [r["destination"] for r in records]
    assert path == [e.label for e in eps] + [eps[-2].label]


def test_firmware_pair_runs_source_image_until_cold_restart(
    tmp_path: Path, harness_artifacts: Path, request: pytest.FixtureRequest
) -> None:
    from harness.inventory import firmware

    eps = matrix.endpoints(_versions(request.config))
    fws = [matrix.FirmwareEndpoint.of(firmware.get_firmware(v)) for v in ("2022.11", "2025.02")]
    (plan,) = matrix.firmware_plans(eps[-1], fws)
    (rec,) = run(tmp_path, harness_artifacts, [plan])
    assert_hop(rec)
    assert rec["firmware_seen"] == {
        "after_migration": "2022.11",
        "after_warm_reboot": "2022.11",
        "after_cold_restart": "2025.02",
    }
    # the guest's own view (SMBIOS type 0 from the running firmware) agrees
    bios = {k: v.get("version", "") for k, v in rec["bios_seen"].items()}
    assert "2025.02" in bios["after_cold_restart"], bios
    assert "2025.02" not in bios["after_migration"] and "2025.02" not in bios["after_warm_reboot"], bios


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Any]:
    with MachineFactory(VmSpec(firmware="2022.11", name="xvcheck"), base=tmp_path / "w", fast=True) as f:
        yield f()


def test_checks_fail_when_varstore_or_boot_order_change(guest: Any, tmp_path: Path) -> None:
    """The failing cases of the per-hop checks, on one guest without a migration (no
    migrated flash to wait for: a problem is one after a second, not the hop's ten)."""
    from harness import state
    from harness.inventory import firmware

    def guest_problems(before: xv.Before) -> list[str]:
        return xv.guest_problems(guest, before, settle_s=1.0)

    before = xv.before_hop(guest, "check")
    time.sleep(1.5)  # the heartbeat ticks once a second
    assert guest_problems(before) == []
    # the guest's variable rewritten: seen in the guest and in the host varstore file
    state.write_efivar(guest, xv.XV_VAR, b"something-else")
    problems = guest_problems(before)
    assert any("in the guest: expected" in p for p in problems), problems
    assert any("host varstore" in p and xv.XV_VAR in p for p in problems), problems
    # a source varstore file that is not the destination's bytes
    other = tmp_path / "other.fd"
    other.write_bytes(before.varstore.read_bytes()[:-1] + b"\x00")
    state.write_efivar(guest, xv.XV_VAR, before.value)
    moved = xv.Before(before.state, before.value, before.boot_order, other)
    assert any("differs from the source's" in p for p in xv.varstore_problems(guest, before.value, other,
                                                                             before.boot_order, timeout=0))
    assert guest_problems(moved) != []
    # BootOrder changed in the guest
    order = list(before.boot_order)
    assert len(order) >= 2, f"the guest has too few boot entries to reorder: {order}"
    guest.agent("bootorder", "set", ",".join(f"{n:04X}" for n in reversed(order)))
    problems = guest_problems(before)
    assert any("BootOrder in the guest changed" in p for p in problems), problems
    assert any("host varstore" in p and "BootOrder" in p for p in problems), problems
    # the flash holds 2022.11's image: 2025.02's file does not match it
    fw = {v: firmware.get_firmware(v).select().code for v in ("2022.11", "2025.02")}
    assert xv.which_firmware(guest, fw) == "2022.11"
    assert xv.which_firmware(guest, {"2025.02": fw["2025.02"]}).startswith("unknown")
