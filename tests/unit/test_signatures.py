"""harness.signatures against real QEMU error texts (tests/unit/data/signatures/*.txt).

Each sample file has a header (``# signature: NAME``, ``# source: ...``, ``# how: ...``)
ending at a ``---`` line, then the text exactly as QEMU printed or QMP returned it.  The
samples were recorded with tools/record_signatures.py on this project's machine, or quoted
from a cited report (``source: cited: URL``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import signatures
from harness.errors import ConfigError
from harness.signatures import SIGNATURES, Signature, by_name, classify, classify_all

DATA = Path(__file__).parent / "data" / "signatures"


@dataclass(frozen=True)
class Sample:
    path: Path
    expected: str
    source: str
    text: str


def _load(path: Path) -> Sample:
    raw = path.read_text(encoding="utf-8")
    head, sep, text = raw.partition("\n---\n")
    assert sep, f"{path.name}: no '---' line ends the header"
    fields: dict[str, str] = {}
    for line in head.splitlines():
        key, _, value = line.removeprefix("# ").partition(": ")
        fields.setdefault(key, value)
    assert "signature" in fields and "source" in fields, f"{path.name}: header lacks fields"
    return Sample(path, fields["signature"], fields["source"], text)


SAMPLES = [_load(p) for p in sorted(DATA.glob("*.txt"))]


def _ids(samples: list[Sample]) -> list[str]:
    return [s.path.stem for s in samples]


def test_samples_exist() -> None:
    assert len(SAMPLES) >= 20


@pytest.mark.parametrize("sample", SAMPLES, ids=_ids(SAMPLES))
def test_sample_classifies_to_its_signature(sample: Sample) -> None:
    got = classify(sample.text)
    assert got is not None, f"{sample.path.name}: no signature for {sample.text!r}"
    assert got.name == sample.expected, f"{sample.path.name}: {got.name} != {sample.expected}"


@pytest.mark.parametrize("sample", SAMPLES, ids=_ids(SAMPLES))
def test_sample_source_is_named(sample: Sample) -> None:
    assert sample.source.startswith(("real run here: ", "cited: "))
    if sample.source.startswith("cited: "):
        assert "https://" in sample.source


# The last catch-all has no sample of its own: every real "load of migration failed: X"
# seen so far came with a more specific line.  It must still match real samples.
_CATCH_ALL_ONLY = {"load-failed"}


@pytest.mark.parametrize("sig", SIGNATURES, ids=[s.name for s in SIGNATURES])
def test_every_signature_has_a_real_sample(sig: Signature) -> None:
    assert any(sig.matches(s.text) for s in SAMPLES), f"{sig.name} matches no sample"
    if sig.name not in _CATCH_ALL_ONLY:
        assert any(s.expected == sig.name for s in SAMPLES), f"no sample for {sig.name}"


@pytest.mark.parametrize("sig", SIGNATURES, ids=[s.name for s in SIGNATURES])
def test_samples_of_other_signatures_do_not_classify_to_it(sig: Signature) -> None:
    others = [s for s in SAMPLES if s.expected != sig.name]
    assert others
    wrong = [s.path.name for s in others if classify(s.text) is sig]
    assert not wrong


def test_signature_matches_its_sample_but_not_every_other() -> None:
    # A pattern that matched everything would pass the classify test for whatever ranks
    # first; every specific signature must reject most samples of other kinds.
    for sig in SIGNATURES[:-2]:  # the two generic catch-alls are allowed to be broad
        others = [s for s in SAMPLES if s.expected != sig.name]
        hits = [s.path.name for s in others if sig.matches(s.text)]
        assert len(hits) < len(others) // 3, f"{sig.name} matches too much: {hits}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "qemu-system-x86_64: terminating on signal 15 from pid 1234 (python3)",
        "qemu-system-x86_64: warning: nic e1000.0 has no peer\n",
        "BdsDxe: starting Boot0002 \"UEFI Misc Device\"",
        "load of migration succeeded",
    ],
)
def test_unknown_text_gives_none(text: str) -> None:
    assert classify(text) is None
    assert classify_all(text) == []


def test_footer_beats_the_generic_invalid_argument_that_follows_it() -> None:
    text = (
        "qemu-system-x86_64: check_section_footer: Read section footer failed: -5\n"
        "qemu-system-x86_64: load of migration failed: Invalid argument\n"
    )
    everything = classify_all(text)
    assert [s.name for s in everything] == [
        "section-footer-read", "load-invalid-argument", "load-failed"]
    assert classify(text) is by_name("section-footer-read")


def test_order_is_registry_order_not_text_order() -> None:
    # The generic line comes first in the text; the specific signature still wins.
    text = ("load of migration failed: Invalid argument\n"
            "Unknown savevm section or instance 'kvm-tpr-opt' 0. Make sure ...\n")
    assert classify(text) is by_name("unknown-section")


def test_generic_alone_is_load_invalid_argument() -> None:
    sig = classify("qemu-system-x86_64: load of migration failed: Invalid argument\n")
    assert sig is by_name("load-invalid-argument")
    assert classify("qemu: load of migration failed: Operation not permitted") is by_name(
        "load-failed")


def test_real_footer_sample_classify_all_lists_the_generic_too() -> None:
    sample = next(s for s in SAMPLES if s.path.name.startswith("section-footer-read-cut"))
    names = [s.name for s in classify_all(sample.text)]
    assert names[0] == "section-footer-read"
    assert "load-invalid-argument" in names


def test_evidence_is_the_matching_line() -> None:
    text = ("qemu-system-x86_64: warning: nic e1000.0 has no peer\n"
            "qemu-system-x86_64: Unknown ramblock \"0000:00:05.0/e1000.rom\", cannot accept "
            "migration\nqemu-system-x86_64: load of migration failed: Invalid argument\n")
    sig = classify(text)
    assert sig is not None
    assert sig.evidence(text) == ("qemu-system-x86_64: Unknown ramblock "
                                  "\"0000:00:05.0/e1000.rom\", cannot accept migration")
    assert by_name("no-space").evidence(text) is None


def test_by_name_and_names() -> None:
    assert by_name("ramblock-length-mismatch").name == "ramblock-length-mismatch"
    assert signatures.names() == [s.name for s in SIGNATURES]
    with pytest.raises(ConfigError, match="unknown failure signature 'nope'.*section-footer"):
        by_name("nope")


def test_registry_is_well_formed() -> None:
    names = [s.name for s in SIGNATURES]
    assert len(names) == len(set(names))
    for sig in SIGNATURES:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", sig.name)
        assert sig.explanation.endswith(".") and len(sig.explanation) > 40
        assert sig.source.startswith(("real run here: ", "cited: "))
    # The catch-alls are last, so nothing specific is shadowed by them.
    assert names[-2:] == ["load-invalid-argument", "load-failed"]


def test_bad_entries_are_refused() -> None:
    with pytest.raises(ConfigError, match="slug"):
        signatures.signature("Not A Slug", ["x"], "Explained.", "cited: https://x")
    with pytest.raises(ConfigError, match="no patterns"):
        signatures.signature("empty", [], "Explained.", "cited: https://x")
    with pytest.raises(ConfigError, match="bad pattern"):
        signatures.signature("broken", ["("], "Explained.", "cited: https://x")


def test_custom_registry_can_be_passed() -> None:
    mine = signatures.signature("mine", [r"frobnicated"], "Frobnicated.", "cited: https://x")
    assert classify("the thing frobnicated", [mine]) is mine
    assert classify("the thing frobnicated") is None


def test_signature_is_frozen() -> None:
    sig = by_name("no-space")
    with pytest.raises(AttributeError):
        sig.name = "other"  # type: ignore[misc]
