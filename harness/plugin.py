"""The pytest plugin: options, hooks and fixtures only; the work is in the library.

Options (also settable as ini keys ``harness_qemu``, ``harness_ovmf``, ``harness_accel``,
``harness_artifacts``)::

    --qemu VERSION   (repeatable) QEMU builds; tests using guests run once per build
    --ovmf VERSION   (repeatable) OVMF builds; likewise
    --accel auto|kvm|tcg
    --harness-artifacts DIR   where a failed test's artifacts are kept

Fixtures: ``qemu_build``, ``firmware``, ``guest_image``, ``vm`` (a started default UEFI
guest), ``vm_factory(**spec)`` (guests from specs; all torn down at the end).

Marker: ``@pytest.mark.requires(qemu=">=8.2", mode="cpr-transfer", accel="kvm",
nested=True, capability="multifd", file_uri=True, kvm_host=True)`` skips with the missing
capability named.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import builds, host, requirements
from harness.factory import MachineFactory, private_base, safe_name
from harness.machine import Machine
from harness.spec import VmSpec

DEFAULT_QEMU = "10.0.2"
DEFAULT_OVMF = "2022.11"
_REPORT_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
_ARTIFACTS_KEY = pytest.StashKey[Path]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "QEMU survival harness")
    group.addoption("--qemu", action="append", default=None, metavar="VERSION",
                    help="QEMU build to test (repeatable; default %s)" % DEFAULT_QEMU)
    group.addoption("--ovmf", action="append", default=None, metavar="VERSION",
                    help="OVMF build to test (repeatable; default %s)" % DEFAULT_OVMF)
    group.addoption("--accel", default=None, choices=["auto", "kvm", "tcg"],
                    help="accelerator (default auto: KVM only where it can run guests)")
    group.addoption("--harness-artifacts", default=None, metavar="DIR",
                    help="keep a failed test's logs, QMP transcript and varstores here")
    parser.addini("harness_qemu", "QEMU builds (whitespace separated)", type="args", default=[])
    parser.addini("harness_ovmf", "OVMF builds (whitespace separated)", type="args", default=[])
    parser.addini("harness_accel", "accelerator: auto, kvm or tcg", default="auto")
    parser.addini("harness_artifacts", "artifacts directory for failed tests", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(**caps): skip unless the QEMU build/host offers these capabilities "
        "(qemu='>=8.2', mode='cpr-transfer', accel='kvm', nested=True, capability='multifd', "
        "file_uri=True, kvm_host=True)",
    )
    accel = config.getoption("--accel") or config.getini("harness_accel") or "auto"
    if accel not in ("auto", "kvm", "tcg"):
        raise pytest.UsageError(f"harness_accel = {accel!r}: expected auto, kvm or tcg")
    try:
        host.choose_accel(host.probe_kvm(), accel)
    except Exception as exc:  # noqa: BLE001 - becomes a usage error that says what to do
        raise pytest.UsageError(f"--accel {accel}: {exc}; use --accel auto or tcg") from None
    os.environ["HARNESS_ACCEL"] = accel


def _values(config: pytest.Config, option: str, ini: str, default: str) -> list[str]:
    opt = config.getoption(option)
    if opt:
        return list(dict.fromkeys(opt))
    val = config.getini(ini)
    return list(val) if val else [default]


def qemu_versions(config: pytest.Config) -> list[str]:
    return _values(config, "--qemu", "harness_qemu", DEFAULT_QEMU)


def ovmf_versions(config: pytest.Config) -> list[str]:
    return _values(config, "--ovmf", "harness_ovmf", DEFAULT_OVMF)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if "qemu_version" in names and "qemu_version" not in _direct_params(metafunc):
        metafunc.parametrize("qemu_version", qemu_versions(metafunc.config), scope="function",
                             ids=lambda v: f"qemu{v}")  # fmt: skip
    if "ovmf_version" in names and "ovmf_version" not in _direct_params(metafunc):
        metafunc.parametrize("ovmf_version", ovmf_versions(metafunc.config), scope="function",
                             ids=lambda v: f"ovmf{v}")  # fmt: skip


def _direct_params(metafunc: pytest.Metafunc) -> set[str]:
    out: set[str] = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0]
        if isinstance(argnames, str):
            out.update(a.strip() for a in argnames.split(","))
        else:
            out.update(argnames)
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    marks = list(item.iter_markers("requires"))
    if not marks:
        return
    req: dict[str, Any] = {}
    for mark in reversed(marks):  # closest marker wins
        req.update(mark.kwargs)
    params = getattr(getattr(item, "callspec", None), "params", {})
    version = params.get("qemu_version") or qemu_versions(item.config)[0]
    info = host.probe(os.environ.get("HARNESS_ACCEL", "auto"))
    need_build = any(k not in ("accel", "kvm_host", "nested") for k in req)
    build = builds.get_build(str(version)) if need_build else None
    why = requirements.unmet(build, info, **req)
    if why:
        pytest.skip(why)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    rep: pytest.TestReport = yield
    item.stash.setdefault(_REPORT_KEY, {})[rep.when] = rep
    path = item.stash.get(_ARTIFACTS_KEY, None)
    if rep.failed and path is not None:
        rep.sections.append(("harness artifacts", f"kept in {path}"))
    return rep


def _failed(item: pytest.Item) -> bool:
    reports = item.stash.get(_REPORT_KEY, {})
    return any(r.failed for r in reports.values())


def artifacts_root(config: pytest.Config) -> Path:
    opt = config.getoption("--harness-artifacts") or config.getini("harness_artifacts")
    return Path(opt) if opt else Path(config.rootpath) / "artifacts"


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture
def qemu_version(request: pytest.FixtureRequest) -> str:
    """The QEMU version under test (parametrized from ``--qemu``)."""
    return str(getattr(request, "param", qemu_versions(request.config)[0]))


@pytest.fixture
def ovmf_version(request: pytest.FixtureRequest) -> str:
    """The OVMF version under test (parametrized from ``--ovmf``)."""
    return str(getattr(request, "param", ovmf_versions(request.config)[0]))


@pytest.fixture
def qemu_build(qemu_version: str) -> builds.QemuBuild:
    """The QEMU build under test, provisioned and probed."""
    return builds.get_build(qemu_version)


@pytest.fixture
def firmware(ovmf_version: str) -> Any:
    """The OVMF build under test (a :class:`harness.firmware.FirmwareBuild`)."""
    from harness import firmware as fw

    return fw.get_firmware(ovmf_version)


@pytest.fixture
def guest_image() -> Any:
    """The ``minimal`` guest image (built and cached on first use)."""
    from harness import images

    return images.ensure_image("minimal")


@pytest.fixture(scope="session")
def _harness_base(request: pytest.FixtureRequest) -> Iterator[Path]:
    worker = getattr(request.config, "workerinput", {}).get("workerid", "main")
    base = private_base(tag=f"-{worker}")
    yield base
    import shutil

    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest, _harness_base: Path, qemu_version: str,
               ovmf_version: str) -> Iterator[MachineFactory]:
    """``vm_factory(**spec)`` starts guests; every one is torn down at the end of the test,
    and a failed test keeps their artifacts under ``--harness-artifacts``."""
    dest = artifacts_root(request.config) / safe_name(request.node.nodeid)
    request.node.stash[_ARTIFACTS_KEY] = dest
    base = _harness_base / safe_name(request.node.name, 40)
    factory = MachineFactory(VmSpec(qemu=qemu_version, firmware=ovmf_version), base=base)
    try:
        yield factory
    finally:
        factory.close(failed=_failed(request.node), artifacts=dest)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def vm(vm_factory: MachineFactory) -> Machine:
    """A started default UEFI guest (split pflash, private varstore, SSH ready)."""
    return vm_factory()


def pytest_sessionfinish(session: pytest.Session) -> None:
    from harness.qemu_process import reap_all

    reap_all()
