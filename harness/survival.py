"""Varstore survival: what the guest wrote must be in the guest's view AND in the file.

A test *plants* state from inside the guest (:func:`plant`: an EFI variable under the
harness GUID, a ``Boot####`` entry of its own and a ``BootOrder`` that puts it first),
moves or restarts the guest, then checks (:func:`persisted_problems`) that

- the guest still reads the variable and the BootOrder (efivarfs, through the agent);
- the host-side varstore file of the process now running the guest holds them
  (:func:`host_problems`, read with :func:`harness.varstore.read_varstore`);
- the guest's whole efivarfs view agrees with that file (:func:`view_problems`, through
  :func:`harness.varstore.compare_guest_view`);
- after a migration, the destination's varstore, which started as a fresh copy of the
  template, equals the source's byte for byte (:func:`identical_problems`): QEMU writes
  the migrated flash contents into it when the guest starts running there.

Stateless firmware (``firmware_mode="stateless"``) has no file: the host-side checks
say so plainly instead of failing obscurely, and :func:`forgotten_problems` checks the
other half of its contract: what the guest wrote is gone after QEMU restarts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import bootorder, state, varstore
from harness.errors import HarnessError, StateError
from harness.varstore import VarstoreModel, boot_name

if TYPE_CHECKING:
    from harness.machine import Machine

SURVIVE_VAR = "HarnessSurvive"
STATELESS_NOTE = ("this guest runs stateless firmware (firmware_mode='stateless'): OVMF keeps "
                  "variables in guest RAM only, there is no varstore file, and nothing the "
                  "guest writes survives a QEMU restart")  # fmt: skip


@dataclass(frozen=True)
class Planted:
    """What the guest wrote and expects to persist."""

    variables: Mapping[tuple[str, str], bytes] = field(default_factory=dict)
    boot_order: tuple[int, ...] | None = None
    boot_entry: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "variables": {f"{n}-{g}": v.hex() for (n, g), v in self.variables.items()},
            "boot_order": None if self.boot_order is None else [boot_name(n) for n in self.boot_order],
            "boot_entry": None if self.boot_entry is None else boot_name(self.boot_entry),
        }


def plant(vm: Machine, value: bytes | None = None, *, name: str = SURVIVE_VAR,
          boot_order: bool = True) -> Planted:
    """From inside the guest: write variable ``name`` (harness GUID, NV|BS|RT) and, with
    ``boot_order``, add :data:`harness.bootorder.USER_ENTRY` (the boot disk under another
    title) and set BootOrder with it first, the previous order after it."""
    value = value if value is not None else f"survive-{time.time_ns()}".encode()
    state.write_efivar(vm, name, value)
    order: tuple[int, ...] | None = None
    entry: int | None = None
    if boot_order:
        view = bootorder.guest_boot(vm)
        if bootorder.USER_ENTRY not in view.raw_entries:
            bootorder.add_boot_entry(vm, view=view)
        entry = bootorder.USER_ENTRY
        order = (entry, *(n for n in view.order if n != entry))
        bootorder.set_boot_order(vm, order)
    return Planted({(name, state.HARNESS_GUID): value}, order, entry)


# --- the checks --------------------------------------------------------------------------


def guest_problems(vm: Machine, planted: Planted,
                   guest_vars: Mapping[tuple[str, str], tuple[int, bytes]] | None = None, *,
                   order_may_grow: bool = False) -> list[str]:
    """The planted variables and BootOrder as the guest reads them (``order_may_grow``:
    entries appended after the planted order are accepted, e.g. after a firmware upgrade)."""
    gv = guest_vars if guest_vars is not None else state.guest_variables(vm)
    out = []
    for (name, guid), value in planted.variables.items():
        got = gv.get((name, guid.lower()))
        p = state.efivar_problem(name, guid, value, None if got is None else got[1], "the guest")
        if p:
            out.append(p)
    if planted.boot_order is not None:
        got = gv.get(("BootOrder", varstore.EFI_GLOBAL_VARIABLE))
        if got is None:
            out.append("BootOrder: the guest has none")
        else:
            out += bootorder.boot_order_problems(
                planted.boot_order, varstore.decode_boot_order(got[1]), "the guest",
                may_grow=order_may_grow)
    if out and vm.spec.firmware_mode == "stateless":
        out.append(STATELESS_NOTE)
    return out


def model_problems(model: VarstoreModel, planted: Planted, *,
                   order_may_grow: bool = False) -> list[str]:
    """The planted variables and BootOrder in a varstore file's model."""
    out = []
    for (name, guid), value in planted.variables.items():
        var = model.get(name, guid)
        p = state.efivar_problem(name, guid, value, None if var is None else var.data,
                                 f"the varstore file {model.path}")  # fmt: skip
        if p:
            out.append(p)
    if planted.boot_order is not None:
        out += bootorder.boot_order_problems(planted.boot_order, model.boot_order,
                                             f"the varstore file {model.path}",
                                             may_grow=order_may_grow)  # fmt: skip
    if planted.boot_entry is not None and planted.boot_entry not in model.boot_entries:
        out.append(f"{boot_name(planted.boot_entry)} (the guest's own entry) is not in {model.path}")
    return out


def _file_of(vm: Machine) -> Path:
    if vm.spec.firmware is not None and vm.spec.firmware_mode == "stateless":
        raise StateError(f"{vm.spec.name}: no host-side varstore to check: {STATELESS_NOTE}")
    return vm.varstore_path


def host_problems(target: Machine | Path, planted: Planted, *,
                  order_may_grow: bool = False) -> list[str]:
    """The planted state in the host-side varstore file (of the guest's current process,
    or a path, e.g. one taken before the guest powered off)."""
    path = target if isinstance(target, Path) else _file_of(target)
    try:
        return model_problems(varstore.read_varstore(path), planted,
                              order_may_grow=order_may_grow)
    except HarnessError as exc:
        return [f"host varstore unreadable: {exc}"]


def view_problems(target: Machine | Path,
                  guest_vars: Mapping[tuple[str, str], tuple[int, bytes]]) -> list[str]:
    """The guest's efivarfs view against the host-side file (every non-volatile,
    runtime-visible variable, both ways)."""
    path = target if isinstance(target, Path) else _file_of(target)
    try:
        model = varstore.read_varstore(path)
    except HarnessError as exc:
        return [f"host varstore unreadable: {exc}"]
    return [f"guest view vs file: {p}" for p in
            varstore.compare_guest_view(model, guest_vars, complete=True)]  # fmt: skip


def identical_problems(source: Path, dest: Path) -> list[str]:
    """The destination's varstore must equal the source's byte for byte; otherwise say how
    many bytes differ, where, and which variables."""
    try:
        a, b = source.read_bytes(), dest.read_bytes()
    except OSError as exc:
        return [f"cannot compare varstores {source} and {dest}: {exc}"]
    if a == b:
        return []
    if len(a) != len(b):
        head = f"{len(a)} -> {len(b)} bytes"
    else:
        offsets = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        head = (f"{len(offsets)} of {len(a)} bytes differ, offsets 0x{offsets[0]:x}..0x{offsets[-1]:x}")
    words = ""
    try:
        d = varstore.diff(varstore.read_varstore(source), varstore.read_varstore(dest))
        parts = ([f"missing {', '.join(v.name for v in d.removed)}"] if d.removed else []) + \
                ([f"extra {', '.join(v.name for v in d.added)}"] if d.added else []) + \
                ([f"changed {', '.join(n.name for _, n in d.changed)}"] if d.changed else [])  # fmt: skip
        words = "; variables: " + ("; ".join(parts) if parts else "same (layout differs only)")
    except HarnessError as exc:
        words = f"; cannot decode: {exc}"
    return [f"destination varstore {dest} is not the source's {source}: {head}{words}"]


def wait_identical(source: Path, dest: Path, timeout: float = 15.0) -> list[str]:
    """:func:`identical_problems`, polled until empty or ``timeout`` (QEMU writes the
    migrated flash when the guest starts running on the destination)."""
    deadline = time.monotonic() + timeout
    while True:
        problems = identical_problems(source, dest)
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.2)


def persisted_problems(vm: Machine, planted: Planted, *, source_varstore: Path | None = None,
                       timeout: float = 15.0, order_may_grow: bool = False) -> list[str]:
    """Everything :mod:`harness.survival` checks, for the guest as it runs now: guest view,
    host file, guest view vs file, and (with ``source_varstore``, taken before a
    migration) destination == source byte for byte.  For a stateless guest only the
    guest's view is checked."""
    guest_vars = state.guest_variables(vm)
    out = guest_problems(vm, planted, guest_vars, order_may_grow=order_may_grow)
    if vm.spec.firmware_mode == "stateless":
        return out
    path = vm.varstore_path
    if source_varstore is not None:
        if source_varstore == path:
            out.append(f"the destination uses the source's varstore file {path}: not a fresh copy")
        else:
            out += wait_identical(source_varstore, path, timeout)
    out += host_problems(path, planted, order_may_grow=order_may_grow)
    out += view_problems(path, guest_vars)
    return out


def assert_persisted(vm: Machine, planted: Planted, *, source_varstore: Path | None = None,
                     what: str = "", order_may_grow: bool = False) -> None:
    """Fail with every problem :func:`persisted_problems` finds."""
    problems = persisted_problems(vm, planted, source_varstore=source_varstore,
                                  order_may_grow=order_may_grow)
    if problems:
        head = f"guest-written varstore state did not survive{' ' + what if what else ''}"
        raise StateError(head + ":\n  - " + "\n  - ".join(problems))


def forgotten_problems(vm: Machine, planted: Planted) -> list[str]:
    """After a QEMU restart of a stateless guest: the planted variables must be gone."""
    gv = state.guest_variables(vm)
    out = []
    for (name, guid), value in planted.variables.items():
        got = gv.get((name, guid.lower()))
        if got is not None:
            stateless = vm.spec.firmware_mode == "stateless"
            out.append(
                f"EFI variable {name}-{guid} is still in the guest after a restart "
                f"({'the same value' if got[1] == value else 'another value'})"
                + (": stateless firmware must not keep what the guest wrote" if stateless
                   else ": expected only on stateless firmware; this guest has a varstore file")
            )  # fmt: skip
    return out


def assert_forgotten(vm: Machine, planted: Planted) -> None:
    problems = forgotten_problems(vm, planted)
    if problems:
        raise StateError("\n".join(problems))


def assert_no_problems(problems: Sequence[str], what: str) -> None:
    """Raise :class:`StateError` listing ``problems`` under a heading (no-op when empty)."""
    if problems:
        raise StateError(f"{what}:\n  - " + "\n  - ".join(problems))
