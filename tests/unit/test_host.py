"""Accelerator choice by evidence, on fake /sys and /proc trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import HostError
from harness.inventory import host


def _tree(tmp_path: Path, flags: str, modules: dict[str, str | None], kvm: bool) -> tuple[Path, Path, Path]:
    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    proc.mkdir()
    (proc / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu {flags} sse2\n")
    for mod, nested in modules.items():
        d = sysfs / "module" / mod / "parameters"
        d.mkdir(parents=True)
        if nested is not None:
            (d / "nested").write_text(nested + "\n")
    dev = tmp_path / "kvm"
    if kvm:
        dev.write_text("")
    return sysfs, proc, dev


def test_pvm_host_falls_back_to_tcg_and_says_why(tmp_path: Path) -> None:
    info = host.probe_kvm(*_tree(tmp_path, "", {"kvm": None, "kvm_pvm": None}, kvm=True))
    assert info.present and not info.usable and info.pvm
    assert "PVM" in info.reason
    choice = host.choose_accel(info)
    assert choice.chosen == "tcg" and "PVM" in choice.reason
    with pytest.raises(HostError, match="KVM is unusable"):
        host.choose_accel(info, "kvm")


def test_vmx_host_uses_kvm_and_reports_nested(tmp_path: Path) -> None:
    info = host.probe_kvm(*_tree(tmp_path, "vmx", {"kvm": None, "kvm_intel": "Y"}, kvm=True))
    assert info.usable and info.nested and info.vendor == "intel"
    assert host.choose_accel(info).chosen == "kvm"
    assert host.choose_accel(info, "tcg").chosen == "tcg"


def test_svm_without_nested(tmp_path: Path) -> None:
    info = host.probe_kvm(*_tree(tmp_path, "svm", {"kvm": None, "kvm_amd": "0"}, kvm=True))
    assert info.usable and not info.nested and info.vendor == "amd"


def test_no_dev_kvm(tmp_path: Path) -> None:
    info = host.probe_kvm(*_tree(tmp_path, "vmx", {"kvm_intel": "1"}, kvm=False))
    assert not info.present and not info.usable
    assert host.choose_accel(info).chosen == "tcg"


def test_module_not_loaded(tmp_path: Path) -> None:
    info = host.probe_kvm(*_tree(tmp_path, "svm", {}, kvm=True))
    assert not info.usable and "kvm_amd" in info.reason


def test_bad_accel_option() -> None:
    with pytest.raises(HostError, match="auto, kvm or tcg"):
        host.choose_accel(host.probe_kvm(), "xen")


def test_this_machine_is_reported_honestly() -> None:
    info = host.probe_kvm()
    if Path("/sys/module/kvm_pvm").exists():
        assert not info.usable and info.pvm
