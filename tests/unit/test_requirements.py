"""requires(...) evaluation against recorded capabilities and fake host facts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.inventory import requirements
from harness.inventory.builds import QemuBuild, capabilities_from_qmp
from harness.inventory.catalog import Version
from harness.inventory.host import AccelChoice, HostInfo, KvmInfo

DATA = Path(__file__).parent / "data" / "probe"


def build(version: str) -> QemuBuild:
    with gzip.open(DATA / f"qemu-{version}.json.gz") as fh:
        caps = capabilities_from_qmp(**json.load(fh))
    b = QemuBuild(version, "x86_64", Path("/nonexistent/qemu"))
    b.__dict__["capabilities"] = caps  # cached_property slot: no QEMU is started
    return b


PVM = HostInfo(KvmInfo(True, False, False, None, True, "PVM"), AccelChoice("tcg", "KVM unusable (PVM)"))
KVM = HostInfo(KvmInfo(True, True, False, "intel", False, "VMX"), AccelChoice("kvm", "KVM usable"))


def test_mode_missing_is_named() -> None:
    why = requirements.unmet(build("7.2"), PVM, mode="cpr-transfer")
    assert why is not None and "lacks migration mode cpr-transfer" in why
    assert requirements.unmet(build("10.0.2"), PVM, mode="cpr-transfer") is None
    why = requirements.unmet(build("10.0.2"), PVM, mode="cpr-exec")
    assert why is not None and "cpr-exec" in why


def test_version_requirement_is_numeric() -> None:
    assert requirements.unmet(build("10.0.2"), PVM, qemu=">=8.2") is None
    why = requirements.unmet(build("7.2"), PVM, qemu=">=8.2")
    assert why is not None and "requires QEMU >=8.2" in why
    assert requirements.version_ok(Version.parse("10.0.2"), ">7.2")
    assert requirements.version_ok(Version.parse("7.2.22"), "7.2")
    with pytest.raises(ConfigError):
        requirements.version_ok(Version.parse("1.0"), "~1")


def test_accel_and_kvm_host() -> None:
    why = requirements.unmet(None, PVM, accel="kvm")
    assert why is not None and "tcg" in why
    why = requirements.unmet(None, PVM, kvm_host=True)
    assert why is not None and why.startswith("no VMX/SVM host")
    assert requirements.unmet(None, KVM, accel="kvm") is None
    why = requirements.unmet(None, KVM, nested=True)
    assert why is not None and "nested" in why
    assert requirements.unmet(None, PVM, nested=True) is None  # TCG L1 gets SVM from -cpu max


def test_capability_and_file_uri() -> None:
    assert requirements.unmet(build("10.0.2"), PVM, capability="multifd", file_uri=True) is None
    why = requirements.unmet(build("7.2"), PVM, file_uri=True)
    assert why is not None and "file:" in why
    why = requirements.unmet(build("5.2"), PVM, capability="no-such-cap")
    assert why is not None and "no-such-cap" in why


def test_unknown_requirement_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown requirement"):
        requirements.unmet(None, PVM, gpu=True)
