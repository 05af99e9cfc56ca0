"""Unit tests run without anything provisioned: each module sees an empty cache of its own
(``HARNESS_CACHE``), no run registry, and a provisioner that refuses to fetch, so a unit
test that needs a real QEMU build, OVMF package or guest image fails here instead of
quietly downloading one (module scope, so a module's own fixtures see it too, and the
integration tests sharing a worker do not).  Tests about the real packages live in
``tests/integration/``."""

from __future__ import annotations

import hashlib
import lzma
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from harness.inventory import provision, registry


@pytest.fixture(scope="module", autouse=True)
def _nothing_provisioned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("empty-cache")
    saved = {k: os.environ.get(k) for k in ("HARNESS_CACHE", registry.ENV_VAR)}
    os.environ["HARNESS_CACHE"] = str(cache)
    os.environ.pop(registry.ENV_VAR, None)
    try:
        with provision.no_provisioning():
            yield cache
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


KEPT = Path(__file__).parent / "data" / "varstore"
# Real templates kept with the tests (provenance in data/varstore/README.md): name -> sha256
KEPT_TEMPLATES = {
    "template-2025.02-4m.fd": "5d2ac383371b408398accee7ec27c8c09ea5b74a0de0ceea6513388b15be5d1e",
    "template-2022.11-4m-ms.fd": "e6044c5d1fd81998a5967d907ec425e48da534832c7d9b0b4c7a702b62019c50",
}


@pytest.fixture(scope="session")
def kept_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The kept OVMF NVRAM templates, unpacked read-only into a session directory."""
    where = tmp_path_factory.mktemp("templates")
    out = {}
    for name, digest in KEPT_TEMPLATES.items():
        data = lzma.decompress((KEPT / f"{name}.xz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == digest, f"{KEPT / name}.xz is not the recorded template"
        path = where / name
        path.write_bytes(data)
        path.chmod(0o444)
        out[name] = path
    return out


@pytest.fixture
def kept_template(kept_templates: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    """A writable copy of a kept template in the test's directory (``VARS.fd`` unless named)."""

    def make(name: str = "template-2025.02-4m.fd", as_name: str = "VARS.fd") -> Path:
        dest = tmp_path / as_name
        dest.write_bytes(kept_templates[name].read_bytes())
        return dest

    return make


@dataclass(frozen=True)
class SshKeys:
    host: paramiko.PKey  # a server's host key
    other_host_line: str  # a pinned line for a host key no server has
    client_file: Path  # a client's private key file


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory: pytest.TempPathFactory) -> SshKeys:
    """SSH keys of our own (no guest image needed): a host key, another host's pinned line,
    a client key file."""
    host, other, client = (paramiko.RSAKey.generate(1024) for _ in range(3))
    path = tmp_path_factory.mktemp("sshkeys") / "client_key"
    client.write_private_key_file(str(path))
    return SshKeys(host, f"{other.get_name()} {other.get_base64()}", path)
