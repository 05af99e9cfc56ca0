"""harness.state and harness.survival assertions: every check's failing case, on fakes
(pure logic) and on the recorded booted OVMF 2025.02 varstore."""

from __future__ import annotations

import dataclasses
import json
import lzma
import struct
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness import state, survival, varstore
from harness.errors import StateError
from harness.guest.ssh import CommandResult
from harness.nested.common import L2_HEARTBEAT_S
from harness.paths import REPO_ROOT
from harness.spec import VmSpec
from harness.state import ClockSample, GuestState

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "varstore"
GLOBAL = varstore.EFI_GLOBAL_VARIABLE


def gs(**kw: Any) -> GuestState:
    base: dict[str, Any] = dict(
        boot_id="b-1", uptime=100.0, heartbeat=1000, mem_checksum="aa", mem_expected="aa",
        clock=ClockSample(host=5000.0, guest=100.0, rtt=0.01), files={"/etc/x": "f" * 64},
    )  # fmt: skip
    base.update(kw)
    return GuestState(**base)


def later(before: GuestState, seconds: float = 3.0, pause: float = 0.0, **kw: Any) -> GuestState:
    """``before`` after ``seconds`` of host time of which the guest lost ``pause``."""
    guest = seconds - pause
    values: dict[str, Any] = dict(
        uptime=before.uptime + guest, heartbeat=before.heartbeat + int(guest * 10),
        clock=ClockSample(before.clock.host + seconds, before.clock.guest + guest, 0.01),
    )  # fmt: skip
    values.update(kw)
    return dataclasses.replace(before, **values)


# --- assert_survived -------------------------------------------------------------------


def test_survived_passes_when_everything_advanced() -> None:
    b = gs()
    state.assert_survived(b, later(b, pause=0.05), max_pause=0.5)
    assert state.survival_problems(b, later(b)) == []


def test_a_before_without_memory_is_judged_by_what_was_written() -> None:
    b = gs(mem_checksum=None)
    assert state.survival_problems(b, later(b, mem_checksum="aa")) == []
    problems = state.survival_problems(b, later(b, mem_checksum="cc"))
    assert problems == ["memory region differs from what was written: cc != aa"]
    problems = state.survival_problems(b, later(b, mem_checksum="cc", mem_expected=None))
    assert problems == ["memory region: no checksum before and no record of what was written to compare with"]
    # and an after without the memory is still a change from a before with it
    full = gs()
    assert any("checksum changed: aa -> None" in p for p in state.survival_problems(full, later(full, mem_checksum=None)))


def test_reboot_is_reported_with_both_boot_ids_and_uptimes() -> None:
    b = gs()
    a = later(b, boot_id="b-2", uptime=4.5)
    with pytest.raises(StateError) as exc:
        state.assert_survived(b, a)
    text = str(exc.value)
    assert "guest rebooted: boot id b-1 -> b-2" in text
    assert "uptime 100.00 s -> 4.50 s" in text


def test_uptime_backwards_says_by_how_much() -> None:
    b = gs()
    problems = state.survival_problems(b, later(b, uptime=97.5))
    assert any("went backwards by 2.50 s" in p for p in problems), problems


def test_stuck_heartbeat_says_ticks_and_time() -> None:
    b = gs()
    problems = state.survival_problems(b, later(b, heartbeat=1000))
    assert len(problems) == 1
    assert "heartbeat did not advance: 1000 -> 1000 (+0 ticks" in problems[0]
    assert "guest time advanced 3.00 s" in problems[0]


def test_a_heartbeat_is_stuck_only_after_two_periods_of_guest_time() -> None:
    b = gs(heartbeat_s=0.1)
    # 0.08 s of guest time: a 0.1 s heartbeat need not tick (a failed migration's before/after)
    assert state.survival_problems(b, later(b, seconds=0.4, pause=0.32, heartbeat=1000)) == []
    assert state.survival_problems(b, later(b, seconds=0.39, heartbeat=1000)) == []
    stuck = state.survival_problems(b, later(b, seconds=0.4, heartbeat=1000))
    assert stuck and "+0 ticks while guest time advanced 0.40 s" in stuck[0], stuck
    back = state.survival_problems(b, later(b, seconds=0.1, heartbeat=999))  # never allowed
    assert back and "heartbeat did not advance: 1000 -> 999 (-1 ticks" in back[0], back
    slow = gs(heartbeat_s=0.5)  # an L2's
    assert state.survival_problems(slow, later(slow, seconds=1.1, heartbeat=1000)) == []
    assert state.survival_problems(slow, later(slow, seconds=1.2, heartbeat=1000))


def test_the_heartbeat_period_comes_from_the_guest_config() -> None:
    assert state.heartbeat_period(VmSpec(name="hb")) == state.DEFAULT_HEARTBEAT_S
    assert state.heartbeat_period(VmSpec(name="hb", guest_config={"heartbeat_s": "0.25"})) == 0.25
    bad = VmSpec(name="hb", guest_config={"heartbeat_s": "soon"})  # the agent's default, as the agent
    assert state.heartbeat_period(bad) == state.DEFAULT_HEARTBEAT_S
    agent = (REPO_ROOT / "guests/agent/agent").read_text()
    assert f"heartbeat_s={L2_HEARTBEAT_S}\\n" in agent  # the L2 config line L2.snapshot relies on
    init = (REPO_ROOT / "guests/agent/init").read_text()
    assert f"hb=$(cfg heartbeat_s {state.DEFAULT_HEARTBEAT_S})" in init


def test_memory_checksum_change_and_mismatch_with_what_was_written() -> None:
    b = gs()
    problems = state.survival_problems(b, later(b, mem_checksum="bb"))
    assert "memory region checksum changed: aa -> bb" in problems
    assert "memory region differs from what was written: bb != aa" in problems


def test_changed_and_vanished_files() -> None:
    b = gs(files={"/a": "1" * 64, "/b": "2" * 64})
    problems = state.survival_problems(b, later(b, files={"/a": "3" * 64}))
    assert any(p.startswith("file /a changed: sha256 1111") and "-> 3333" in p for p in problems)
    assert any(p.startswith("file /b is gone") for p in problems)


def test_pause_over_the_limit_says_by_how_much() -> None:
    b = gs()
    a = later(b, seconds=3.0, pause=1.25)
    assert state.guest_pause(b, a) == pytest.approx(1.25)
    problems = state.survival_problems(b, a, max_pause=1.0)
    assert len(problems) == 1
    assert "guest paused 1.250 s, 0.250 s more than the allowed 1.000 s" in problems[0]
    assert state.survival_problems(b, a, max_pause=2.0) == []


def test_assert_survived_lists_every_problem() -> None:
    b = gs()
    a = later(b, pause=2.0, heartbeat=999, mem_checksum="cc", files={})
    with pytest.raises(StateError) as exc:
        state.assert_survived(b, a, max_pause=0.5)
    assert str(exc.value).count("\n  - ") == 5



def test_assert_survived_with_the_guest_names_its_consoles_crash(tmp_path: Path) -> None:
    """A reboot seen by the checks comes with the oops that caused it; a guest that
    survived is not failed for an old crash line alone."""
    (tmp_path / "qemu-1.serial.log").write_text("[   12.5] BUG: kernel NULL pointer dereference, address: 08\n")
    vm: Any = SimpleNamespace(workdir=tmp_path)
    b = gs()
    with pytest.raises(StateError) as exc:
        state.assert_survived(b, later(b, boot_id="b-2", uptime=3.0), vm=vm)
    assert "guest rebooted" in str(exc.value)
    assert "the guest's kernel crashed: qemu-1.serial.log: BUG: kernel NULL pointer dereference" in str(exc.value)
    state.assert_survived(b, later(b), vm=vm)

# --- fakes of a guest ------------------------------------------------------------------


class FakeSsh:
    name = "fake"

    def __init__(self, handler: Callable[[str], tuple[int, str]]) -> None:
        self.handler = handler
        self.commands: list[str] = []

    def run(self, command: str, timeout: float = 120.0, check: bool = False) -> CommandResult:
        self.commands.append(command)
        rc, out = self.handler(command)
        res = CommandResult(command, rc, out, "", 0.0)
        return res.check() if check else res

    def close(self) -> None:
        pass


class FakeVm:
    """What the state helpers touch: spec, ssh, agent."""

    def __init__(self, handler: Callable[[str], tuple[int, str]], mode: str = "split") -> None:
        self.spec = SimpleNamespace(name="fake", firmware="2022.11", firmware_mode=mode)
        self.ssh = FakeSsh(handler)
        self.agent_calls: list[tuple[str, ...]] = []
        self.agent_answers: dict[str, Any] = {}

    def agent(self, *args: str, timeout: float = 120.0) -> Any:
        self.agent_calls.append(args)
        return self.agent_answers.get(args[0], {"ok": True})


def efivar_answer(value: bytes | None) -> Callable[[str], tuple[int, str]]:
    def handler(cmd: str) -> tuple[int, str]:
        if value is None:
            return 1, '{"error": "no variable"}'
        return 0, json.dumps({"name": "X", "guid": state.HARNESS_GUID, "attributes": 7,
                              "data": value.hex()})  # fmt: skip
    return handler


def test_write_efivar_asks_the_agent() -> None:
    vm = FakeVm(efivar_answer(None))
    state.write_efivar(vm, "Foo", b"\x01\x02")  # type: ignore[arg-type]
    assert vm.agent_calls == [("efivar", "set", f"Foo-{state.HARNESS_GUID}", "0102", "7")]


def test_assert_efivar_passes_and_fails_with_both_values() -> None:
    state.assert_efivar(FakeVm(efivar_answer(b"hello")), "X", b"hello")  # type: ignore[arg-type]
    with pytest.raises(StateError, match=r"expected 'hello', found 'hellp' \(1 of 5 bytes differ, first at offset 4\)"):
        state.assert_efivar(FakeVm(efivar_answer(b"hellp")), "X", b"hello")  # type: ignore[arg-type]
    with pytest.raises(StateError, match="expected 'hello' in the guest, found nothing$"):
        state.assert_efivar(FakeVm(efivar_answer(None)), "X", b"hello")  # type: ignore[arg-type]


def test_assert_efivar_on_stateless_firmware_says_so() -> None:
    vm = FakeVm(efivar_answer(None), mode="stateless")
    with pytest.raises(StateError, match="stateless firmware: variables live in guest RAM only"):
        state.assert_efivar(vm, "X", b"hello")  # type: ignore[arg-type]


def test_efivar_problem_length_change() -> None:
    p = state.efivar_problem("X", "g", b"\x00" * 40, b"\x00" * 4, "the file")
    assert p is not None and "40 -> 4 bytes" in p and "40 bytes 0000" in p


# --- the guest's efivarfs dump ------------------------------------------------------------


def _dump_line(name: str, guid: str, attrs: int, data: bytes) -> str:
    """One variable as the guest's dump prints it: od's lines of 16 spaced hex bytes."""
    raw = struct.pack("<I", attrs) + data
    lines = "".join(" " + " ".join(f"{b:02x}" for b in raw[i:i + 16]) + "\n"
                    for i in range(0, len(raw), 16))  # fmt: skip
    return f"\n@{name}-{guid}\t{lines}"


def test_parse_efivar_dump_handles_spaces_and_short_reads() -> None:
    long = bytes(range(40))  # spans three od lines
    text = "".join([
        _dump_line("Attempt 1", "7b7e6a43-7c8b-4e9b-9d2a-0f3a4b5c6d7e", 3, long),
        _dump_line("BootOrder", GLOBAL.upper(), 7, b"\x01\x00\x00\x00"),
        f"\n@Gone-{GLOBAL}\t",  # removed while listing: od printed nothing
    ])  # fmt: skip
    out = state.parse_efivar_dump(text)
    assert out == {
        ("Attempt 1", "7b7e6a43-7c8b-4e9b-9d2a-0f3a4b5c6d7e"): (3, long),
        ("BootOrder", GLOBAL): (7, b"\x01\x00\x00\x00"),
    }
    assert state.parse_efivar_dump("") == {}


@pytest.mark.parametrize("line", ["garbage", "\n@no-tab-here", "\n@Short-1234\t 07 00",
                                  f"\n@X-{GLOBAL}\t zz"])
def test_parse_efivar_dump_rejects_garbage(line: str) -> None:
    with pytest.raises(StateError, match="efivarfs dump"):
        state.parse_efivar_dump(line)


def _bulk(files: list[tuple[str, int, bytes]], sizes: dict[str, int] | None = None) -> str:
    """The one-process dump of ``files`` (name, attributes, data): stat's sizes (or the
    stale ``sizes`` given), "@@", od's hex of head's output with its headers."""
    raws = [(n, struct.pack("<I", a) + d) for n, a, d in files]
    listing = "".join(f"{(sizes or {}).get(n, len(r))} {n}\n" for n, r in raws)
    stream = b"".join(((b"\n" if i else b"") + f"==> {n} <==\n".encode() if len(raws) > 1 else b"") + r
                      for i, (n, r) in enumerate(raws))  # fmt: skip
    lines = "".join(" " + " ".join(f"{b:02x}" for b in stream[i:i + 16]) + "\n"
                    for i in range(0, len(stream), 16))  # fmt: skip
    return listing + "@@\n" + lines


BULK_FILES = [(f"Attempt 1-{GLOBAL}", 3, bytes(range(40))), (f"BootOrder-{GLOBAL}", 7, b"\x01\x00"),
              (f"Empty-{GLOBAL}", 7, b"")]  # fmt: skip


ATTEMPT, BOOTORDER, EMPTY = (("Attempt 1", GLOBAL), ("BootOrder", GLOBAL), ("Empty", GLOBAL))
ALL = {ATTEMPT: (3, bytes(range(40))), BOOTORDER: (7, b"\x01\x00"), EMPTY: (7, b"")}


def _fname(key: tuple[str, str]) -> str:
    return f"{key[0]}-{key[1]}"


def test_parse_efivar_bulk_reads_every_file_between_the_headers() -> None:
    assert state.parse_efivar_bulk(_bulk(BULK_FILES)) == (ALL, [])
    one = state.parse_efivar_bulk(_bulk(BULK_FILES[1:2]))  # one file: head prints no header
    assert one == ({BOOTORDER: (7, b"\x01\x00")}, [])
    assert state.parse_efivar_bulk("") == ({}, [])


@pytest.mark.parametrize(("sizes", "files", "again"), [
    ({_fname(BOOTORDER): 0}, BULK_FILES, BOOTORDER),  # efivarfs's stale size after a refused write
    ({_fname(ATTEMPT): 50}, BULK_FILES, ATTEMPT),  # larger than what head read
    ({_fname(EMPTY): 9}, BULK_FILES, EMPTY),  # the last file: the end of the dump is its end
    ({_fname(BOOTORDER): 5}, BULK_FILES[1:2], BOOTORDER),  # one file, no header
])  # fmt: skip
def test_parse_efivar_bulk_reads_again_what_its_size_does_not_fit(
        sizes: dict[str, int], files: list[tuple[str, int, bytes]], again: tuple[str, str]) -> None:
    found, reread = state.parse_efivar_bulk(_bulk(files, sizes=sizes)) or ({}, ["unparsed"])
    assert reread == [_fname(again)]
    assert found == {k: v for k, v in ALL.items() if k != again and _fname(k) in {f[0] for f in files}}


@pytest.mark.parametrize("text", [
    _bulk(BULK_FILES).replace("@@\n", ""),  # no separator
    _bulk(BULK_FILES).replace(" 3d 3d 3e", " 3d 3d 3f", 1),  # a header that is not the listed file's
    _bulk(BULK_FILES, sizes={_fname(ATTEMPT): 20}).replace(" 3d 3d 3e", " 3d 3d 3f", 2),  # no next header
    "x y\n@@\n",  # a size that is not a number
])  # fmt: skip
def test_parse_efivar_bulk_refuses_a_dump_without_its_structure(text: str) -> None:
    assert state.parse_efivar_bulk(text) is None


def test_guest_variables_reads_one_by_one_only_what_the_bulk_dump_could_not() -> None:
    calls = []
    stale = _bulk(BULK_FILES, sizes={_fname(BOOTORDER): 0})

    def handler(cmd: str) -> tuple[int, str]:
        calls.append(cmd)
        return 0, stale if "stat -c" in cmd else _dump_line("BootOrder", GLOBAL, 7, b"\x01\x00")

    assert state.guest_variables(FakeVm(handler)) == ALL  # type: ignore[arg-type]
    assert len(calls) == 2 and f"for f in {_fname(BOOTORDER)}; do" in calls[1]
    calls.clear()

    def whole(cmd: str) -> tuple[int, str]:
        calls.append(cmd)
        return 0, _bulk(BULK_FILES)

    assert state.guest_variables(FakeVm(whole)) == ALL  # type: ignore[arg-type]
    assert len(calls) == 1
    calls.clear()

    def unparsed(cmd: str) -> tuple[int, str]:  # stat failed: every variable one by one
        calls.append(cmd)
        return (4, "") if "stat -c" in cmd else (0, _dump_line("BootOrder", GLOBAL, 7, b"\x01\x00"))

    assert state.guest_variables(FakeVm(unparsed)) == {BOOTORDER: (7, b"\x01\x00")}  # type: ignore[arg-type]
    assert calls[1] == state.DUMP_VARS_EACH and "for f in *;" in calls[1]


def test_guest_variables_without_efivarfs() -> None:
    vm = FakeVm(lambda cmd: (3, ""))
    with pytest.raises(StateError, match="no efivarfs in the guest"):
        state.guest_variables(vm)  # type: ignore[arg-type]


# --- survival against a real (recorded) booted varstore ------------------------------------


@pytest.fixture
def booted(tmp_path: Path) -> Path:
    path = tmp_path / "booted.fd"
    path.write_bytes(lzma.decompress((DATA / "booted-2025.02-4m.fd.xz").read_bytes()))
    return path


def _with_var(src: Path, dest: Path, name: str, value: bytes, order: list[int] | None = None) -> None:
    """Add a variable (and set BootOrder) with virt-firmware's writer, as a guest would."""
    from virt.firmware.efi import efivar
    from virt.firmware.varstore import edk2

    store = edk2.Edk2VarStore(str(src))
    varlist = store.get_varlist()
    var = efivar.EfiVar(name, guid=state.HARNESS_GUID, attr=7, data=value)
    varlist[name] = var
    if order is not None:
        varlist["BootOrder"].set_boot_order(order)
    store.write_varstore(str(dest), varlist)


def test_model_problems_pass_and_fail(booted: Path, tmp_path: Path) -> None:
    model = varstore.read_varstore(booted)
    order = tuple(model.boot_order)
    planted = survival.Planted({("HarnessSurvive", state.HARNESS_GUID): b"v1"}, order, None)
    problems = survival.model_problems(model, planted)
    assert problems == [f"EFI variable HarnessSurvive-{state.HARNESS_GUID}: expected 'v1' in "
                        f"the varstore file {booted}, found nothing"]  # fmt: skip
    written = tmp_path / "written.fd"
    _with_var(booted, written, "HarnessSurvive", b"v1", order=list(reversed(order)))
    problems = survival.model_problems(varstore.read_varstore(written), planted)
    assert len(problems) == 1 and problems[0].startswith(f"BootOrder in the varstore file {written}: reordered")
    ok = tmp_path / "ok.fd"
    _with_var(booted, ok, "HarnessSurvive", b"v1")
    assert survival.model_problems(varstore.read_varstore(ok), planted) == []
    missing_entry = dataclasses.replace(planted, boot_entry=0x100)
    assert survival.model_problems(varstore.read_varstore(ok), missing_entry) == [
        f"Boot0100 (the guest's own entry) is not in {ok}"]


def test_identical_problems_name_bytes_and_variables(booted: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.fd"
    copy.write_bytes(booted.read_bytes())
    assert survival.identical_problems(booted, copy) == []
    changed = tmp_path / "changed.fd"
    _with_var(booted, changed, "HarnessSurvive", b"v2")
    (p,) = survival.identical_problems(booted, changed)
    assert "bytes differ, offsets 0x" in p and "extra HarnessSurvive" in p
    short = tmp_path / "short.fd"
    short.write_bytes(booted.read_bytes()[:1000])
    (p,) = survival.identical_problems(booted, short)
    assert f"{booted.stat().st_size} -> 1000 bytes" in p and "cannot decode" in p
    assert survival.wait_identical(booted, short, timeout=0.3) == [p]


def test_view_problems_both_ways(booted: Path) -> None:
    model = varstore.read_varstore(booted)
    guest = {k: (v.attributes, v.data) for k, v in model.variables.items()
             if v.non_volatile and v.attributes & varstore.RUNTIME_ACCESS}  # fmt: skip
    assert survival.view_problems(booted, guest) == []
    extra = dict(guest)
    extra[("HarnessSurvive", state.HARNESS_GUID)] = (7, b"x")
    del extra[("BootOrder", GLOBAL)]
    problems = survival.view_problems(booted, extra)
    assert any("HarnessSurvive" in p and "not in" in p for p in problems), problems
    assert any(p.startswith("guest view vs file: BootOrder") and "not in the guest" in p for p in problems)


def test_guest_problems_from_a_dump() -> None:
    vm = FakeVm(lambda cmd: (0, ""))
    planted = survival.Planted({("HarnessSurvive", state.HARNESS_GUID): b"v"}, (0x100, 1), 0x100)
    gv = {("BootOrder", GLOBAL): (7, struct.pack("<HH", 1, 0x100)),
          ("HarnessSurvive", state.HARNESS_GUID): (7, b"v")}  # fmt: skip
    problems = survival.guest_problems(vm, planted, gv)  # type: ignore[arg-type]
    assert problems == ["BootOrder in the guest: reordered; [Boot0100, Boot0001] -> [Boot0001, Boot0100]"]
    gv[("BootOrder", GLOBAL)] = (7, struct.pack("<HH", 0x100, 1))
    assert survival.guest_problems(vm, planted, gv) == []  # type: ignore[arg-type]


def test_stateless_guest_checks_say_so_plainly() -> None:
    planted = survival.Planted({("HarnessSurvive", state.HARNESS_GUID): b"v"})
    vm = FakeVm(lambda cmd: (0, ""), mode="stateless")
    problems = survival.guest_problems(vm, planted, {})  # type: ignore[arg-type]
    assert problems[-1] == survival.STATELESS_NOTE
    with pytest.raises(StateError, match="no host-side varstore to check: this guest runs stateless"):
        survival.host_problems(vm, planted)  # type: ignore[arg-type]


def test_forgotten_problems() -> None:
    planted = survival.Planted({("HarnessSurvive", state.HARNESS_GUID): b"v"})
    still = _dump_line("HarnessSurvive", state.HARNESS_GUID, 7, b"v")
    vm = FakeVm(lambda cmd: (0, still), mode="stateless")
    with pytest.raises(StateError, match="still in the guest after a restart \\(the same value\\): "
                       "stateless firmware must not keep"):
        survival.assert_forgotten(vm, planted)  # type: ignore[arg-type]
    gone = FakeVm(lambda cmd: (0, ""), mode="stateless")
    survival.assert_forgotten(gone, planted)  # type: ignore[arg-type]


def test_assert_no_problems() -> None:
    survival.assert_no_problems([], "nothing")
    with pytest.raises(StateError, match="heading:\n  - a\n  - b"):
        survival.assert_no_problems(["a", "b"], "heading")


def test_assert_persisted_collects_guest_file_view_and_identity_problems(booted: Path, tmp_path: Path) -> None:
    model = varstore.read_varstore(booted)
    dump = "".join(_dump_line(n, g, v.attributes, v.data) for (n, g), v in model.variables.items()
                   if v.non_volatile and v.attributes & varstore.RUNTIME_ACCESS)  # fmt: skip
    vm = FakeVm(lambda cmd: (0, dump))
    vm.varstore_path = booted  # type: ignore[attr-defined]
    planted = survival.Planted({("HarnessSurvive", state.HARNESS_GUID): b"v"}, tuple(model.boot_order))
    with pytest.raises(StateError) as exc:
        survival.assert_persisted(vm, planted, what="after test")  # type: ignore[arg-type]
    text = str(exc.value)
    assert text.startswith("guest-written varstore state did not survive after test:")
    assert "expected 'v' in the guest, found nothing" in text
    assert f"expected 'v' in the varstore file {booted}, found nothing" in text
    # the same file as "source" is no fresh copy; a different one must be identical
    problems = survival.persisted_problems(vm, planted, source_varstore=booted)  # type: ignore[arg-type]
    assert any("not a fresh copy" in p for p in problems)
    other = tmp_path / "other.fd"
    _with_var(booted, other, "Other", b"x")
    problems = survival.persisted_problems(vm, planted, source_varstore=other, timeout=0.2)  # type: ignore[arg-type]
    assert any(p.startswith(f"destination varstore {booted} is not the source's {other}") and
               "missing Other" in p for p in problems), problems
    ok = survival.Planted({}, tuple(model.boot_order))
    assert survival.persisted_problems(vm, ok) == []  # type: ignore[arg-type]


def test_reboot_refuses_the_old_boot_id() -> None:
    vm = FakeVm(lambda cmd: (0, ""))
    vm.console = SimpleNamespace(mark=lambda: 42)  # type: ignore[attr-defined]
    vm.ready = SimpleNamespace(boot_id="same")  # type: ignore[attr-defined]
    vm.wait_ready = lambda timeout, since: SimpleNamespace(boot_id="same")  # type: ignore[attr-defined]
    with pytest.raises(StateError, match="old boot id same"):
        state.reboot(vm)  # type: ignore[arg-type]
    assert "reboot -f" in vm.ssh.commands[0]


# --- diagnosing a guest that stopped answering ------------------------------------------

# the shape of QEMU's HMP "info registers" for x86 (10.0.2, TCG); values made up
_REGS = ("RAX=0000000000000000 RBX=ffffffff82a0c940\nRIP={rip} RFL={rfl} [---Z-P-] CPL=0 "
         "II=0 A20=1 SMM=0 HLT={hlt}\nES =0000 0000000000000000 ffffffff 00c00000\n")


class _DiagVm:
    def __init__(self, regs: list[str], status: str = "running", fail: bool = False) -> None:
        self.regs, self.status, self.fail = list(regs), status, fail
        self.console = SimpleNamespace(read_log=lambda: "x" * 2000 + "kernel BUG at mm/x.c")

    def qmp(self, cmd: str, **args: Any) -> Any:
        if self.fail:
            raise StateError("QMP went away")
        if cmd == "query-status":
            return {"status": self.status, "running": self.status == "running"}
        assert cmd == "human-monitor-command" and args == {"command-line": "info registers"}
        return self.regs.pop(0)


@pytest.mark.parametrize(("regs", "how"), [
    ([_REGS.format(rip="ffffffff81e3c2a1", rfl="00000246", hlt=1)] * 2, "(halted)"),
    ([_REGS.format(rip="ffffffff81e3c2a1", rfl="00000046", hlt=1)] * 2, "(halted, interrupts off)"),
    ([_REGS.format(rip="000000000082c0f9", rfl="00000046", hlt=0),
      _REGS.format(rip="000000000082c110", rfl="00000046", hlt=0)], "(moving)"),
    ([_REGS.format(rip="000000000082c0f9", rfl="00000046", hlt=0)] * 2, "(stuck)"),
])  # fmt: skip
def test_diagnosis_reads_status_pc_and_console(regs: list[str], how: str) -> None:
    diag = state.diagnose(_DiagVm(regs), interval=0)  # type: ignore[arg-type]
    assert diag["status"] == "running" and len(diag["vcpu"]) == 2
    assert diag["vcpu"][0]["pc"].startswith("0x") and diag["console_tail"].endswith("kernel BUG at mm/x.c")
    assert len(diag["console_tail"]) == 800
    line = state.describe_diagnosis(diag)
    assert line.startswith("QEMU status running; vCPU pc 0x") and line.endswith(how), line


def test_diagnosis_never_raises_and_says_what_it_could_not_ask() -> None:
    diag = state.diagnose(_DiagVm([], fail=True), interval=0)  # type: ignore[arg-type]
    assert "QMP went away" in diag["error"] and "console_tail" in diag
    assert state.describe_diagnosis(diag) == "QEMU status ?; diagnosis incomplete: StateError: QMP went away"


def test_a_rebooted_guest_after_a_hop_carries_its_consoles_crash_and_signature(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """back_to_back on fakes: the boot id changed across the hop, the console has the oops
    (the lines of a real run: the nightly night of 2026-12-01, run 2026-11-30, live 7.2 -> 7.2), so the cycle's
    result names the crash and carries signature guest-kernel-panic."""
    from types import SimpleNamespace

    from harness import migration, state
    from harness.migration import MigrationResult, Mode, Status

    before = gs()
    after = later(before, seconds=23.4, boot_id="new-boot", uptime=10.1)
    snaps = iter([before, after])
    monkeypatch.setattr(state, "snapshot", lambda vm, **kw: next(snaps))
    monkeypatch.setattr(state, "kernel_crashes", lambda vm: [
        "qemu-1.serial.log: BUG: unable to handle page fault for address: ff7bd84fc05c7dc8",
        "qemu-1.serial.log: Kernel panic - not syncing: Attempted to kill the idle task!"])

    def hop(vm: Any, **kw: Any) -> MigrationResult:
        return MigrationResult(op="live", mode=Mode("normal"), status=Status.COMPLETED,
                               source="7.2", destination="7.2", machine="pc-q35-7.2")  # fmt: skip

    monkeypatch.setattr(migration, "operation", lambda op: hop)
    vm = SimpleNamespace(spec=SimpleNamespace(firmware=None, firmware_mode="split"))
    (res,) = migration.back_to_back(vm, "live", 3)  # type: ignore[arg-type]
    assert not res.ok and res.signature == "guest-kernel-panic"
    assert any(p.startswith("guest rebooted: boot id") for p in res.problems)
    assert "the guest's kernel crashed: qemu-1.serial.log: BUG: unable to handle page fault" in "\n".join(res.problems)


def test_a_failed_check_of_a_crashed_guest_carries_its_console_crash(tmp_path: Path) -> None:
    # real console of make test-halved 2026-12-01 (distro 7.2 -> 10.0.2): the guest's kernel
    # oopsed in its timer code and killed sshd without rebooting, so SSH timed out; the
    # problems must name the crash (guest-kernel-panic), not only the timeout
    from types import SimpleNamespace

    from harness import signatures
    from harness.errors import GuestTimeout

    (tmp_path / "qemu-0.serial.log").write_text("HARNESS-READY {}\n")
    (tmp_path / "qemu-1.serial.log").write_text(
        "[   10.208493] general protection fault, probably for non-canonical address "
        "0x8024948700000010: 0000 [#1] PREEMPT SMP NOPTI\n[   10.209831] RIP: 0010:rb_next+0x14/0x50\n")

    def unreachable(*a: object, **k: object) -> None:
        raise GuestTimeout("SSH to xv1", 60)

    vm = SimpleNamespace(workdir=tmp_path, qmp=unreachable,
                         console=SimpleNamespace(read_log=lambda: "console"))
    diag, problems = state.failed_check_problems(vm, GuestTimeout("SSH to xv1", 60))  # type: ignore[arg-type]
    assert problems[0].startswith("guest check failed: ") and "diagnosis incomplete" in problems[0]
    assert problems[1:] == ["the guest's kernel crashed: qemu-1.serial.log: general protection fault, "
                            "probably for non-canonical address 0x8024948700000010: 0000 [#1] PREEMPT SMP NOPTI"]
    sig = signatures.classify("\n".join(problems))
    assert sig is not None and sig.name == "guest-kernel-panic"
    seen = [line.removeprefix("the guest's kernel crashed: ") for line in problems[1:]]
    assert state.failed_check_problems(vm, GuestTimeout("SSH to xv1", 60), seen)[1] == problems[:1]  # type: ignore[arg-type]
