"""Re-record ``booted-2025.02-4m.fd.xz``: OVMF's varstore after one boot with no disk.

Not a test (pytest does not collect it).  Run from the repository root:

    .venv/bin/python tests/unit/data/varstore/record_booted.py [OVMF_VERSION] [QEMU_VERSION]

It boots QEMU (TCG, q35, split pflash: read-only OVMF_CODE_4M + a private copy of
OVMF_VARS_4M, no disk, one virtio NIC with a fixed MAC on user networking) until the
serial console shows OVMF giving up on every boot option (or the time limit), quits
QEMU gracefully through SIGTERM so the pflash contents reach the file, and stores the
varstore xz-compressed next to this script together with the serial log.
"""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.inventory import catalog
from harness.inventory.firmware import get_firmware
from harness.inventory.provision import Provisioner
from harness.varstore import instantiate

HERE = Path(__file__).resolve().parent
# What OVMF prints once BDS has walked the boot options (the shell banner or the
# boot manager's "no bootable option" path, depending on the build).
MARKERS = ("Shell>", "UEFI Interactive Shell", "Boot Manager", "No bootable option")
LIMIT_S = 60.0


def main(fw_version: str = "2025.02", qemu_version: str = "10.0.2") -> int:
    fw = get_firmware(fw_version)
    pair = fw.select()
    entry = catalog.default().qemu_entry(qemu_version)
    prefix = Provisioner(catalog.default()).ensure_qemu(entry)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{prefix}/usr/lib/x86_64-linux-gnu:{prefix}/lib/x86_64-linux-gnu"
    with tempfile.TemporaryDirectory(prefix="record-varstore-") as tmp:
        vars_copy = instantiate(pair.vars_template, Path(tmp) / "VARS.fd")
        serial = Path(tmp) / "serial.log"
        cmd = [str(prefix / entry.binary)]
        for d in entry.datadirs:
            cmd += ["-L", str(prefix / d)]
        cmd += [
            "-machine", "q35,accel=tcg", "-m", "512", "-nographic", "-no-user-config",
            "-display", "none", "-monitor", "none", "-serial", f"file:{serial}",
            "-nic", "user,model=virtio-net-pci,mac=52:54:00:12:34:56",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={pair.code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        ]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        seen = ""
        try:
            while time.monotonic() - start < LIMIT_S and proc.poll() is None:
                time.sleep(0.5)
                seen = serial.read_text(errors="replace") if serial.exists() else ""
                if any(m in seen for m in MARKERS):
                    time.sleep(2.0)  # let BDS finish its variable writes
                    break
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        elapsed = time.monotonic() - start
        name = f"booted-{fw_version}-4m"
        (HERE / f"{name}.fd.xz").write_bytes(lzma.compress(vars_copy.read_bytes()))
        shutil.copyfile(serial, HERE / f"{name}.serial.log")
        sys.stderr.write(f"recorded {name} in {elapsed:.1f}s; markers seen: "
                         f"{[m for m in MARKERS if m in seen]}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
