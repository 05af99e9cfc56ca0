"""The plugin's options, ini keys and markers, through pytester inner sessions.

No guest boots here: the inner tests use ``qemu_build``/``firmware`` (probed builds, cached
on disk) or ``vm_factory(start=False)``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.inventory import host

KVM_USABLE = host.probe_kvm().usable
BUILD_TEST = """
def test_build(qemu_build, qemu_version):
    assert qemu_build.capabilities.version.startswith(qemu_version)
"""


def test_qemu_option_runs_once_per_build(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BUILD_TEST)
    res = pytester.runpytest("-v", "--qemu", "7.2", "--qemu", "10.0.2")
    res.assert_outcomes(passed=2)
    res.stdout.fnmatch_lines(["*test_build[[]qemu7.2[]] PASSED*", "*test_build[[]qemu10.0.2[]] PASSED*"])


def test_default_is_one_build(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BUILD_TEST)
    res = pytester.runpytest("-v")
    res.assert_outcomes(passed=1)
    res.stdout.fnmatch_lines(["*test_build[[]qemu10.0.2[]] PASSED*"])


def test_ovmf_option_parametrizes_firmware(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_fw(firmware, ovmf_version):
            assert firmware.version == ovmf_version
            assert firmware.select().code.is_file()
    """)
    res = pytester.runpytest("-v", "--ovmf", "2020.11", "--ovmf", "2025.02", "--ovmf", "2020.11")
    res.assert_outcomes(passed=2)  # a repeated value runs once
    res.stdout.fnmatch_lines(["*test_fw[[]ovmf2020.11[]] PASSED*", "*test_fw[[]ovmf2025.02[]] PASSED*"])


def test_vm_tests_get_both_axes(pytester: pytest.Pytester, harness_rundir: Path) -> None:
    pytester.makepyfile("""
        def test_spec(vm_factory):
            spec = vm_factory.spec()
            assert (spec.qemu, spec.firmware) in {("7.2", "2022.11"), ("7.2", "2025.02"),
                                                  ("10.0.2", "2022.11"), ("10.0.2", "2025.02")}
    """)
    res = pytester.runpytest("-v", "--qemu=7.2", "--qemu=10.0.2", "--ovmf=2022.11", "--ovmf=2025.02")
    res.assert_outcomes(passed=4)
    res.stdout.fnmatch_lines(["*test_spec[[]qemu7.2-ovmf2025.02[]] PASSED*"])


def test_ini_keys(pytester: pytest.Pytester, harness_rundir: Path, tmp_path: Path) -> None:
    art = tmp_path / "kept"
    pytester.makeini(f"""
        [pytest]
        harness_qemu = 7.2 10.0.2
        harness_ovmf = 2025.02
        harness_accel = tcg
        harness_artifacts = {art}
    """)
    pytester.makepyfile("""
        import os

        def test_ini(vm_factory, qemu_build, firmware):
            assert firmware.version == "2025.02"
            assert vm_factory.spec().accel == "tcg"
            assert os.environ["HARNESS_ACCEL"] == "tcg"
            vm_factory(start=False)  # constructs a guest: its artifacts are kept on failure
            assert qemu_build.label != "7.2", "fails on purpose for 7.2"
    """)
    res = pytester.runpytest("-v")
    res.assert_outcomes(passed=1, failed=1)
    res.stdout.fnmatch_lines([
        "*test_ini[[]qemu7.2-ovmf2025.02[]] FAILED*",
        "*test_ini[[]qemu10.0.2-ovmf2025.02[]] PASSED*",
        f"kept in {art}/*test_ini_qemu7.2-ovmf2025.02*",
    ])
    kept = sorted(p.name for p in art.iterdir())
    assert len(kept) == 1 and "qemu7.2" in kept[0], kept


def test_options_override_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("""
        [pytest]
        harness_qemu = 7.2
    """)
    pytester.makepyfile(BUILD_TEST)
    res = pytester.runpytest("-v", "--qemu", "10.0.2")
    res.assert_outcomes(passed=1)
    res.stdout.fnmatch_lines(["*test_build[[]qemu10.0.2[]] PASSED*"])


def test_plugin_restores_accel_environment(pytester: pytest.Pytester,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARNESS_ACCEL", "auto")
    pytester.makepyfile("""
        import os
        def test_env():
            assert os.environ["HARNESS_ACCEL"] == "tcg"
    """)
    pytester.runpytest("--accel", "tcg").assert_outcomes(passed=1)
    import os

    assert os.environ["HARNESS_ACCEL"] == "auto"


# --- usage errors ----------------------------------------------------------------------


def test_bad_accel_option_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    res = pytester.runpytest("--accel", "hvf")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--accel*invalid choice*'hvf'*"])


def test_bad_accel_ini_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("""
        [pytest]
        harness_accel = fast
    """)
    pytester.makepyfile("def test_x(): pass")
    res = pytester.runpytest()
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*harness_accel = 'fast': expected one of auto, kvm, tcg*"])


@pytest.mark.skipif(KVM_USABLE, reason="this host can run KVM guests: --accel kvm is valid")
def test_unusable_kvm_is_a_usage_error_that_says_what_to_do(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    res = pytester.runpytest("--accel", "kvm")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--accel kvm*KVM is unusable*use --accel auto*or --accel tcg*"])


def test_unknown_version_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BUILD_TEST)
    res = pytester.runpytest("--qemu", "9.9")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--qemu 9.9*unknown QEMU version*10.0.2*pass one of*"])
    res = pytester.runpytest("--ovmf", "1999.01")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--ovmf 1999.01*unknown firmware version*2022.11*"])


# --- the requires marker ---------------------------------------------------------------


def test_requires_mode_skips_the_build_that_lacks_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.requires(mode="cpr-transfer")
        def test_cpr(qemu_build):
            assert qemu_build.capabilities.has_mode("cpr-transfer")
    """)
    res = pytester.runpytest("-v", "-rs", "--qemu", "7.2", "--qemu", "10.0.2")
    res.assert_outcomes(passed=1, skipped=1)
    res.stdout.fnmatch_lines([
        "*test_cpr[[]qemu7.2[]] SKIPPED*",
        "*test_cpr[[]qemu10.0.2[]] PASSED*",
        "SKIPPED*QEMU 7.2 lacks migration mode cpr-transfer*",
    ])


def test_requires_version_and_file_uri(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.requires(qemu=">=8.2")
        def test_new(qemu_build):
            pass

        @pytest.mark.requires(file_uri=True)
        def test_file(qemu_build):
            pass
    """)
    res = pytester.runpytest("-rs", "--qemu", "7.2", "--qemu", "10.0.2")
    res.assert_outcomes(passed=2, skipped=2)
    res.stdout.fnmatch_lines_random([
        "SKIPPED*requires QEMU >=8.2; QEMU 7.2 is 7.2.*",
        "SKIPPED*QEMU 7.2 lacks file: migration URIs*",
    ])


def test_requires_closest_marker_wins(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        pytestmark = pytest.mark.requires(mode="cpr-transfer")

        @pytest.mark.requires(mode="normal")
        def test_normal(qemu_build):
            pass
    """)
    pytester.runpytest("--qemu", "7.2").assert_outcomes(passed=1)


@pytest.mark.skipif(KVM_USABLE, reason="this host has VMX/SVM")
def test_requires_kvm_host_skips_here(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.requires(kvm_host=True)
        def test_kvm():
            raise AssertionError("must not run without VMX/SVM")

        @pytest.mark.requires(accel="kvm")
        def test_accel():
            raise AssertionError("must not run without KVM")
    """)
    res = pytester.runpytest("-rs")
    res.assert_outcomes(skipped=2)
    res.stdout.fnmatch_lines_random([
        "SKIPPED*no VMX/SVM host: *",
        "SKIPPED*requires accel=kvm; this host uses tcg*",
    ])


def test_requires_unknown_key_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.requires(flux_capacitor=True)
        def test_x(qemu_build):
            pass
    """)
    res = pytester.runpytest()
    res.assert_outcomes(errors=1)
    res.stdout.fnmatch_lines(["*unknown requirement*flux_capacitor*"])


# --- the library without pytest ----------------------------------------------------------


def test_library_imports_without_pytest() -> None:
    code = (
        "import sys\n"
        "import harness.factory, harness.machine, harness.migration, harness.state\n"
        "import harness.inventory.requirements, harness.varstore, harness.inventory.firmware, harness.inventory.builds\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest', 'xdist'))\n"
        "assert not loaded, loaded\n"
        "f = harness.factory.MachineFactory()\n"
        "spec = f.spec(qemu='7.2')\n"
        "assert spec.qemu == '7.2'\n"
        "f.close()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_artifacts_dir_default_and_relative(pytester: pytest.Pytester, harness_rundir: Path) -> None:
    pytester.makepyfile("""
        def test_guest_fails(vm_factory):
            vm_factory(start=False)
            raise AssertionError("fails on purpose")

        def test_no_guest_fails(vm_factory):
            raise AssertionError("fails without a guest")
    """)
    res = pytester.runpytest()
    res.assert_outcomes(failed=2)
    default = pytester.path / "artifacts"
    assert [p.name for p in default.iterdir()] == ["test_artifacts_dir_default_and_relative.py_test_guest_fails_qemu10.0.2-ovmf2022.11"]
    assert res.stdout.str().count("kept in ") == 1  # only the test that had a guest

    pytester.makeini("""
        [pytest]
        harness_artifacts = kept/here
    """)
    res = pytester.runpytest("-k", "test_guest_fails")
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines([f"kept in {pytester.path}/kept/here/*test_guest_fails*"])


def test_arch_option_picks_the_builds_of_that_arch(pytester: pytest.Pytester, harness_rundir: Path) -> None:
    pytester.makepyfile("""
        def test_arch(qemu_build, firmware, guest_arch, vm_factory, guest_image):
            assert guest_arch == "aarch64"
            assert qemu_build.arch == "aarch64" and qemu_build.binary.name == "qemu-system-aarch64"
            assert firmware.arch == "aarch64"
            spec = vm_factory.spec()
            assert (spec.arch, spec.machine) == ("aarch64", "virt")
            assert guest_image.arch == "aarch64"
    """)
    res = pytester.runpytest("-v", "--arch", "aarch64", "--qemu", "7.2", "--qemu", "10.0.2")
    res.assert_outcomes(passed=2)


def test_arch_ini_key(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nharness_arch = aarch64\n")
    pytester.makepyfile("def test_a(guest_arch, qemu_build):\n"
                        "    assert guest_arch == qemu_build.arch == 'aarch64'\n")  # fmt: skip
    pytester.runpytest().assert_outcomes(passed=1)


def test_unknown_arch_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    res = pytester.runpytest("--arch", "riscv64")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--arch 'riscv64': expected one of aarch64, x86_64*"])


def test_a_version_missing_for_the_arch_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    res = pytester.runpytest("--arch", "aarch64", "--qemu", "5.2")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--qemu 5.2:*"])


def test_harness_artifacts_is_the_tests_own_directory_and_starts_empty(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    art = tmp_path / "art"
    stale = art / "test_art.py_test_scenario" / "old.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("a previous run's")
    pytester.makepyfile(test_art=f"""
from pathlib import Path

def test_scenario(harness_artifacts):
    assert harness_artifacts == Path({str(stale.parent)!r})
    assert not harness_artifacts.exists()
""")
    res = pytester.runpytest("-v", f"--harness-artifacts={art}")
    res.assert_outcomes(passed=1)
