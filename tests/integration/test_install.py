"""The harness as a new user installs it: a non-editable ``pip install`` of a clone into a
fresh virtualenv, used from a directory outside the checkout.

Before ``harness install-qemu-machine`` (qemu.machine is not on PyPI) pytest on an unrelated
test file passes and ``harness doctor`` says in one line what is missing; after it, doctor
passes, a user's test using ``vm`` gets a real guest (``--fast-start``: restored from the
shared cache's saved boot, which the package's own keys must find), and the nightly runs
from the test module shipped in the package (no checkout's tests/ at hand), its boot row
booting cold.  Builds and images come from the shared cache, as on any machine that ran
``make setup``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT, cache_root

pytestmark = pytest.mark.integration

USER_TESTS = {
    "test_plain.py": "def test_arithmetic():\n    assert 6 * 7 == 42\n",
    "test_guest.py": (
        "def test_guest_runs_linux(vm):\n"
        "    res = vm.ssh.run('uname -s', check=True)\n"
        "    assert res.stdout.strip() == 'Linux'\n"
    ),
}


@pytest.fixture(scope="module")
def venv() -> Iterator[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed (needed to clone the checkout as a user would)")
    work = Path(tempfile.mkdtemp(prefix="hv-install-"))
    try:
        clone = work / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True, timeout=300)
        # what the commit under test has, plus the working tree's uncommitted changes
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              check=True, timeout=60).stdout  # fmt: skip
        if diff:
            subprocess.run(["git", "apply", "--allow-empty"], input=diff, cwd=clone, check=True, timeout=60)
        subprocess.run([sys.executable, "-m", "venv", str(work / "v")], check=True, timeout=300)
        pip = subprocess.run([str(work / "v/bin/pip"), "install", "-q", str(clone)],
                             capture_output=True, text=True, timeout=1200, check=False)  # fmt: skip
        assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
        shutil.rmtree(clone)  # the installed package must not need the clone any more
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(venv: Path, *cmd: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HARNESS_RUNDIR"))}
    env["HARNESS_CACHE"] = str(cache_root())
    env["PATH"] = f"{venv / 'v/bin'}:{env['PATH']}"
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run([str(venv / "v/bin" / cmd[0]), *cmd[1:]], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)  # fmt: skip


def test_installed_package_before_and_after_qemu_machine(venv: Path, tmp_path: Path) -> None:
    user = tmp_path / "user-project"
    user.mkdir()
    for name, text in USER_TESTS.items():
        (user / name).write_text(text)
    site = next((venv / "v/lib").glob("python3*/site-packages"))
    assert (site / "harness/_shipped/firmware/catalog.toml").is_file()
    assert (site / "harness/_shipped/guests/recipes/minimal.toml").is_file()
    assert (site / "harness/nightly/suite/test_matrix.py").is_file()

    # before: an unrelated test file passes; doctor names what is missing in one line
    plain = _run(venv, "pytest", "-q", "-p", "no:cacheprovider", "test_plain.py", cwd=user)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    doctor = _run(venv, "harness", "doctor", cwd=user)
    assert doctor.returncode == 2, doctor.stdout + doctor.stderr
    missing = [line for line in doctor.stdout.splitlines() if line.startswith("missing:")]
    assert len(missing) == 1 and "harness install-qemu-machine" in missing[0], doctor.stdout
    assert "Traceback" not in doctor.stderr

    # the documented command, then everything works outside the checkout
    inst = _run(venv, "harness", "install-qemu-machine", cwd=user)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    doctor = _run(venv, "harness", "doctor", "--json", cwd=user)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert json.loads(doctor.stdout)["missing"] == []
    guest = _run(venv, "pytest", "-v", "-p", "no:cacheprovider", "--fast-start", "test_guest.py", cwd=user)
    assert guest.returncode == 0, guest.stdout[-3000:] + guest.stderr[-3000:]
    assert "test_guest_runs_linux[qemu10.0.2-ovmf2022.11] PASSED" in guest.stdout
    assert sorted(p.name for p in user.iterdir()) == sorted(USER_TESTS), "a passing run leaves nothing"

    # the nightly from the package: its own test module, no checkout
    results = tmp_path / "results"
    nightly = _run(venv, "harness", "nightly", "--scenario", "boot", "--qemu", "10.0.2", "--ovmf",
                   "2022.11", "--jobs", "0", "--results", str(results), cwd=user)  # fmt: skip
    assert nightly.returncode == 0, nightly.stdout[-3000:] + nightly.stderr[-3000:]
    data = json.loads((results / "results.json").read_text())
    assert data["summary"]["passed"] >= 1 and data["summary"]["total"] == data["summary"]["passed"]
    assert all(r["id"].startswith("harness/nightly/suite/test_matrix.py::") for r in data["records"])


REAL_APT_CALLER = """
import sys
from pathlib import Path
from harness.inventory.provision import AptArchive, PackageRef
a = AptArchive(Path(sys.argv[1]), ("bookworm-backports",))
a.update()
print(a.candidate(PackageRef("qemu-system-x86", "bookworm-backports")))
"""


def test_two_cold_callers_share_one_private_apt_state(tmp_path: Path) -> None:
    # real apt-get update and apt-cache on a fresh state, started together as two xdist
    # workers would on a cold cache: both succeed and agree
    root = tmp_path / "apt"
    procs = [subprocess.Popen([sys.executable, "-c", REAL_APT_CALLER, str(root)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]  # fmt: skip
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(out.strip())
    assert outs[0] == outs[1] and outs[0].startswith("1:10.0"), outs
    assert (root / ".apt.lock").exists()
