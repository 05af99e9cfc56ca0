"""The plugin costs a session that uses none of its fixtures nothing: it is loaded (it
registers its options), but reads no catalogue, probes no KVM and imports no qemu.machine.
A guest fixture without qemu.machine fails with one line naming the command that installs
it.  Each inner session runs in its own process, with a conftest that turns what the plugin
must not touch into errors."""

from __future__ import annotations

import pytest

SABOTAGE = """
import sys

import harness.inventory.catalog
import harness.inventory.host

sys.modules["qemu"] = None  # `import qemu...` now raises ImportError, as when not installed


def _forbidden(*args, **kwargs):
    raise RuntimeError("the plugin touched what a session without guests must not touch")


harness.inventory.catalog.default = _forbidden
harness.inventory.host.probe_kvm = _forbidden
"""


def test_a_session_without_guests_pays_nothing(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(SABOTAGE)
    pytester.makepyfile(test_a="def test_a():\n    assert 1 + 1 == 2\n")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    res.assert_outcomes(passed=1)
    assert "harness" in "\n".join(pytester.runpytest_subprocess("--help").outlines)


def test_a_guest_without_qemu_machine_fails_in_one_line_naming_the_fix(pytester: pytest.Pytester) -> None:
    pytester.makeconftest('import sys\nsys.modules["qemu"] = None\n')
    pytester.makepyfile(test_vm="def test_vm(vm):\n    pass\n")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    res.assert_outcomes(errors=1)
    res.stdout.fnmatch_lines(["*qemu.machine is not installed*harness install-qemu-machine*"])
