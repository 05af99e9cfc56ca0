"""The harness's scenarios as avocado-instrumented tests.

Run them with avocado (they use the library exactly as ``harness repro`` and the pytest
tests do), e.g.::

    .venv/bin/avocado run tests/avocado/test_scenarios.py
    .venv/bin/avocado run tests/avocado/test_scenarios.py:Scenarios.test_cpr_reboot \\
        -p qemu=10.0.2 -p cycles=3 --job-results-dir results/avocado

Parameters (``-p NAME=VALUE``): ``qemu`` (a build: catalogue version, registered label such
as ``src:10.0.2+1a2b3c4d``, or a path; default 10.0.2), ``peer`` (the migration destination,
default: the same build), ``ovmf`` (default 2022.11), ``cycles`` (default 3), ``fast``
(1: the scenario's guest is restored from a saved boot instead of booting cold; default 0).  Builds
registered by ``harness nightly --qemu-deb`` are visible through ``$HARNESS_REGISTRY``.
Avocado writes its own results (``results.json``, ``results.xml``, per-test logs) under the
job results directory; the scenario records go to the test's log and its ``whiteboard``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from avocado import Test

from harness import scenarios
from harness.factory import MachineFactory
from harness.spec import VmSpec


class Scenarios(Test):  # type: ignore[misc]
    """Boot, live migration and cpr-reboot of one UEFI guest (TCG here, KVM where usable)."""

    timeout = 900

    def _param(self, name: str, default: str) -> str:
        return str(self.params.get(name, default=default))

    def _run(self, name: str, qemu: list[str], cycles: int) -> None:
        # workdir None: the factory's short private base (avocado's own workdir is too long
        # for the unix sockets QEMU listens on); failures are copied into the test's logdir
        opts = scenarios.ScenarioOptions(
            qemu=qemu, ovmf=[self._param("ovmf", "2022.11")], cycles=cycles,
            workdir=None, artifacts=Path(self.logdir) / "harness-artifacts",
            extra={"fast": self._param("fast", "0")},
            on_record=lambda rec: self.log.info("record: %s", json.dumps(rec, default=str)),
        )  # fmt: skip
        report = scenarios.get(name)(opts)
        self.whiteboard = json.dumps(report.to_json(), default=str)
        for note in report.notes:
            self.log.info("note: %s", note)
        bad = [r for r in report.records if not (r.get("ok") or r.get("expected_failure"))]
        if not report.ok:
            first = bad[0] if bad else {}
            self.fail(f"{name} on {' -> '.join(qemu)}: {len(bad)} of {len(report.records)} "
                      f"records failed; first: {first.get('signature') or ''} "
                      f"{str(first.get('error') or first.get('problems') or first.get('status'))[:300]}"
                      f"; artifacts: {report.artifacts}")  # fmt: skip

    def test_boot(self) -> None:
        """A UEFI guest boots to SSH and its agent answers."""
        spec = VmSpec(qemu=self._param("qemu", "10.0.2"), firmware=self._param("ovmf", "2022.11"),
                      name="avocado-boot")  # fmt: skip
        with MachineFactory(spec) as factory:
            vm = factory()
            res = vm.ssh.run(shlex.join(["agent", "status"]), timeout=120)
            self.log.info("agent status: %s", res.stdout.strip())
            self.assertEqual(res.rc, 0, f"agent status failed: {res.stderr}")
            self.log.info("ready in %.1f s (boot id %s)", vm.ready.seconds if vm.ready else -1,
                          vm.ready.boot_id if vm.ready else "?")  # fmt: skip

    def test_live_migration(self) -> None:
        """Back-to-back live migrations between ``qemu`` and ``peer``."""
        qemu = self._param("qemu", "10.0.2")
        peer = self._param("peer", qemu)
        self._run("live", [qemu] if peer == qemu else [qemu, peer], int(self._param("cycles", "2")))

    def test_cpr_reboot(self) -> None:
        """Back-to-back cpr-reboot live updates on ``qemu``."""
        self._run("cpr-reboot", [self._param("qemu", "10.0.2")], int(self._param("cycles", "3")))
