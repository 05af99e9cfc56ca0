"""Nested L1/L2 without guests: L1 specs and command lines on a TCG host and on real-KVM
hosts (VMX and SVM, nested on and off, from fake /sys and /proc trees), the destination
L2 command line of a migration inside L1, and reading nested state out of a migration
stream's description."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from harness import nested
from harness.errors import ConfigError, HostError, MachineError, StateError, UnsupportedError
from harness.inventory import host
from harness.inventory.builds import Capabilities, QemuBuild
from harness.spec import Resolved, VmSpec, qemu_args

DATA = Path(__file__).parent / "data" / "nested"


def _host(tmp_path: Path, flags: str, modules: dict[str, str | None], kvm: bool = True) -> host.KvmInfo:
    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    proc.mkdir()
    (proc / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu {flags} sse2\n")
    for mod, value in modules.items():
        d = sysfs / "module" / mod / "parameters"
        d.mkdir(parents=True)
        if value is not None:
            (d / "nested").write_text(value + "\n")
    dev = tmp_path / "kvm"
    if kvm:
        dev.write_text("")
    return host.probe_kvm(sysfs, proc, dev)


def _args(spec: VmSpec, accel: str) -> list[str]:
    r = Resolved(accel=accel, machine=spec.machine, code=Path("/fw/CODE.fd"), vars=Path("/w/vars.fd"),
                 esp=Path("/img/esp.img"), data_disk=Path("/img/data.img"), serial_sock=Path("/w/s.sock"),
                 serial_log=Path("/w/s.log"), fwcfg_file=Path("/w/cfg"), ssh_port=2200)  # fmt: skip
    return qemu_args(spec, r)


def _opt(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --- L1 plans ---------------------------------------------------------------------------


def test_pvm_host_gets_a_tcg_l1_with_emulated_svm(tmp_path: Path) -> None:
    kvm = _host(tmp_path, "", {"kvm": None, "kvm_pvm": None})
    plan = nested.l1_plan(kvm)
    assert plan.accel == "tcg" and plan.spec.accel == "tcg" and plan.spec.cpu == "max"
    assert plan.spec.image == "nested-l1" and plan.spec.nested
    assert 1536 <= plan.spec.memory_mb <= 2048
    assert not plan.nested_state_expected and plan.l2_irqchip == "user"
    assert "TCG L0" in plan.reason and "PVM" in plan.reason
    args = _args(plan.spec, plan.accel)
    assert _opt(args, "-cpu") == "max"
    assert _opt(args, "-machine").startswith("q35,accel=tcg")
    # the payload disk rides along, read-only
    assert "file=/img/data.img,if=none,id=data,format=raw,readonly=on" in args


def test_vmx_host_with_nested_gets_cpu_host_plus_vmx(tmp_path: Path) -> None:
    kvm = _host(tmp_path, "vmx", {"kvm": None, "kvm_intel": "Y"})
    plan = nested.l1_plan(kvm)
    assert plan.accel == "kvm" and plan.vendor == "intel"
    assert plan.nested_state_expected and plan.l2_irqchip == "kernel"
    args = _args(plan.spec, plan.accel)
    assert _opt(args, "-cpu") == "host,+vmx"
    assert _opt(args, "-machine").startswith("q35,accel=kvm")
    assert "cpu/nested_state" in plan.reason


def test_svm_host_with_nested_gets_cpu_host_plus_svm(tmp_path: Path) -> None:
    kvm = _host(tmp_path, "svm", {"kvm": None, "kvm_amd": "1"})
    plan = nested.l1_plan(kvm, qemu="7.2", machine="pc-q35-7.2", memory_backend="memfd", aux_ram_share=True)
    args = _args(plan.spec, plan.accel)
    assert _opt(args, "-cpu") == "host,+svm" and plan.vendor == "amd"
    assert _opt(args, "-machine") == "pc-q35-7.2,accel=kvm,memory-backend=ram0,aux-ram-share=on"
    assert plan.spec.qemu == "7.2"


@pytest.mark.parametrize("flag,module", [("vmx", "kvm_intel"), ("svm", "kvm_amd")])
def test_kvm_host_without_nested_is_refused_with_the_fix(tmp_path: Path, flag: str, module: str) -> None:
    kvm = _host(tmp_path, flag, {"kvm": None, module: "N"})
    assert kvm.usable and not kvm.nested
    with pytest.raises(UnsupportedError, match=f"nested=1 \\(modprobe {module} nested=1\\)") as err:
        nested.l1_plan(kvm)
    assert err.value.capability == "nested virtualization"
    # asking for TCG explicitly still works there
    assert nested.l1_plan(kvm, accel="tcg").spec.cpu == "max"


def test_kvm_asked_for_on_a_pvm_host_is_refused(tmp_path: Path) -> None:
    kvm = _host(tmp_path, "", {"kvm": None, "kvm_pvm": None})
    with pytest.raises(UnsupportedError, match="PVM"):
        nested.l1_plan(kvm, accel="kvm")
    with pytest.raises(HostError, match="auto, kvm or tcg"):
        nested.l1_plan(kvm, accel="hvf")


def test_l1_plan_json_round_trips_the_spec(tmp_path: Path) -> None:
    plan = nested.l1_plan(_host(tmp_path, "", {"kvm": None}, kvm=False))
    data = json.loads(json.dumps(plan.to_json()))
    assert data["spec"]["cpu"] == "max" and data["accel"] == "tcg"
    assert VmSpec(**{**data["spec"], "extra_args": tuple(data["spec"]["extra_args"])}) == plan.spec


@dataclass
class _Build:
    capabilities: Capabilities


def _build(modes: tuple[str, ...], caps: tuple[str, ...]) -> QemuBuild:
    return cast(QemuBuild, _Build(Capabilities("10.0.2", "", (), ("normal", *modes), caps, (), True, True, ())))


def test_pair_fields_put_l1_ram_where_the_modes_want_it() -> None:
    cpr = _build(("cpr-reboot", "cpr-transfer"), ("x-ignore-shared",))
    older = _build(("cpr-reboot",), ("x-ignore-shared",))
    bare = _build((), ())
    assert nested.pair_fields([cpr]) == {"memory_backend": "memfd", "aux_ram_share": True}
    assert nested.pair_fields([cpr], "file") == {"memory_backend": "file", "aux_ram_share": True}
    assert nested.pair_fields([cpr, older], "file") == {"memory_backend": "file"}
    assert nested.pair_fields([cpr, bare], "file") == {} == nested.pair_fields([bare])
    with pytest.raises(ConfigError, match="nested L1 RAM 'hugetlb'; expected 'memfd' or 'file'"):
        nested.pair_fields([cpr], "hugetlb")


# --- the destination L2 of a migration inside L1 -----------------------------------------------

# the argv of an L2 QEMU started by L1's agent, as read from /proc/PID/cmdline in L1
AGENT_ARGV = [
    "/data/qemu/lib/ld-linux-x86-64.so.2", "--library-path", "/data/qemu/lib",
    "/data/qemu/bin/qemu-system-x86_64", "-machine", "q35,accel=kvm,kernel-irqchip=off",
    "-cpu", "host,-kvm-poll-control,-kvm-pv-ipi,-kvm-asyncpf-int", "-m", "512", "-smp", "1",
    "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-L", "/data/qemu/share",
    "-serial", "file:/run/l2/serial.log", "-qmp", "unix:/run/l2/qmp.sock,server=on,wait=off",
    "-fw_cfg", "name=opt/harness/config,file=/run/l2/config",
    "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22", "-device", "virtio-net-pci,netdev=n0,romfile=",
    "-pidfile", "/run/l2/qemu.pid", "-daemonize",
    "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/data/ovmf/OVMF_CODE_4M.fd",
    "-drive", "if=pflash,format=raw,unit=1,file=/run/l2/vars.fd",
    "-drive", "file=/data/l2/esp.img,if=virtio,format=raw,readonly=on",
]  # fmt: skip


def test_dest_l2_argv_gets_its_own_files_port_and_incoming() -> None:
    out = nested.dest_l2_argv(AGENT_ARGV, 1)
    assert out[:4] == AGENT_ARGV[:4]
    assert _opt(out, "-qmp") == "unix:/run/l2/qmp-1.sock,server=on,wait=off"
    assert _opt(out, "-pidfile") == "/run/l2/qemu-1.pid"
    assert _opt(out, "-serial") == "file:/run/l2/serial-1.log"
    assert _opt(out, "-netdev") == "user,id=n0,hostfwd=tcp:127.0.0.1:2223-:22"
    assert "if=pflash,format=raw,unit=1,file=/run/l2/vars-1.fd" in out
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/data/ovmf/OVMF_CODE_4M.fd" in out  # CODE untouched
    assert out[-2:] == ["-incoming", "unix:/run/l2/mig-1.sock"]
    # the machine, CPU and devices are the source's: that is what makes it migratable
    for opt in ("-machine", "-cpu", "-m", "-device", "-fw_cfg"):
        assert _opt(out, opt) == _opt(AGENT_ARGV, opt)
    assert AGENT_ARGV[AGENT_ARGV.index("-qmp") + 1] == "unix:/run/l2/qmp.sock,server=on,wait=off"  # not mutated
    assert _opt(nested.dest_l2_argv(out[:-2], 2), "-netdev").endswith("127.0.0.1:2224-:22")


@pytest.mark.parametrize("drop", ["-qmp", "-pidfile", "-serial", "-netdev"])
def test_dest_l2_argv_refuses_a_command_line_without(drop: str) -> None:
    i = AGENT_ARGV.index(drop)
    argv = AGENT_ARGV[:i] + AGENT_ARGV[i + 2:]
    with pytest.raises(MachineError, match=f"0 {drop} options"):
        nested.dest_l2_argv(argv, 1)


def test_dest_l2_argv_refuses_missing_varstore_forward_or_existing_incoming() -> None:
    k = AGENT_ARGV.index("if=pflash,format=raw,unit=1,file=/run/l2/vars.fd")
    no_vars = AGENT_ARGV[: k - 1] + AGENT_ARGV[k + 1:]
    with pytest.raises(MachineError, match="lacks pflash"):
        nested.dest_l2_argv(no_vars, 1)
    no_fwd = [a.replace(",hostfwd=tcp:127.0.0.1:2222-:22", "") for a in AGENT_ARGV]
    with pytest.raises(MachineError, match="lacks -netdev"):
        nested.dest_l2_argv(no_fwd, 1)
    with pytest.raises(MachineError, match="already has -incoming"):
        nested.dest_l2_argv([*AGENT_ARGV, "-incoming", "defer"], 1)


# --- nested state in the stream --------------------------------------------------------------


def _stream(desc: dict[str, object], *, junk: bytes = b"\x00" * 100) -> bytes:
    text = json.dumps(desc).encode()
    return b"QEVM" + junk + b"\x07" + b"\x06" + len(text).to_bytes(4, "big") + text


def _desc(*cpu_subs: str) -> dict[str, object]:
    # as QEMU writes it: the configuration section's description first
    return {"configuration": {"vmsd_name": "configuration", "fields": []}, "page_size": 4096, "devices": [
        {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "fields": []},
        {"name": "cpu", "instance_id": 0, "vmsd_name": "cpu", "fields": [],
         "subsections": [{"vmsd_name": s, "fields": [], "subsections": []} for s in cpu_subs]},
    ]}  # fmt: skip


def test_stream_sections_reads_the_trailing_description() -> None:
    secs = nested.stream_sections(_stream(_desc("cpu/async_pf_msr", "cpu/svm_guest")))
    assert secs["cpu"] == ["cpu/async_pf_msr", "cpu/svm_guest"] and secs["timer"] == []


def test_stream_sections_finds_nested_subsections_of_subsections() -> None:
    desc = _desc()
    cpu = desc["devices"][1]  # type: ignore[index]
    cpu["subsections"] = [{"vmsd_name": "cpu/nested_state", "subsections": [
        {"vmsd_name": "cpu/kvm_nested_state", "subsections": [{"vmsd_name": "cpu/kvm_nested_state/vmx"}]}]}]
    assert nested.stream_sections(_stream(desc))["cpu"] == [
        "cpu/nested_state", "cpu/kvm_nested_state", "cpu/kvm_nested_state/vmx"]


def test_stream_sections_refuses_a_stream_without_a_description() -> None:
    with pytest.raises(StateError, match="no vmstate description"):
        nested.stream_sections(b"QEVM" + b"\x00" * 64)
    good = _stream(_desc())
    # a wrong length field must not be taken for the description
    i = good.rindex(b'{"configuration"')
    bad = good[: i - 4] + (len(good) - i + 1).to_bytes(4, "big") + good[i:]
    with pytest.raises(StateError, match="no vmstate description"):
        nested.stream_sections(bad)
    # nor a truncated stream
    with pytest.raises(StateError):
        nested.stream_sections(good[:-3])


def test_file_sections_reads_only_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"\xff" * (nested._TAIL + 1000) + _stream(_desc("cpu/svn_npt")))
    assert nested.file_sections(path)["cpu"] == ["cpu/svn_npt"]


@pytest.mark.skipif(not (DATA / "tcg-l1-with-l2.vmdesc.json").exists(), reason="no recorded description")
def test_recorded_tcg_l1_stream_has_no_kvm_nested_state() -> None:
    """The stream description of a real save of a TCG L1 (QEMU 10.0.2) with its L2 running (recorded from the saved pair)."""
    desc = json.loads((DATA / "tcg-l1-with-l2.vmdesc.json").read_text())
    secs = nested.stream_sections(_stream(desc))
    assert secs["cpu"] == ["cpu/poll_control_msr", "cpu/msr_ia32_misc_enable", "cpu/pkru"]
    assert "pflash_cfi01" in secs and "0000:00:03.0/virtio-net" in secs
    ev = nested.nested_evidence(secs, source="state file", l0_accel="tcg", l2_running=True)
    assert not ev.kvm_nested_state and not ev.guest_mode
    assert ev.verdict.startswith("nested state: absent (TCG L0)")
    assert "L2 survived without nested state" in ev.verdict
    # the same description with KVM's nested state added is told apart
    cpu = next(d for d in desc["devices"] if d["name"] == "cpu")
    cpu["subsections"].append({"vmsd_name": "cpu/nested_state", "subsections": [
        {"vmsd_name": "cpu/kvm_nested_state", "subsections": [{"vmsd_name": "cpu/kvm_nested_state/svm"}]}]})
    ev = nested.nested_evidence(nested.stream_sections(_stream(desc)), source="state file", l0_accel="kvm",
                                l2_running=True)  # fmt: skip
    assert ev.kvm_nested_state and "L2 survived with nested state" in ev.verdict


def test_evidence_verdicts() -> None:
    kvm = nested.nested_evidence({"cpu": ["cpu/nested_state", "cpu/kvm_nested_state"]}, source="state file",
                                 l0_accel="kvm", l2_running=True)  # fmt: skip
    assert kvm.kvm_nested_state and "L2 survived with nested state" in kvm.verdict
    guest = nested.nested_evidence({"cpu": ["cpu/svm_guest"]}, source="probe", l0_accel="tcg", l2_running=True)
    assert not guest.kvm_nested_state and guest.guest_mode
    assert guest.verdict.startswith("nested state: absent (TCG L0)") and "guest mode" in guest.verdict
    host_mode = nested.nested_evidence({"cpu": ["cpu/async_pf_msr"]}, source="probe", l0_accel="tcg",
                                       l2_running=True)  # fmt: skip
    assert "L2 survived without nested state" in host_mode.verdict and not host_mode.guest_mode
    idle = nested.nested_evidence({"cpu": []}, source="probe", l0_accel="tcg", l2_running=False)
    assert "L2 idle" in idle.verdict
    missing = nested.nested_evidence({"cpu": []}, source="probe", l0_accel="kvm", l2_running=True)
    assert "absent although L2 ran on a KVM L0" in missing.verdict
    unknown = nested.nested_evidence(None, source="none", l0_accel="tcg", l2_running=True)
    assert "unknown" in unknown.verdict and not unknown.kvm_nested_state
    # only the cpu device's subsections count
    other = nested.nested_evidence({"kvmclock": ["cpu/nested_state"]}, source="probe", l0_accel="kvm",
                                   l2_running=True)  # fmt: skip
    assert not other.kvm_nested_state


def test_helper_source_builds_a_static_binary() -> None:
    try:
        exe = nested.helper_binary()
    except HostError as exc:
        pytest.skip(str(exc))
    head = exe.read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    assert exe.stat().st_size > 10_000


# --- the scenario -------------------------------------------------------------------------------


def test_nested_scenario_is_registered_with_its_modes() -> None:
    from harness import scenarios

    assert "nested" in scenarios.names()
    assert "cpr-transfer" in scenarios.names()["nested"]


def test_nested_scenario_refuses_an_unknown_mode_before_booting() -> None:
    from harness import scenarios
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="live, save-restore, cpr-reboot, cpr-transfer, nested-live"):
        scenarios.get("nested")(scenarios.ScenarioOptions(mode="cpr-exec"))


def test_repro_command_line_carries_mode_cycles_and_json(tmp_path: Path) -> None:
    from harness import cli

    args = cli.build_parser().parse_args(["repro", "nested", "--mode", "cpr-transfer", "--cycles", "5",
                              "--out", str(tmp_path / "out.json")])  # fmt: skip
    assert (args.scenario, args.mode, args.cycles, args.out) == ("nested", "cpr-transfer", 5, tmp_path / "out.json")


def test_guest_mode_limitation_is_recognised_only_for_its_own_error() -> None:
    from harness.migration import MigrationResult

    def result(status: str, error: str) -> MigrationResult:
        return MigrationResult(op="live", mode="normal", status=status, source="7.2", destination="10.0.2",
                               machine="pc-q35-7.2", error=error)  # fmt: skip

    # recorded from a real 7.2 -> 10.0.2 migration of a TCG L1 running an L2
    real = ("migration failed\ndestination output:\nqemu-system-x86_64: vCPU set in guest-mode "
            "inconsistent with migrated kernel nested state\nqemu-system-x86_64: error while loading "
            "state for instance 0x0 of device 'cpu'\nqemu-system-x86_64: load of migration failed: "
            "Invalid argument")  # fmt: skip
    assert nested.guest_mode_limitation(result("failed", real))
    other = real.replace("vCPU set in guest-mode inconsistent with migrated kernel nested state", "x")
    assert not nested.guest_mode_limitation(result("failed", other))
    assert not nested.guest_mode_limitation(result("completed", real))


def test_attempts_retry_with_l2_running_then_quiesce_the_refused_cycle() -> None:
    a = nested.Attempts(retries=3, quiesce_after=2)
    assert not a.quiesce()
    assert a.after(ok=False, known=True, quiesced=False) == "retry" and not a.quiesce()
    assert a.after(ok=False, known=True, quiesced=False) == "retry" and a.quiesce()
    assert a.after(ok=True, known=False, quiesced=True) == "next" and not a.quiesce()
    # the next cycle: one retry left, then its refusal quiesces at once
    assert a.after(ok=False, known=True, quiesced=False) == "retry" and a.retries == 0 and a.quiesce()
    # a quiesced attempt that is refused again, or any other failure, ends the run
    assert a.after(ok=False, known=True, quiesced=True) == "stop"
    assert nested.Attempts(retries=5).after(ok=False, known=False, quiesced=False) == "stop"


def test_attempts_without_quiesce_stop_when_the_retries_are_used_up() -> None:
    a = nested.Attempts(retries=1, quiesce_after=None)
    assert a.after(ok=False, known=True, quiesced=False) == "retry" and not a.quiesce()
    assert a.after(ok=False, known=True, quiesced=False) == "stop" and not a.quiesce()
    assert a.after(ok=True, known=False, quiesced=False) == "next"


def test_attempts_with_quiesce_after_zero_always_pause_l2() -> None:
    a = nested.Attempts(retries=0, quiesce_after=0)
    assert a.quiesce()
    assert a.after(ok=True, known=False, quiesced=True) == "next" and a.quiesce()


def test_a_refused_cycle_is_retried_with_the_variables_it_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_cycles with fakes: a cycle refused for guest mode is tried again without writing
    its EFI variables again (the refused attempt's checks found them; an L2 write costs
    seconds under TCG), and the retry is checked against the same values."""
    from types import SimpleNamespace

    from harness import migration
    from harness.migration import MigrationResult
    from harness.nested import cycles

    refusal = "qemu: " + cycles.GUEST_MODE_LOAD_ERROR
    statuses = iter([("failed", refusal), ("completed", ""), ("completed", "")])
    writes: list[tuple[str, bytes]] = []
    checked: list[tuple[bytes, bytes]] = []

    def hop(l1: object, **kw: object) -> MigrationResult:
        status, error = next(statuses)
        return MigrationResult(op="cpr-reboot", mode="cpr-reboot", status=status, source="10.0.2",
                               destination="10.0.2", machine="q35", error=error)  # fmt: skip

    def check(l1: object, l2: object, op: str, befores: object, values: tuple[bytes, bytes],
              cyc: object, res: MigrationResult, max_pause: object) -> None:
        checked.append(values)

    l1 = SimpleNamespace(accel="tcg", running=True, current=None, spec=SimpleNamespace(firmware_mode="split"))
    l2 = SimpleNamespace(write_efivar=lambda name, value: writes.append(("L2", value)),
                         snapshot=lambda memory=True: None)  # fmt: skip
    monkeypatch.setattr(migration, "operation", lambda op: hop)
    monkeypatch.setattr(migration, "recover_source", lambda current, res: True)
    monkeypatch.setattr(cycles.state, "write_efivar", lambda vm, name, value: writes.append(("L1", value)))
    monkeypatch.setattr(cycles.state, "snapshot", lambda vm, memory=True: None)
    monkeypatch.setattr(cycles, "l2_running", lambda l2: True)
    monkeypatch.setattr(cycles, "_check_pair", check)
    results = cycles.run_cycles(l1, l2, "cpr-reboot", 2)  # type: ignore[arg-type]
    assert [(r.cycle, r.ok, bool(r.extra.get("expected_failure"))) for r in results] == [
        (1, False, True), (1, True, False), (2, True, False)]  # fmt: skip
    assert [who for who, _ in writes] == ["L2", "L1", "L2", "L1"]  # once per cycle, not per attempt
    assert checked[0] == checked[1] == (writes[1][1], writes[0][1]) and checked[2] == (writes[3][1], writes[2][1])
    assert checked[2] != checked[0]
