"""The pytest plugin: options, hooks and fixtures only; the work is in the library.

Loaded through the ``pytest11`` entry point, so installing the package is enough.

Options (also settable as ini keys ``harness_qemu``, ``harness_ovmf``, ``harness_accel``,
``harness_artifacts`` in ``pytest.ini`` / ``[tool.pytest.ini_options]``)::

    --qemu VERSION   (repeatable) QEMU builds; tests using guests run once per build
    --ovmf VERSION   (repeatable) OVMF builds; likewise
    --accel auto|kvm|tcg
    --harness-artifacts DIR   where a failed test's artifacts are kept (default ./artifacts)

Command-line values win over ini values.  Bad values (an accelerator this host cannot
run, a version nobody catalogued) stop the run with a :class:`pytest.UsageError` that
says what to pass instead.

Fixtures: ``qemu_build``, ``firmware``, ``guest_image``, ``vm`` (a started default UEFI
guest), ``vm_factory(**spec)`` (guests from specs; all torn down at the end of the test),
``harness_artifacts`` (the test's artifacts directory, for scenarios it runs itself).
Tests using ``qemu_build``/``vm``/``vm_factory`` are parametrized over ``--qemu`` (ids
``qemu10.0.2``), tests using ``firmware``/``vm``/``vm_factory`` over ``--ovmf`` (ids
``ovmf2022.11``).

Marker: ``@pytest.mark.requires(qemu=">=8.2", mode="cpr-transfer", accel="kvm",
nested=True, capability="multifd", file_uri=True, kvm_host=True)`` skips with the missing
capability named (see :mod:`harness.inventory.requirements`).

Artifacts: when a test that used ``vm``/``vm_factory`` fails, every guest's QEMU command
line, QEMU log, serial log, QMP transcript and varstore before/after are copied to
``DIR/<test id>/<guest>/`` and the failure report names that directory; a passing test
leaves nothing behind.

xdist: each worker works in its own private directory (named after the worker id); the
caches (provisioned builds, images) are guarded by file locks in the library.  At the end
of a session the plugin kills any QEMU this session started and did not reap; QEMU is
also started with a parent-death signal, so a killed worker leaves no orphan.  SIGTERM and
SIGHUP stop a session as Ctrl-C does, so its fixtures' teardown still runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.errors import HarnessError, HostError
from harness.factory import MachineFactory, private_base, safe_name
from harness.guest import speed
from harness.guest.qemu_process import live_processes, qemu_machine_missing
from harness.inventory import builds, catalog, host, requirements
from harness.inventory.catalog import DEFAULT_FIRMWARE, DEFAULT_QEMU
from harness.machine import Machine
from harness.spec import VmSpec

DEFAULT_OVMF = DEFAULT_FIRMWARE
ACCELS = ("auto", "kvm", "tcg")

_REPORT_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()
_FACTORY_KEY = pytest.StashKey[tuple[MachineFactory, Path]]()
_ACCEL_KEY = pytest.StashKey[host.AccelChoice]()
_HOST_KEY = pytest.StashKey[host.HostInfo]()
_ENV_KEY = pytest.StashKey[str | None]()
_LIVE_KEY = pytest.StashKey[set[int]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "QEMU survival harness")
    group.addoption("--qemu", action="append", default=None, metavar="VERSION",
                    help="QEMU build to test (repeatable; a catalogue version or a path; "
                         f"default {DEFAULT_QEMU})")  # fmt: skip
    group.addoption("--ovmf", action="append", default=None, metavar="VERSION",
                    help=f"OVMF build to test (repeatable; default {DEFAULT_OVMF})")
    group.addoption("--arch", default=None, metavar="ARCH",
                    help="guest architecture: x86_64 (default) or aarch64; the QEMU and "
                         "firmware versions are looked up for it")  # fmt: skip
    group.addoption("--accel", default=None, choices=list(ACCELS),
                    help="accelerator (default auto: KVM only where it can run guests)")
    group.addoption("--harness-artifacts", default=None, metavar="DIR",
                    help="keep a failed test's logs, QMP transcript and varstores here "
                         "(default: artifacts/ under the rootdir)")  # fmt: skip
    parser.addini("harness_qemu", "QEMU builds (whitespace separated)", type="args", default=[])
    parser.addini("harness_ovmf", "OVMF builds (whitespace separated)", type="args", default=[])
    parser.addini("harness_accel", "accelerator: auto, kvm or tcg", default="auto")
    parser.addini("harness_arch", "guest architecture: x86_64 or aarch64", default="x86_64")
    parser.addini("harness_artifacts", "artifacts directory for failed tests", default="")
    group.addoption("--fast-start", action="store_true", default=None,
                    help="restore the `vm` fixture's guest from a saved boot instead of booting it")
    parser.addini("harness_fast_start", "restore the `vm` fixture's guest from a saved boot",
                  type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "requires(**caps): skip unless the QEMU build/host offers these capabilities "
        "(qemu='>=8.2', mode='cpr-transfer', accel='kvm', nested=True, capability='multifd', "
        "file_uri=True, kvm_host=True)",
    )
    _terminate_as_interrupt(config)
    _open_speed_log(config)
    # A session that names none of the harness's options pays nothing here: the catalogue
    # is read and KVM probed when a test first needs a guest (_checked).  Options given
    # explicitly are checked now, so a typo stops the run before anything is collected.
    if _asked(config):
        _checked(config)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


_SIGNALS_KEY = pytest.StashKey[list[signal.Signals]]()


def _terminate_as_interrupt(config: pytest.Config) -> None:
    """SIGTERM and SIGHUP (a job runner stopping the job, ``kill``, a closed terminal) stop
    the session as Ctrl-C does, in the controller and in every xdist worker: pytest then
    tears down every fixture, so guests are reaped and private directories and the speed
    log removed, where the default action would end the process with none of it.  A
    handler someone else installed is left alone; ours are undone at unconfigure."""
    taken: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _interrupted)
                taken.append(sig)
    config.stash[_SIGNALS_KEY] = taken


def _restore_signals(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in config.stash.get(_SIGNALS_KEY, []):
            if signal.getsignal(sig) is _interrupted:
                signal.signal(sig, signal.SIG_DFL)


_SPEED_KEY = pytest.StashKey[Path]()
_COLD_BOOT_ROWS = 12


def _open_speed_log(config: pytest.Config) -> None:
    """The controller keeps the session's cold-boot log (its xdist workers inherit the
    variable); the terminal summary reports the run's speed index from it."""
    if hasattr(config, "workerinput") or os.environ.get(speed.ENV_VAR):
        return
    fd, name = tempfile.mkstemp(prefix="hv-speed-", suffix=".jsonl")
    os.close(fd)
    config.stash[_SPEED_KEY] = Path(name)
    os.environ[speed.ENV_VAR] = name


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    path = config.stash.get(_SPEED_KEY, None)
    if path is None:  # an xdist worker, or a session inside another's log
        return
    index = speed.read_index(path)
    if index is not None:
        terminalreporter.write_line(f"harness speed index: {index}")
    rows = speed.cold_boots_by_test(path)
    if rows:
        total = sum(r.seconds for r in rows)
        terminalreporter.write_line(f"harness cold boots: {sum(r.boots for r in rows)} in {len(rows)} tests, "
                                    f"{total:.0f} s; the most (a test that checks no boot could start fast):")  # fmt: skip
        for r in rows[:_COLD_BOOT_ROWS]:
            terminalreporter.write_line(f"  {r.seconds:7.1f} s  {r.boots:2d}  {r.test}")


def _asked(config: pytest.Config) -> bool:
    if any(config.getoption(o) for o in ("--qemu", "--ovmf", "--arch", "--accel")):
        return True
    return bool(config.getini("harness_qemu") or config.getini("harness_ovmf")
                or str(config.getini("harness_arch")).strip() not in ("", "x86_64")
                or str(config.getini("harness_accel")).strip() not in ("", "auto"))


def _checked(config: pytest.Config) -> None:
    """Check the run's accelerator, architecture and versions (once), and publish the
    accelerator to library code that starts guests outside the fixtures (scenarios,
    helpers) through HARNESS_ACCEL; restored in pytest_unconfigure."""
    if _ACCEL_KEY in config.stash:
        return
    choice = _accel_choice(config)
    _check_arch(config)
    _check_versions(config)
    config.stash[_ENV_KEY] = os.environ.get("HARNESS_ACCEL")
    config.stash[_ACCEL_KEY] = choice
    os.environ["HARNESS_ACCEL"] = choice.chosen


def pytest_unconfigure(config: pytest.Config) -> None:
    _restore_signals(config)
    speed_log = config.stash.get(_SPEED_KEY, None)
    if speed_log is not None:
        speed_log.unlink(missing_ok=True)
        if os.environ.get(speed.ENV_VAR) == str(speed_log):
            del os.environ[speed.ENV_VAR]
    if _ENV_KEY not in config.stash:
        return
    previous = config.stash[_ENV_KEY]
    if previous is None:
        os.environ.pop("HARNESS_ACCEL", None)
    else:
        os.environ["HARNESS_ACCEL"] = previous


def _accel_choice(config: pytest.Config) -> host.AccelChoice:
    opt = config.getoption("--accel")
    wanted = str(opt or config.getini("harness_accel") or "auto").strip()
    source = "--accel" if opt else "harness_accel"
    if wanted not in ACCELS:
        raise pytest.UsageError(
            f"{source} = {wanted!r}: expected one of {', '.join(ACCELS)} "
            "(auto picks KVM only where it can run ordinary guests)"
        )
    try:
        return host.choose_accel(host.probe_kvm(), wanted)
    except HarnessError as exc:
        raise pytest.UsageError(
            f"{source} {wanted}: {exc}; use --accel auto (falls back to TCG) or --accel tcg"
        ) from None


def arch(config: pytest.Config) -> str:
    """The guest architecture of this run (``--arch``, else ``harness_arch``)."""
    return str(config.getoption("--arch") or config.getini("harness_arch") or "x86_64").strip()


def _check_arch(config: pytest.Config) -> None:
    known = sorted({e.arch for e in catalog.default().qemu})
    wanted = arch(config)
    if wanted not in known:
        source = "--arch" if config.getoption("--arch") else "harness_arch"
        raise pytest.UsageError(f"{source} {wanted!r}: expected one of {', '.join(known)} "
                                "(the architectures the QEMU catalogue has builds for)")


def _check_versions(config: pytest.Config) -> None:
    """Unknown versions (for this run's architecture) stop the run now, naming the ones
    that exist."""
    cat = catalog.default()
    a = arch(config)
    for label, versions, lookup in (
        ("--qemu", qemu_versions(config), cat.qemu_entry),
        ("--ovmf", ovmf_versions(config), cat.firmware_entry),
    ):
        for v in versions:
            if label == "--qemu" and "/" in v:
                continue  # a path to a build of the user's own
            try:
                lookup(v, a)
            except HarnessError as exc:
                hint = " or a path to a QEMU build" if label == "--qemu" else ""
                raise pytest.UsageError(
                    f"{label} {v}: {exc}; pass one of the available versions{hint}"
                ) from None


def _values(config: pytest.Config, option: str, ini: str, default: str) -> list[str]:
    opt = config.getoption(option)
    if opt:
        return list(dict.fromkeys(opt))
    val = config.getini(ini)
    return list(dict.fromkeys(val)) if val else [default]


def qemu_versions(config: pytest.Config) -> list[str]:
    """The QEMU versions of this run (``--qemu``, else ``harness_qemu``, else the default)."""
    return _values(config, "--qemu", "harness_qemu", DEFAULT_QEMU)


def ovmf_versions(config: pytest.Config) -> list[str]:
    """The OVMF versions of this run (``--ovmf``, else ``harness_ovmf``, else the default)."""
    return _values(config, "--ovmf", "harness_ovmf", DEFAULT_OVMF)


def accel_choice(config: pytest.Config) -> host.AccelChoice:
    """The accelerator this run uses, and why (probed on first use)."""
    _checked(config)
    return config.stash[_ACCEL_KEY]


def artifacts_root(config: pytest.Config) -> Path:
    opt = config.getoption("--harness-artifacts") or config.getini("harness_artifacts")
    root = Path(opt) if opt else Path("artifacts")
    return root if root.is_absolute() else Path(config.rootpath) / root


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    direct = _direct_params(metafunc)
    if "qemu_version" in names and "qemu_version" not in direct:
        metafunc.parametrize("qemu_version", qemu_versions(metafunc.config), scope="function",
                             ids=lambda v: f"qemu{v}")  # fmt: skip
    if "ovmf_version" in names and "ovmf_version" not in direct:
        metafunc.parametrize("ovmf_version", ovmf_versions(metafunc.config), scope="function",
                             ids=lambda v: f"ovmf{v}")  # fmt: skip


def _direct_params(metafunc: pytest.Metafunc) -> set[str]:
    out: set[str] = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(argnames, str):
            out.update(a.strip() for a in argnames.split(","))
        else:
            out.update(argnames)
    return out


# --- hooks ---------------------------------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_LIVE_KEY] = {id(p) for p in live_processes()}
    if hasattr(session.config, "workerinput"):
        _die_with_controller()


_ORPHAN_GRACE = 20.0


def _die_with_controller() -> None:
    """An xdist worker whose controller is gone (SIGKILLed with everything above it) stops
    as on SIGTERM, tearing down its guests and directories, and is SIGKILLed if that
    takes longer than ``_ORPHAN_GRACE``; then its QEMUs and swtpms die with it (their
    parent-death signal), and the next run sweeps its directories."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # the session's teardown runs (see above)
        time.sleep(_ORPHAN_GRACE)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="harness-parent-watch", daemon=True).start()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    marks = list(item.iter_markers("requires"))
    if not marks:
        return
    req: dict[str, Any] = {}
    for mark in reversed(marks):  # the closest marker wins
        req.update(mark.kwargs)
    params = getattr(getattr(item, "callspec", None), "params", {})
    version = params.get("qemu_version") or qemu_versions(item.config)[0]
    config = item.config
    if _HOST_KEY not in config.stash:
        config.stash[_HOST_KEY] = host.probe(accel_choice(config).chosen)
    need_build = any(k not in ("accel", "kvm_host", "nested") for k in req)
    build = builds.get_build(str(version), arch(config)) if need_build else None
    why = requirements.unmet(build, config.stash[_HOST_KEY], **req)
    if why:
        pytest.skip(why)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep: pytest.TestReport = yield
    item.stash.setdefault(_REPORT_KEY, {})[rep.when] = rep
    owned = item.stash.get(_FACTORY_KEY, None)
    if rep.failed and owned is not None and owned[0].machines:
        rep.sections.append(("harness artifacts", f"kept in {owned[1]}"))
    return rep


def _failed_reports(item: pytest.Item) -> list[pytest.TestReport]:
    return [r for r in item.stash.get(_REPORT_KEY, {}).values() if r.failed]


def pytest_sessionfinish(session: pytest.Session) -> None:
    # last resort: QEMUs this session started and nobody reaped (an interrupted teardown)
    before = session.config.stash.get(_LIVE_KEY, set())
    for proc in live_processes():
        if id(proc) not in before:
            proc.kill()


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
def guest_arch(request: pytest.FixtureRequest) -> str:
    """The guest architecture of this run (``--arch``)."""
    _checked(request.config)
    return arch(request.config)


@pytest.fixture
def qemu_build(qemu_version: str, guest_arch: str) -> builds.QemuBuild:
    """The QEMU build under test, provisioned and probed."""
    return builds.get_build(qemu_version, guest_arch)


@pytest.fixture
def firmware(ovmf_version: str, guest_arch: str) -> Any:
    """The UEFI build under test (OVMF, or AAVMF for aarch64; a
    :class:`harness.inventory.firmware.FirmwareBuild`)."""
    from harness.inventory import firmware as fw

    return fw.get_firmware(ovmf_version, guest_arch)


@pytest.fixture
def guest_image(guest_arch: str) -> Any:
    """The ``minimal`` guest image for this architecture (built and cached on first use)."""
    from harness import images

    return images.ensure_image("minimal", guest_arch)


@pytest.fixture(scope="session")
def _harness_base(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This worker's private directory (0700, short path: unix sockets live in it)."""
    worker = getattr(request.config, "workerinput", {}).get("workerid", "main")
    base = private_base(tag=f"-{worker}")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def harness_artifacts(request: pytest.FixtureRequest) -> Path:
    """This test's directory under ``--harness-artifacts``, for artifacts a test collects
    itself (a scenario's ``artifacts=``), so that they outlive pytest's temporary
    directories; a previous run's are removed, and nothing is created here."""
    dest = artifacts_root(request.config) / safe_name(request.node.nodeid)
    shutil.rmtree(dest, ignore_errors=True)
    return dest


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest, _harness_base: Path, harness_artifacts: Path,
               qemu_version: str, ovmf_version: str, guest_arch: str) -> Iterator[MachineFactory]:
    """``vm_factory(**spec)`` starts guests; every one is torn down at the end of the test,
    and a failed test keeps their artifacts under ``--harness-artifacts``."""
    why = qemu_machine_missing()
    if why:  # before anything is provisioned or built for a guest that cannot start
        raise HostError(why)
    node = request.node
    dest = harness_artifacts
    base = Path(tempfile.mkdtemp(prefix=f"{safe_name(node.name, 24)}-", dir=_harness_base))
    defaults = VmSpec(qemu=qemu_version, firmware=ovmf_version, arch=guest_arch,
                      accel=accel_choice(request.config).chosen)  # fmt: skip
    factory = MachineFactory(defaults, base=base)
    node.stash[_FACTORY_KEY] = (factory, dest)
    try:
        yield factory
    finally:
        failed = _failed_reports(node)
        kept = factory.close(failed=bool(failed), artifacts=dest)
        if kept is not None:
            _write_report(kept, node.nodeid, failed)
        shutil.rmtree(base, ignore_errors=True)


def _write_report(dest: Path, nodeid: str, failed: list[pytest.TestReport]) -> None:
    try:
        with (dest / "failure.txt").open("w") as fh:
            fh.write(f"{nodeid}\n")
            for rep in failed:
                fh.write(f"\n--- {rep.when} ---\n{rep.longreprtext}\n")
    except OSError:
        pass


@pytest.fixture
def vm(request: pytest.FixtureRequest, vm_factory: MachineFactory) -> Machine:
    """A started default UEFI guest (split pflash, private varstore, SSH ready).

    It boots cold; ``--fast-start`` or ``harness_fast_start = true`` restores it from a
    saved boot of the same inputs instead (:mod:`harness.snapshots`)."""
    fast = bool(request.config.getoption("--fast-start")) or bool(request.config.getini("harness_fast_start"))
    return vm_factory(fast=fast)
