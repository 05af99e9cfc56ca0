"""QEMU 10.0.2 built from Debian's source tarball boots and passes a cpr-reboot repro.

Building takes 20-40 minutes on two cores, so this test does not build inside ``make test``:
it runs when the build for the tarball (default configure arguments) is already in the
source-build cache (``harness build-qemu ~/.cache/qemu-harness/src/qemu_10.0.2+ds.orig.tar.xz``),
or builds it first when ``HARNESS_SOURCE_BUILD=1`` is set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness import cli
from harness.inventory import builds, sources
from harness.paths import cache_root

pytestmark = pytest.mark.integration

TARBALL = cache_root() / "src" / "qemu_10.0.2+ds.orig.tar.xz"
OPT_IN = "HARNESS_SOURCE_BUILD"


@pytest.fixture(scope="module")
def source_build() -> sources.SourceBuild:
    if not TARBALL.is_file():
        pytest.skip(f"{TARBALL} absent (`harness provision --python-source` fetches it)")
    key = sources.build_key(sources.hash_source(TARBALL), [], sources.configure_args())
    cached = sources.find_cached(key)
    if cached is not None:
        return cached
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"no cached source build of {TARBALL.name} (a 20-40 min build): run "
                    f"`harness build-qemu {TARBALL}` first, or set {OPT_IN}=1 to build it here")
    return sources.build_qemu(TARBALL)


def test_source_build_is_the_tarballs_version(source_build: sources.SourceBuild) -> None:
    assert source_build.label.startswith("src:10.0.2+")
    build = builds.get_build(source_build.label)
    assert build.binary == source_build.binary
    caps = build.capabilities  # probed over QMP from the built binary
    assert caps.version == "10.0.2"
    assert "cpr-reboot" in caps.migration_modes
    assert "pc-q35-10.0" in caps.machine_names()


def test_source_build_boots_and_passes_cpr_reboot_repro(
    source_build: sources.SourceBuild, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "repro.json"
    rc = cli.main(["repro", "cpr-reboot", "--qemu", source_build.label, "--cycles", "3",
                   "--out", str(out), "--artifacts", str(tmp_path / "artifacts")])  # fmt: skip
    printed = capsys.readouterr()
    data = json.loads(out.read_text())
    assert rc == 0, f"{printed.out}\n{printed.err}"
    assert data["ok"] is True
    assert len(data["records"]) == 3
    for rec in data["records"]:
        assert rec["ok"] and rec["op"] == "cpr-reboot", rec
        assert rec["source"] == source_build.label == rec["destination"], rec
    assert any("guest ready" in n and source_build.label in n for n in data["notes"]), data["notes"]
