"""harness.secureboot and harness.tpm comparisons (pure: views built by hand)."""

from __future__ import annotations

from harness import secureboot, tpm
from harness.secureboot import SbView

KEYS = {"PK": "aa", "KEK": "bb", "db": "cc", "dbx": "dd"}
LOCKED = ["0000000000030000-000000000004ffff (prio 1): smbase-blackhole",
          "0000000000030000-000000000004ffff (prio 0): alias smbase-window @ram0 0000000000030000-000000000004ffff"]


def view(**kw: object) -> SbView:
    base: dict[str, object] = dict(secure_boot=1, setup_mode=0, guest_keys=dict(KEYS), file_keys=dict(KEYS),
                                   mtree=list(LOCKED), xp={"0x30000+0x10000": "ff"}, devmem={"0x30000+0x10000": "denied:x"})
    base.update(kw)
    return SbView(**base)  # type: ignore[arg-type]


def test_identical_views_have_no_problems_and_print_order_does_not_matter() -> None:
    assert secureboot.problems(view(), view(mtree=list(reversed(LOCKED)))) == []


def test_a_lost_smbase_lock_is_named_and_classified() -> None:
    from harness import signatures

    out = secureboot.problems(view(), view(mtree=[], xp={"0x30000+0x10000": "00"}), "after live 10.0.2 -> 10.0.2")
    assert any("source only" in p and "smbase-blackhole" in p for p in out), out
    assert any("HMP xp changed (ff -> 00)" in p for p in out), out
    sig = signatures.classify("\n".join(out))
    assert sig is not None and sig.name == "smbase-lock-lost"


def test_keys_setup_mode_and_file_divergence_are_reported() -> None:
    changed = dict(KEYS, db="ee")
    out = secureboot.problems(view(), view(setup_mode=1, file_keys=changed))
    assert any("SecureBoot=1 SetupMode=1" in p for p in out), out
    assert any("db changed in the varstore file (cc -> ee)" in p for p in out), out
    assert any("db differs between the guest's view and the varstore file" in p for p in out), out


def test_tpm_views_compared() -> None:
    a = tpm.TpmView({0: "11", 7: "22"}, "ev", "6861726e65737321")
    assert tpm.problems(a, tpm.TpmView(dict(a.pcrs), "ev", a.nv)) == []
    out = tpm.problems(a, tpm.TpmView({0: "11", 7: "99"}, "ev2", "rc:0000018b"))
    assert any("PCR(s) 7 changed (PCR 7: 22 -> 99)" in p for p in out), out
    assert any("event log changed" in p for p in out) and any("reads rc:0000018b" in p for p in out), out
    assert tpm.problems(tpm.TpmView(), tpm.TpmView())[0].endswith("saw no TPM PCRs before the hop")


def test_memory_tree_lines_compare_across_versions() -> None:
    old = ("    0000000000000000-00000000ffffffff (prio 0, i/o): smram\n"
           "  0000000000030000-000000000004ffff (prio 1, i/o): smbase-blackhole\n"
           "  00000000000c0000-00000000000dffff (prio 1, ram): pc.rom\n")
    new = ("    0000000000000000-00000000ffffffff (prio 0, container): smram\n"
           "  0000000000030000-000000000004ffff (prio 1, i/o): smbase-blackhole\n")
    assert secureboot.normalize_mtree(old) == secureboot.normalize_mtree(new)
    assert secureboot.normalize_mtree(old) == [
        "0000000000000000-00000000ffffffff (prio 0): smram",
        "0000000000030000-000000000004ffff (prio 1): smbase-blackhole"]
