"""Artifacts of a failed test, through a pytester inner session with two real guests (one
booted, TCG, ~15-30 s; one restored from a saved boot): the failing test keeps its command line, QEMU log, serial log, QMP
transcript and varstore before/after under ``DIR/<test id>/``, and the failure report names
that directory; the passing test leaves nothing behind."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness import state, varstore

pytestmark = pytest.mark.integration

INNER = """
from harness import state

def test_passes(vm_factory):  # restored from a saved boot: its guest checks no boot
    vm = vm_factory(fast=True)
    assert vm.ssh.run("true").rc == 0

def test_fails(vm):
    vm.qmp("query-status")
    state.write_efivar(vm, "HarnessArtifactProbe", b"\\x42\\x43")
    assert vm.ssh.run("echo hello").stdout.strip() == "goodbye", "fails on purpose"
"""


def test_failed_test_keeps_artifacts_passed_test_none(
    pytester: pytest.Pytester, harness_rundir: Path, tmp_path: Path,
    find_qemu: Callable[[str], list[int]],
) -> None:
    art = tmp_path / "art"
    pytester.makepyfile(test_inner=INNER)
    res = pytester.runpytest("-v", f"--harness-artifacts={art}")
    res.assert_outcomes(passed=1, failed=1)
    kept = art / "test_inner.py_test_fails_qemu10.0.2-ovmf2022.11"
    res.stdout.fnmatch_lines([
        "*- harness artifacts -*",
        f"kept in {kept}",
        "*short test summary*",
    ])
    assert sorted(p.name for p in art.iterdir()) == [kept.name]  # nothing for test_passes
    guest = kept / "1-vm"
    names = {p.name for p in guest.iterdir()}
    expected = {"qemu-0.cmdline.txt", "qemu-0.log", "qemu-0.serial.log", "qemu-0.qmp.log",
                "varstore-before.fd", "varstore-after.fd"}  # fmt: skip
    assert expected <= names, names
    assert "qemu-system-x86_64" in (guest / "qemu-0.cmdline.txt").read_text()
    assert "HARNESS-READY" in (guest / "qemu-0.serial.log").read_text(errors="replace")
    assert '"execute": "query-status"' in (guest / "qemu-0.qmp.log").read_text()
    before = varstore.read_varstore(guest / "varstore-before.fd")
    after = varstore.read_varstore(guest / "varstore-after.fd")
    key = ("HarnessArtifactProbe", state.HARNESS_GUID)
    assert key not in before.variables
    assert after.variables[key].data == b"\x42\x43"
    report = (kept / "failure.txt").read_text()
    assert "fails on purpose" in report and "test_fails" in report
    # the worker's private directories are gone and no QEMU is left
    assert list(harness_rundir.iterdir()) == []
    assert find_qemu(str(harness_rundir)) == []


def test_vm_fixture_boots_the_arch_asked_for(
    pytester: pytest.Pytester, harness_rundir: Path, find_qemu: Callable[[str], list[int]],
) -> None:
    pytester.makepyfile(test_inner="""
        def test_uname(vm, guest_arch):
            assert vm.spec.arch == guest_arch == "aarch64"
            assert vm.ssh.run("uname -m").stdout.strip() == "aarch64"
    """)
    res = pytester.runpytest("-v", "--arch", "aarch64", "--fast-start")  # the arch is the check, not the boot
    res.assert_outcomes(passed=1)
    assert find_qemu(str(harness_rundir)) == []
