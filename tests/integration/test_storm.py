"""Migration under fire on real guests: hops cut while the guest writes EFI variables.

x86 (OVMF) and aarch64 (AAVMF): the agent's storm creates, rewrites, appends to and deletes
variables until the store is full; live migrations, CPR updates, a cross-version hop and a
warm reboot (where edk2 reclaims the store) happen while it writes.  After every hop every
write the guest saw complete is in the guest's view and in the host-side varstore file,
the file's store is structurally whole, and no variable or flash error was logged; when
the storm stops, the flash the guest reads equals the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import matrix, migration, storm
from harness.factory import MachineFactory
from harness.inventory import builds
from harness.scenarios import ScenarioOptions
from harness.scenarios.storm import run_storm

pytestmark = pytest.mark.integration


def _assert_storm(hops: list[storm.StormHop], kinds: list[str]) -> None:
    summary = [(h.op, h.source, h.destination, h.status, h.writes, h.problems[:3]) for h in hops]
    assert [h.op for h in hops] == [*kinds, "stop"], summary
    for h in hops:
        assert h.ok, f"{h.op} {h.source} -> {h.destination}: {h.status} {h.error[:500]} {h.problems}"
    writes = [h.writes for h in hops]
    assert writes == sorted(writes) and writes[0] > 5, f"the storm did not keep writing: {writes}"
    # the store filled before the first hop (writes refused at runtime), a reboot reclaimed it
    assert hops[0].failed_writes > 0, f"the store never filled: {summary}"
    assert any(h.reclaimed for h in hops if h.op == "reboot"), f"no reclaim at the reboot: {summary}"


def test_storm_x86_live_cpr_reboot_and_cross_version(vm_factory: MachineFactory) -> None:
    """On OVMF's 2 MiB flash (a 56 KiB store): the same fill, refused writes and reclaim
    as the 4 MiB pair's 256 KiB store, which the nightly's storm rows run, in a fifth of
    the writes and of the reboot's reclaim (under TCG every flash byte is a trapped write
    and a write to the file: 27 s of firmware in a reboot against 7 s)."""
    new = builds.get_build("10.0.13")
    here = builds.get_build("10.0.2")
    machine = builds.newest_common_machine(here.capabilities, new.capabilities)
    vm = vm_factory(qemu="10.0.2", machine=machine, name="storm-x86", fast=True, flash="2m",
                    **migration.spec_fields_for("cpr-transfer"))  # fmt: skip
    assert vm.varstore_path.stat().st_size == 128 * 1024, vm.varstore_path  # the 2 MiB pair's varstore
    kinds = ["live", "cpr-transfer", "reboot", "live", "cpr-transfer"]
    hops = storm.run(vm, [("live", here), ("cpr-transfer", here), ("reboot", None),
                          ("live", new), ("cpr-transfer", new)],
                     fill_first_s=300, dump_dir=vm.workdir, bandwidth=20_000_000)  # fmt: skip
    failed = [h for h in hops if not h.ok]
    if failed:  # judged against the data: only the listed intermittent loss may happen
        h = failed[0]
        expected = matrix.load_incompatibilities().lookup(
            builds.get_build(h.source).version, builds.get_build(h.destination).version, h.op, machine,
            arch="x86_64", scenario="storm", signature=h.signature) if h.op in ("live", "cpr-transfer") else None  # fmt: skip
        assert expected is not None and expected.intermittent and h.signature in expected.signatures, (
            f"{h.op} {h.source} -> {h.destination}: {h.status} {h.signature} {h.error[:300]} {h.problems[:3]}")
        pytest.xfail(f"{h.op} {h.source} -> {h.destination} lost writes ({h.signature}): {expected.reason[:200]}")
    _assert_storm(hops, kinds)  # the capped live hops (precopy under writes) keep every write
    assert hops[3].destination == "10.0.13" and vm.build.label == "10.0.13"


@pytest.mark.exhaustive  # another architecture's variant; the nightly's exhaustive row runs it
def test_storm_aarch64_cpr_transfer_live_and_reboot(tmp_path: Path, harness_artifacts: Path) -> None:
    """aarch64 (AAVMF 2022.11, QEMU 10.0.2) through the scenario, judged against the data:
    cpr-transfer must keep every write; a live migration may lose some from the file (an
    intermittent finding listed in expected-incompatibilities.toml), and if it does it must
    be that finding; otherwise the reboot reclaims the store and everything is there."""
    opts = ScenarioOptions(qemu=["10.0.2"], workdir=tmp_path, artifacts=harness_artifacts,
                           extra={"arch": "aarch64", "ops": ["cpr-transfer", "live"], "fast": True})  # fmt: skip
    report = run_storm(opts)
    recs = report.records
    summary = [(r["op"], r["status"], r.get("writes"), r.get("signature"), r["problems"][:2]) for r in recs]
    assert report.ok, summary
    assert recs[0]["op"] == "cpr-transfer" and recs[0]["ok"] and not recs[0]["expected_failure"], summary
    assert recs[0]["writes"] > 5, summary
    lost = [r for r in recs if r["expected_failure"]]
    if lost:
        assert [r["op"] for r in lost] == ["live"] and lost[0]["signature"] == "varstore-file-lost-writes"
        assert "intermittent" not in lost[0].get("note", "") and lost[0]["reason"]
    else:
        assert [r["op"] for r in recs] == ["cpr-transfer", "live", "reboot", "stop"], summary
        assert recs[1].get("note", "").startswith("passed this time"), recs[1]


@pytest.mark.exhaustive  # another architecture's variant; the nightly's exhaustive row runs it
def test_storm_aarch64_capped_live_loses_writes(tmp_path: Path, harness_artifacts: Path) -> None:
    """The finding varstore-file-lost-writes made to show: live hops with the stream capped
    (precopy lasts seconds while AAVMF programs the flash) on aarch64 10.0.13.  The loss came
    within three hops in 10 of 11 runs (docs/findings.md); six hops make a miss improbable.
    It must be judged as that finding, not as anything else; the day every hop keeps its
    writes this test fails and the data entry is to be revisited."""
    opts = ScenarioOptions(qemu=["10.0.13"], workdir=tmp_path, artifacts=harness_artifacts, cycles=6,
                           extra={"arch": "aarch64", "ops": ["live"], "bandwidth": "20M",
                                  "reboot": "0", "fast": True})  # fmt: skip
    report = run_storm(opts)
    recs = report.records
    summary = [(r["op"], r["status"], r.get("writes"), r.get("signature"), r["problems"][:2]) for r in recs]
    assert report.ok, summary  # judged against the data: the loss is expected, nothing else is
    lost = [r for r in recs if r["expected_failure"]]
    assert lost, f"six capped live hops kept every write: is the finding fixed in this build? {summary}"
    assert lost[0]["op"] == "live" and lost[0]["signature"] == "varstore-file-lost-writes", summary
    assert any("is missing" in p for p in lost[0]["problems"]), summary
