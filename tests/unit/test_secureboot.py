"""harness.secureboot and harness.tpm comparisons (pure: views built by hand)."""

from __future__ import annotations

from pathlib import Path

from harness import secureboot, signatures, tpm
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


def test_tpm_driver_failures_are_read_from_the_console(tmp_path: Path) -> None:
    console = tmp_path / "qemu-6.serial.log"
    console.write_text(
        "[    1.002000] tpm_tis MSFT0101:00: 2.0 TPM (device-id 0x1, rev-id 1)\n"  # a good probe
        "[    4.246433] tpm tpm0: Operation Timed out\n"  # recorded: the nightly of 2026-11-30
        "[    5.281343] ima: No suitable TPM algorithm for boot aggregate\n"
        "[    6.000000] tpm tpm0: A TPM error (256) occurred attempting the self test\n")
    assert tpm.driver_failures(console) == ["tpm tpm0: Operation Timed out",
                                            "tpm tpm0: A TPM error (256) occurred attempting the self test"]
    assert tpm.driver_failures(tmp_path / "missing.log") == []
    line = f"after a restart on 11.1.3: the guest's TPM driver failed at boot ({console.name}: {tpm.driver_failures(console)[0]})"
    sig = signatures.classify("after a restart on 11.1.3: sha256 PCR(s) 0 changed\n" + line)
    assert sig is not None and sig.name == "guest-tpm-driver-failed"
