"""Starting guests from specs and tearing all of them down: the machine factory.

:class:`MachineFactory` is a context manager that owns every :class:`Machine` it made and
their work directories.  On exit each machine is stopped in its own try/except (one
failure leaks nothing); when the caller says the run failed, the artifacts (QEMU command
lines, QEMU logs, serial logs, QMP transcripts, varstores before and after) are copied to
an artifacts directory first.  Work directories are short paths under a private base
directory (unix socket paths are limited to 107 bytes) and are removed afterwards.

The pytest fixtures, the CLI and the avocado tests all use this one class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from harness.errors import HarnessError
from harness.machine import Machine, sweep_all_orphans
from harness.spec import VmSpec, from_dict

log = logging.getLogger(__name__)

VARSTORE_BEFORE = "varstore-before.fd"
VARSTORE_AFTER = "varstore-after.fd"


def private_base(tag: str = "") -> Path:
    """A fresh 0700 directory with a short path for machines' work dirs, named
    ``hv-<pid><tag>-*`` so that a later run removes it when this process was killed
    before it could (:func:`harness.machine.sweep_orphan_dirs`)."""
    root = Path(os.environ.get("HARNESS_RUNDIR", tempfile.gettempdir()))
    sweep_all_orphans(root)
    return Path(tempfile.mkdtemp(prefix=f"hv-{os.getpid()}{tag}-", dir=root))


def safe_name(text: str, limit: int = 120) -> str:
    """``text`` made safe as one path component (test ids contain ``/``, ``[``, ...)."""
    out = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("._")
    return out[:limit] or "test"


class MachineFactory:
    """Makes machines from specs and reaps all of them."""

    def __init__(self, defaults: VmSpec | None = None, base: Path | None = None,
                 *, fast: bool = False) -> None:
        self.defaults = defaults or VmSpec()
        self.fast = fast
        self._own_base = base is None
        self.base = base or private_base()
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.machines: list[Machine] = []
        self._count = 0

    def spec(self, **fields: Any) -> VmSpec:
        """The default spec with ``fields`` applied (validated)."""
        return from_dict({**dataclasses.asdict(self.defaults), **fields})

    def __call__(self, *, start: bool = True, varstore: Path | None = None,
                 fast: bool | None = None, **fields: Any) -> Machine:
        """A new guest (started unless ``start=False``).

        ``fast`` (default: the factory's ``fast``) restores the guest from a saved booted
        guest of the same inputs (:mod:`harness.snapshots`) instead of booting it: a
        fraction of the time, with its own varstore copy and a fresh identity.  A guest
        given its own ``varstore`` always boots cold."""
        spec = self.spec(**fields)
        machine = self._new(spec, varstore)
        if start:
            self._keep_varstore_before(machine, varstore)
            if (self.fast if fast is None else fast) and varstore is None:
                from harness import snapshots

                snapshots.start_fast(machine, make_template=lambda: self._new(spec, None, tag="tmpl"))
            else:
                machine.start()
        return machine

    def _new(self, spec: VmSpec, varstore: Path | None, tag: str = "") -> Machine:
        self._count += 1
        workdir = self.base / f"{self._count}{tag}-{safe_name(spec.name, 24)}"
        machine = Machine(spec, workdir, varstore=varstore)
        self.machines.append(machine)
        return machine

    @staticmethod
    def _keep_varstore_before(machine: Machine, varstore: Path | None) -> None:
        """Copy the varstore the guest starts from, for the artifacts' before/after pair."""
        source = varstore if varstore is not None and varstore.exists() else machine.varstore_template
        if source is None:
            return
        try:
            shutil.copyfile(source, machine.workdir / VARSTORE_BEFORE)
        except OSError as exc:
            log.warning("varstore %s not kept for artifacts: %s", source, exc)

    def save_artifacts(self, dest: Path) -> Path:
        """Copy every machine's logs, command lines, transcripts and varstores to ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        for m in self.machines:
            out = dest / m.workdir.name
            out.mkdir(parents=True, exist_ok=True)
            try:
                files = m.artifacts()
            except OSError:
                continue
            for f in files:
                try:
                    shutil.copy2(f, out / f.name)
                except OSError as exc:
                    log.warning("artifact %s not copied: %s", f, exc)
        return dest

    def close(self, failed: bool = False, artifacts: Path | None = None) -> Path | None:
        """Stop every machine; keep artifacts when ``failed``; remove work dirs.

        Returns the artifacts directory when artifacts were kept, else None."""
        kept = None
        last_varstores: dict[int, Path] = {}
        for m in self.machines:
            with contextlib.suppress(HarnessError):  # SeaBIOS/stateless: no varstore
                last_varstores[id(m)] = m.varstore_path
            try:
                m.stop(hard=failed)
            except Exception:  # noqa: BLE001 - one failure must not leak the others
                log.exception("stopping %r failed", m)
        if failed and artifacts is not None and self.machines:
            for m in self.machines:
                last = last_varstores.get(id(m))
                if last is not None and last.is_file():
                    try:
                        shutil.copyfile(last, m.workdir / VARSTORE_AFTER)
                    except OSError as exc:
                        log.warning("varstore %s not kept for artifacts: %s", last, exc)
            try:
                kept = self.save_artifacts(artifacts)
            except OSError:
                log.exception("saving artifacts to %s failed", artifacts)
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)
        else:
            for m in self.machines:
                shutil.rmtree(m.workdir, ignore_errors=True)
        self.machines = []
        return kept

    def __enter__(self) -> MachineFactory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc_type is not None)
