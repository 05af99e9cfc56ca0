"""The cross-version matrix: pair and chain generation from recorded real builds, numeric
version order, firmware pairs, and the expected-incompatibilities data and its lookup."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from harness import matrix
from harness.errors import CatalogError, ConfigError, UnknownVersionError
from harness.inventory.builds import capabilities_from_qmp
from harness.inventory.catalog import Version
from harness.matrix import Endpoint, FirmwareEndpoint, Incompatibility

PROBES = Path(__file__).parent / "data" / "probe"


def recorded(version: str) -> Endpoint:
    with gzip.open(PROBES / f"qemu-{version}.json.gz") as fh:
        caps = capabilities_from_qmp(**json.load(fh))
    return Endpoint.from_capabilities(version, caps)


@pytest.fixture(scope="module")
def real() -> list[Endpoint]:
    # deliberately out of order: generation must sort numerically
    return [recorded("10.0.2"), recorded("5.2"), recorded("7.2")]


def fake(label: str, *machines: str) -> Endpoint:
    return Endpoint(label, Version.parse(label), machines)


def test_sort_is_numeric_not_lexical() -> None:
    eps = [fake("10.0.2"), fake("7.2"), fake("5.2"), fake("9.10"), fake("9.2")]
    assert [e.label for e in matrix.sort_numeric(eps)] == ["5.2", "7.2", "9.2", "9.10", "10.0.2"]


def test_six_ordered_pairs_of_three_builds(real: list[Endpoint]) -> None:
    pairs = [(a.label, b.label) for a, b in matrix.ordered_pairs(real)]
    assert pairs == [
        ("5.2", "7.2"), ("5.2", "10.0.2"), ("7.2", "5.2"), ("7.2", "10.0.2"),
        ("10.0.2", "5.2"), ("10.0.2", "7.2"),
    ]  # fmt: skip


def test_pair_plans_use_newest_common_machine_from_real_probes(real: list[Endpoint]) -> None:
    plans = {p.name: p for p in matrix.pair_plans(real)}
    assert plans["pair 10.0.2 -> 7.2"].machine == "pc-q35-7.2"
    assert plans["pair 7.2 -> 10.0.2"].machine == "pc-q35-7.2"
    assert plans["pair 5.2 -> 10.0.2"].machine == "pc-q35-5.2"
    assert plans["pair 7.2 -> 5.2"].machine == "pc-q35-5.2"
    for p in plans.values():
        assert p.boot == p.hops[0].source
        assert all(h.machine == p.machine for h in p.hops)


def test_pair_plans_cover_every_ordered_pair_and_op_exactly_once(real: list[Endpoint]) -> None:
    ops = ("live", "save-restore")
    hops = [h for p in matrix.pair_plans(real, ops) for h in p.hops]
    covered = Counter((h.source, h.destination, h.op) for h in hops)
    expected = {(a.label, b.label, op) for a, b in matrix.ordered_pairs(real) for op in ops}
    assert set(covered) == expected
    assert all(n == 1 for n in covered.values())
    # one boot per ordered pair: the second op comes back to where the guest booted
    plan = matrix.pair_plans(real, ops)[0]
    assert [(h.source, h.destination, h.op) for h in plan.hops] == [
        ("5.2", "7.2", "live"), ("7.2", "5.2", "save-restore")]


def test_registering_a_build_adds_its_pairs(real: list[Endpoint]) -> None:
    extra = fake("8.2.1", "pc-q35-5.2", "pc-q35-7.2", "pc-q35-8.2")
    before = {p.name for p in matrix.pair_plans(real)}
    after = {p.name for p in matrix.pair_plans([*real, extra])}
    added = after - before
    assert len(added) == 6
    assert {"pair 8.2.1 -> 10.0.2", "pair 10.0.2 -> 8.2.1", "pair 5.2 -> 8.2.1"} <= added
    plan = next(p for p in matrix.pair_plans([*real, extra]) if p.name == "pair 8.2.1 -> 10.0.2")
    assert plan.machine == "pc-q35-8.2"


def test_no_common_machine_type_is_an_error() -> None:
    with pytest.raises(UnknownVersionError, match="common pc-q35 machine type"):
        matrix.newest_common_machine([fake("1.0", "pc-q35-1.0"), fake("2.0", "pc-q35-2.0")])
    # numeric machine versions: 10.0 beats 9.2 and 7.2
    assert matrix.newest_common_machine([fake("11.0", "pc-q35-7.2", "pc-q35-9.2", "pc-q35-10.0",
                                               "pc-i440fx-11.0", "q35")]) == "pc-q35-10.0"


def test_unknown_or_non_crossing_op_is_refused(real: list[Endpoint]) -> None:
    with pytest.raises(ConfigError, match="cpr-transfer"):
        matrix.pair_plans(real, ("cpr-transfer",))
    with pytest.raises(ConfigError):
        matrix.pair_plans(real, ())


def test_chains_upgrade_then_rollback(real: list[Endpoint]) -> None:
    up, down = matrix.chains(real)
    assert up.name == "upgrade" and down.name == "rollback"
    assert [(h.source, h.destination) for h in up.hops] == [("5.2", "7.2"), ("7.2", "10.0.2")]
    assert up.boot == "5.2" and up.machine == "pc-q35-5.2"
    assert [(h.source, h.destination) for h in down.hops] == [("10.0.2", "7.2")]
    assert down.boot == "10.0.2" and down.follows == "upgrade" and down.machine == up.machine
    assert matrix.chains(real[:1]) == []
    two = matrix.chains([recorded("7.2"), recorded("10.0.2")])
    assert [p.meta["path"] for p in two] == ["7.2 -> 10.0.2", "10.0.2 -> 7.2"]
    assert two[0].machine == "pc-q35-7.2"


def test_firmware_pairs_need_identical_flash_layouts() -> None:
    fws = [FirmwareEndpoint("2025.02", 3653632, 540672), FirmwareEndpoint("2020.11", 1966080, 131072),
           FirmwareEndpoint("2022.11", 3653632, 540672)]
    assert [(a.version, b.version) for a, b in matrix.firmware_pairs(fws)] == [("2022.11", "2025.02")]
    (plan,) = matrix.firmware_plans(fake("10.0.2", "pc-q35-10.0", "pc-q35-7.2"), fws)
    (hop,) = plan.hops
    assert (hop.firmware, hop.dest_firmware, hop.source, hop.destination) == ("2022.11", "2025.02", "10.0.2", "10.0.2")
    assert plan.firmware == "2022.11" and plan.machine == "pc-q35-10.0" and plan.reboot_checks


# --- expected incompatibilities ------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "expected-incompatibilities.toml"
    p.write_text(text)
    return p


GOOD = """
[[incompatible]]
source = ">=10.0"
destination = "5.2"
ops = ["live"]
signature = "device-load-failed"
reason = "backward migration of this device is not supported"

[[incompatible]]
source = "7.2"
destination = "<6"
machine = "pc-q35-5.2"
signature = "section-footer-missing"
reason = "a subsection 5.2 does not know"
"""


def test_lookup_matches_versions_numerically_and_ops(tmp_path: Path) -> None:
    data = matrix.load_incompatibilities(write(tmp_path, GOOD))
    v = Version.parse
    hit = data.lookup(v("10.0.2"), v("5.2.0"), "live", "pc-q35-5.2")
    assert hit is not None and hit.signature == "device-load-failed" and "entry 1" in hit.where
    assert data.lookup(v("10.0.2"), v("5.2.0"), "save-restore", "pc-q35-5.2") is None
    assert data.lookup(v("9.2"), v("5.2.0"), "live", "pc-q35-5.2") is None  # 9.2 < 10.0 numerically
    assert data.lookup(v("10.0.2"), v("7.2.19"), "live", "pc-q35-7.2") is None
    second = data.lookup(v("7.2.19"), v("5.2.0"), "save-restore", "pc-q35-5.2")
    assert second is not None and second.signature == "section-footer-missing"
    assert data.lookup(v("7.2.19"), v("5.2.0"), "live", "pc-q35-4.2") is None
    assert data.lookup(v("7.20"), v("5.2"), "live", "pc-q35-5.2") is None  # 7.20 is not 7.2


def test_shipped_data_file_is_valid() -> None:
    data = matrix.load_incompatibilities()
    for e in data.entries:
        assert e.reason and e.signature


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not toml ===", "not valid TOML"),
        ("incompatible = 3\n", "array of tables"),
        ("[[incompatibility]]\nsource='1'\n", "unknown top-level key"),
        ("[[incompatible]]\ndestination='5.2'\nsignature='load-failed'\nreason='r'\n", "missing field 'source'"),
        ("[[incompatible]]\nsource='ten'\ndestination='5.2'\nsignature='load-failed'\nreason='r'\n",
         "not a version constraint"),
        ("[[incompatible]]\nsource='10'\ndestination='5.2'\nsignature='no-such-sig'\nreason='r'\n",
         "unknown failure signature 'no-such-sig'"),
        ("[[incompatible]]\nsource='10'\ndestination='5.2'\nsignature=[]\nreason='r'\n",
         "field 'signature' must be a name or a non-empty list of names"),
        ("[[incompatible]]\nsource='10'\ndestination='5.2'\nsignature=['load-failed', 'no-such-sig']\nreason='r'\n",
         "unknown failure signature 'no-such-sig'"),
        ("[[incompatible]]\nsource='10'\ndestination='5.2'\nsignature='load-failed'\nreason=''\n",
         "'reason' must be a non-empty string"),
        ("[[incompatible]]\nsource='10'\ndestination='5.2'\nops=['teleport']\nsignature='load-failed'\nreason='r'\n",
         "unknown operation(s) teleport"),
        ("[[incompatible]]\nsource='10'\ndestination='5.2'\nops='live'\nsignature='load-failed'\nreason='r'\n",
         "'ops' must be a list"),
        ("[[incompatible]]\nsource='10'\ndestination='5.2'\nsignature='load-failed'\nreason='r'\nwhy='x'\n",
         "unknown field(s) why"),
    ],
)
def test_malformed_data_file_names_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(CatalogError) as err:
        matrix.load_incompatibilities(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="file not found"):
        matrix.load_incompatibilities(tmp_path / "nope.toml")


def entry(sig: str = "device-load-failed") -> Incompatibility:
    return Incompatibility(">=10", "5.2", ("live",), (sig,), "because", where="f.toml entry 1")


def test_judge() -> None:
    assert matrix.judge(False, None, None) == matrix.Verdict(True, False)
    assert matrix.judge(True, "load-failed", None) == matrix.Verdict(False, False)
    xfail = matrix.judge(True, "device-load-failed", entry())
    assert xfail.expected_failure and not xfail.ok and "because" in xfail.note
    other = matrix.judge(True, "load-failed", entry())
    assert not other.ok and not other.expected_failure and "not the expected device-load-failed" in other.note
    unsig = matrix.judge(True, None, entry())
    assert not unsig.expected_failure and "unclassified" in unsig.note
    stale = matrix.judge(False, None, entry())
    assert not stale.ok and not stale.expected_failure and "passed" in stale.note


def test_an_entry_may_name_several_signatures_of_one_cause(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[[incompatible]]\nsource='<9'\ndestination='>=0'\nops=['live']\nintermittent=true\n"
                    "signature=['guest-ram-differs', 'guest-kernel-panic']\nreason='lost dirty pages'\n")
    data = matrix.load_incompatibilities(path)
    hit = data.lookup(Version.parse("7.2"), Version.parse("10.0.2"), "live", "pc-q35-7.2")
    assert hit is not None and hit.signatures == ("guest-ram-differs", "guest-kernel-panic")
    assert hit.signature == "guest-ram-differs|guest-kernel-panic"
    assert matrix.judge(True, "guest-kernel-panic", hit).expected_failure
    assert matrix.judge(True, "guest-ram-differs", hit).expected_failure
    other = matrix.judge(True, "state-incomplete", hit)
    assert not other.ok and not other.expected_failure
    assert matrix.judge(False, None, hit).ok  # intermittent: passing is fine
    assert data.lookup(Version.parse("10.0.2"), Version.parse("7.2"), "live", "pc-q35-7.2") is None



def _judged(data: matrix.Incompatibilities, src: str, dst: str, signature: str | None, op: str = "live",
            machine: str = "pc-q35-7.2", arch: str = "x86_64") -> matrix.Verdict:
    """As :func:`matrix.judge_result` judges a hop (the builds' versions given here)."""
    expected = data.lookup(Version.parse(src), Version.parse(dst), op, machine, arch=arch, signature=signature)
    return matrix.judge(signature is not None, signature, expected)


def test_the_data_lists_lost_dirty_pages_of_sources_before_9_0() -> None:
    data = matrix.load_incompatibilities()
    for op in ("live", "save-restore"):  # both precopy through the dirty bitmap
        for src, dst in (("7.2", "7.2"), ("7.2", "10.0.2"), ("5.2", "7.2")):
            for sig in ("guest-ram-differs", "guest-kernel-panic"):
                assert _judged(data, src, dst, sig, op=op).expected_failure, (op, src, dst, sig)
            assert _judged(data, src, dst, None, op=op).ok  # intermittent: passing is fine
    # a fixed source is not covered, another failure of a covered hop is not excused, and
    # a hop that stops the guest before it saves (cpr-reboot: one pass, nothing dirtied) is not
    assert not _judged(data, "10.0.2", "7.2", "guest-kernel-panic").expected_failure
    assert not _judged(data, "7.2", "7.2", "state-incomplete").expected_failure
    assert not _judged(data, "7.2", "7.2", "state-incomplete", op="save-restore").expected_failure
    assert not _judged(data, "7.2", "7.2", "guest-kernel-panic", op="cpr-reboot").expected_failure


def test_a_specific_entry_is_not_shadowed_by_an_intermittent_one() -> None:
    # aarch64 7.2 -> 10.0.2 on virt-7.2 must fail with device-load-failed although the
    # lost-dirty-pages entry (any source before 9.0, live) covers the hop too
    data = matrix.load_incompatibilities()
    hop = (Version.parse("7.2"), Version.parse("10.0.2"), "live", "virt-7.2")
    specific = data.lookup(*hop, arch="aarch64")
    assert specific is not None and specific.signature == "device-load-failed"
    other = data.lookup(*hop, arch="aarch64", signature="guest-kernel-panic")
    assert other is not None and other.intermittent
    assert _judged(data, "7.2", "10.0.2", "device-load-failed", machine="virt-7.2", arch="aarch64").expected_failure
    assert not _judged(data, "7.2", "10.0.2", None, machine="virt-7.2", arch="aarch64").ok  # a pass: stale data
