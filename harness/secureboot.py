"""What a Secure Boot (and SMM) guest must keep across a hop, observed from three sides.

* The guest's view: ``SecureBoot`` and ``SetupMode`` as efivarfs shows them, and digests of
  PK, KEK, db and dbx.
* The host-side varstore file (read with virt-firmware): the same four key databases.
* The SMRAM lock as a non-SMM observer sees it: the SMRAM, SMBASE and TSEG regions of QEMU's
  memory tree (HMP ``info mtree`` through QMP), HMP ``xp`` of the default SMBASE and the
  legacy SMRAM window, and the guest's own read of those ranges through ``/dev/mem``.

Plus an authenticated variable: a time-based authenticated write (``sbvarsign`` with the
enrolled key set's key) that must be accepted and persist, and one signed with another key
that must be refused, before and after every hop.

:func:`observe` takes an :class:`SbView`; :func:`problems` says in words what differs
between two views (source before the hop, destination after it).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import state, varstore
from harness.errors import FirmwareError, HarnessError, ImageBuildError
from harness.paths import cache_root

if TYPE_CHECKING:
    from harness.machine import Machine

EFI_GLOBAL = state.EFI_GLOBAL
IMAGE_SECURITY = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
#: The key databases, where they live.
KEY_VARS = (("PK", EFI_GLOBAL), ("KEK", EFI_GLOBAL), ("db", IMAGE_SECURITY), ("dbx", IMAGE_SECURITY))
#: The authenticated (time-based) variable the checks write: a private one, whose first
#: write's signer is the only one the firmware accepts afterwards.
AUTH_VAR = "HarnessAuth"
AUTH_ATTRS = 0x27  # NV | BS | RT | TIME_BASED_AUTHENTICATED_WRITE_ACCESS
_SBVARSIGN_ATTRS = "NON_VOLATILE,BOOTSERVICE_ACCESS,RUNTIME_ACCESS,TIME_BASED_AUTHENTICATED_WRITE_ACCESS"
#: Physical ranges whose non-SMM view must not change: the default SMBASE (SMRAM once the
#: firmware locked it) and the legacy SMRAM window.
SMRAM_RANGES = ((0x30000, 0x10000), (0xA0000, 0x20000))
_MTREE_WORDS = ("smram", "smbase", "tseg")


def _digest(data: bytes | None) -> str:
    return "" if data is None else hashlib.sha256(data).hexdigest()[:16]


@dataclass
class SbView:
    """One observation of a Secure Boot guest (see the module docstring)."""

    secure_boot: int | None
    setup_mode: int | None
    guest_keys: dict[str, str]  # name -> digest of the data ("" when absent)
    file_keys: dict[str, str]
    mtree: list[str] = field(default_factory=list)  # SMRAM/SMBASE/TSEG lines of info mtree
    xp: dict[str, str] = field(default_factory=dict)  # range -> digest of HMP xp's bytes
    devmem: dict[str, str] = field(default_factory=dict)  # range -> digest of the guest's read
    tpm: Any = None  # a harness.tpm.TpmView when the guest has a vTPM

    def to_json(self) -> dict[str, Any]:
        return {"secure_boot": self.secure_boot, "setup_mode": self.setup_mode,
                "guest_keys": self.guest_keys, "file_keys": self.file_keys, "mtree": self.mtree,
                "xp": self.xp, "devmem": self.devmem}  # fmt: skip


def _byte(value: tuple[int, bytes] | None) -> int | None:
    return None if value is None or not value[1] else value[1][0]


def observe(vm: Machine, *, file_settle_s: float = 0.0) -> SbView:
    """Everything :func:`problems` compares, from the guest, the file and QEMU."""
    seen = state.guest_variables(vm)
    view = SbView(
        secure_boot=_byte(seen.get(("SecureBoot", EFI_GLOBAL))),
        setup_mode=_byte(seen.get(("SetupMode", EFI_GLOBAL))),
        guest_keys={n: _digest(v[1]) if (v := seen.get((n, g))) else "" for n, g in KEY_VARS},
        file_keys=file_keys(vm.varstore_path),
    )
    if vm.spec.arch == "x86_64":
        view.mtree = smram_mtree(vm)
        view.xp = {f"{a:#x}+{n:#x}": _digest(hmp_xp(vm, a, n)) for a, n in SMRAM_RANGES}
        view.devmem = guest_devmem(vm)
    return view


def file_keys(path: Path) -> dict[str, str]:
    model = varstore.read_varstore(path)
    out = {}
    for name, guid in KEY_VARS:
        var = model.get(name, guid)
        out[name] = _digest(var.data) if var is not None else ""
    return out


_REGION_KIND = re.compile(r"\(prio (-?\d+), [a-z/-]+\)")


def smram_mtree(vm: Machine) -> list[str]:
    """The SMRAM, SMBASE and TSEG lines of QEMU's memory tree (enabled or not), sorted, as
    :func:`normalize_mtree` makes them comparable across QEMU versions."""
    text = str(vm.qmp("human-monitor-command", **{"command-line": "info mtree"}))
    return normalize_mtree(text)


def normalize_mtree(text: str) -> list[str]:
    """The lines naming SMRAM, SMBASE or TSEG, without the region kind QEMU prints after
    the priority (11.1 says ``container`` where 10.0 said ``i/o`` for the same region)."""
    return sorted(_REGION_KIND.sub(r"(prio \1)", ln.strip()) for ln in text.splitlines()
                  if any(w in ln.lower() for w in _MTREE_WORDS))  # fmt: skip


def hmp_xp(vm: Machine, addr: int, size: int) -> bytes:
    """Guest-physical memory as the non-SMM address space shows it (HMP ``xp``)."""
    out = bytearray()
    chunk = 0x1000
    for base in range(addr, addr + size, chunk):
        text = str(vm.qmp("human-monitor-command", **{"command-line": f"xp /{chunk // 8}xg {base:#x}"}))
        for line in text.splitlines():
            _, _, values = line.partition(":")
            for word in values.split():
                out += int(word, 16).to_bytes(8, "little")
    return bytes(out)


def guest_devmem(vm: Machine) -> dict[str, str]:
    """The guest's own read of :data:`SMRAM_RANGES` through ``/dev/mem`` (digests; the
    kernel may serve RAM in the first MiB as zeros, which is fine: it must not change).
    Under Secure Boot Debian's kernel locks itself down and refuses ``/dev/mem``; then the
    observation is that refusal with the lockdown mode, which must not change either."""
    cmds = [
        f"if d=$(dd if=/dev/mem bs=4096 skip={a // 4096} count={n // 4096} 2>/dev/null | sha256sum) "
        f"&& dd if=/dev/mem bs=1 count=1 >/dev/null 2>&1; then echo ${{d%% *}}; "
        f"else echo denied:$(cat /sys/kernel/security/lockdown 2>/dev/null | tr -d ' '); fi"
        for a, n in SMRAM_RANGES]  # fmt: skip
    mount = ("grep -q ' /sys/kernel/security ' /proc/mounts || "
             "mount -t securityfs securityfs /sys/kernel/security 2>/dev/null")
    res = vm.ssh.run("; ".join([mount, *cmds]), timeout=60)
    sums = [ln.strip()[:40] for ln in res.stdout.splitlines() if ln.strip()]
    return {f"{a:#x}+{n:#x}": s for (a, n), s in zip(SMRAM_RANGES, sums, strict=False)}


def problems(before: SbView, after: SbView, where: str = "after the hop") -> list[str]:
    """What differs, in words; also a view that is not in enforcing Secure Boot."""
    out = []
    if after.secure_boot != 1 or after.setup_mode != 0:
        out.append(f"{where}: SecureBoot={after.secure_boot} SetupMode={after.setup_mode} as the guest reads "
                   f"them (expected 1 and 0, as before: {before.secure_boot} and {before.setup_mode})")  # fmt: skip
    for side, a, b in (("the guest's view", before.guest_keys, after.guest_keys),
                       ("the varstore file", before.file_keys, after.file_keys)):  # fmt: skip
        for name, _guid in KEY_VARS:
            if a.get(name) != b.get(name):
                out.append(f"{where}: {name} changed in {side} ({a.get(name) or 'absent'} -> "
                           f"{b.get(name) or 'absent'})")  # fmt: skip
    for name, _guid in KEY_VARS:
        if after.guest_keys.get(name) != after.file_keys.get(name):
            out.append(f"{where}: {name} differs between the guest's view and the varstore file")
    if sorted(before.mtree) != sorted(after.mtree):  # the same regions; QEMU's print order varies
        gone = [ln for ln in before.mtree if ln not in after.mtree]
        new = [ln for ln in after.mtree if ln not in before.mtree]
        out.append(f"{where}: the SMRAM regions of QEMU's memory tree differ: source only {gone[:4]}, "
                   f"destination only {new[:4]}")  # fmt: skip
    for label, a, b in (("HMP xp", before.xp, after.xp), ("the guest's /dev/mem", before.devmem, after.devmem)):
        for rng in sorted(set(a) | set(b)):
            if a.get(rng) != b.get(rng):
                out.append(f"{where}: the non-SMM view of {rng} through {label} changed "
                           f"({a.get(rng)} -> {b.get(rng)})")  # fmt: skip
    return out


# --- authenticated variable writes -------------------------------------------------------


def harness_key(name: str) -> tuple[Path, Path]:
    """A self-signed key and certificate of the harness (``owner``, ``other``), made once
    and cached.  They carry a Common Name: edk2 derives a private authenticated variable's
    owner from the signer's CN, and refuses a signer without one (Debian's snakeoil
    certificate has none, so it cannot own such a variable)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    d = cache_root() / "keys"
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    if key.is_file() and cert.is_file():
        return key, cert
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    pkey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"qemu-harness {name} key")])
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    c = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(pkey.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=3650)).sign(pkey, hashes.SHA256()))  # fmt: skip
    tmp_key, tmp_cert = d / f".{name}-{os.getpid()}.key", d / f".{name}-{os.getpid()}.pem"
    tmp_key.write_bytes(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    tmp_key.chmod(0o600)
    tmp_cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    tmp_key.replace(key)
    tmp_cert.replace(cert)
    return key, cert


_last_signed = 0.0


def signed_write(value: bytes, key: Path, cert: Path, work: Path, passphrase: bytes | None = None) -> bytes:
    """The payload of a time-based authenticated write of :data:`AUTH_VAR` (an
    EFI_VARIABLE_AUTHENTICATION_2 descriptor, then ``value``), signed by ``sbvarsign``.
    Timestamps have one-second resolution and must increase: successive calls are spaced."""
    from harness.images import run_tool, write_plain_key

    global _last_signed
    wait = _last_signed + 1.05 - time.time()
    if wait > 0:
        time.sleep(wait)
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    data, out, plain = work / "auth-data.bin", work / "auth-data.signed", work / "auth-signing.key"
    data.write_bytes(value)
    try:
        write_plain_key(key, plain, passphrase)
        run_tool(["sbvarsign", "--key", plain, "--cert", cert, "--guid", state.HARNESS_GUID,
                  "--attr", _SBVARSIGN_ATTRS, "--output", out, AUTH_VAR, data])  # fmt: skip
    except ImageBuildError as exc:
        raise FirmwareError(f"signing an authenticated write of {AUTH_VAR}: {exc}") from exc
    finally:
        plain.unlink(missing_ok=True)
    _last_signed = time.time()
    return out.read_bytes()


def try_auth_write(vm: Machine, payload: bytes) -> str | None:
    """Write an authenticated payload from inside the guest; None when the firmware took
    it, else the guest's error."""
    try:
        state.write_efivar(vm, AUTH_VAR, payload, attrs=AUTH_ATTRS)
    except HarnessError as exc:
        return str(exc)
    return None


def auth_round(vm: Machine, label: str) -> list[str]:
    """The authenticated-variable checks at one point (``label``): a write signed with the
    variable's owner key (the harness's ``owner`` key, whose first write made it the owner)
    is accepted and reads back, in the guest and in the varstore file; one signed with
    another key is refused and changes nothing."""
    out = []
    okey, ocert = harness_key("owner")
    value = f"harness {label} {time.time():.3f}".encode()
    err = try_auth_write(vm, signed_write(value, okey, ocert, vm.workdir))
    if err is not None:
        out.append(f"{label}: an authenticated write of {AUTH_VAR} signed with its owner's key was refused: {err}")
    got = state.read_efivar(vm, AUTH_VAR)
    if err is None and got != value:
        out.append(f"{label}: {AUTH_VAR} reads {got!r} after an accepted write of {value!r}")
    wkey, wcert = harness_key("other")
    if try_auth_write(vm, signed_write(b"written with another key", wkey, wcert, vm.workdir)) is None:
        out.append(f"{label}: an authenticated write of {AUTH_VAR} signed with a key that does not own it was accepted")
    after = state.read_efivar(vm, AUTH_VAR)
    if after != got:
        out.append(f"{label}: {AUTH_VAR} changed from {got!r} to {after!r} after a refused write")
    in_file = auth_file_value(vm.varstore_path)
    if after is not None and in_file != after:
        out.append(f"{label}: {AUTH_VAR} in the varstore file {vm.varstore_path} is {in_file!r}, the guest reads {after!r}")
    return out


def auth_value(vm: Machine) -> bytes | None:
    return state.read_efivar(vm, AUTH_VAR)


def auth_file_value(path: Path) -> bytes | None:
    var = varstore.read_varstore(path).get(AUTH_VAR, state.HARNESS_GUID)
    return None if var is None else var.data


def describe(view: SbView) -> str:
    return " ".join(shlex.quote(f"{k}={v}") for k, v in view.to_json().items() if k in ("secure_boot", "setup_mode"))
