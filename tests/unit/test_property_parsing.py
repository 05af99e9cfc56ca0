"""Property-based tests (hypothesis) on everything that parses input: catalogue files and
entries, firmware descriptors, varstores, specs, guest agent answers and console logs.
Whatever the input, only our own errors (harness.errors) come out, never a KeyError,
TypeError, RecursionError or a virt-firmware ``sys.exit``."""

from __future__ import annotations

import contextlib
import json
import lzma
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from harness import varstore
from harness.errors import CatalogError, GuestCommandError, HarnessError, SpecError, VarstoreError
from harness.guest.console import Console, clean
from harness.guest.ssh import CommandResult
from harness.inventory import catalog, firmware
from harness.spec import VmSpec, from_dict

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40),
                    st.floats(allow_nan=False), st.text(max_size=20))  # fmt: skip
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=20,
)  # fmt: skip
QEMU_KEYS = ["version", "arch", "suite", "packages", "libs", "binary", "datadirs", "notes"]
entry_like = st.dictionaries(st.sampled_from(QEMU_KEYS), json_like, max_size=8)


# --- catalogue -----------------------------------------------------------------------------


@SETTINGS
@given(data=st.dictionaries(st.sampled_from(["qemu", "python", "firmware", "x"]),
                            st.one_of(json_like, st.lists(entry_like, max_size=3)), max_size=4))
def test_catalogue_tables_only_raise_catalog_error(data: dict[str, Any]) -> None:
    for parse in (catalog.parse_qemu, catalog.parse_firmware):
        try:
            parse(Path("/cat/fuzz.toml"), data)
        except CatalogError as exc:
            assert "/cat/fuzz.toml" in str(exc)


@SETTINGS
@given(entries=st.lists(entry_like, min_size=1, max_size=3))
def test_near_valid_qemu_entries_only_raise_catalog_error(entries: list[dict[str, Any]]) -> None:
    base = {"version": "10.0.2", "arch": "x86_64", "suite": "s", "packages": ["p"],
            "libs": [], "binary": "b", "datadirs": []}  # fmt: skip
    tables = [{**base, **e} for e in entries]
    with contextlib.suppress(CatalogError):
        catalog.parse_qemu(Path("q.toml"), {"qemu": tables, "python": {"source": "q", "suite": "s"}})


@SETTINGS
@given(text=st.binary(max_size=300))
def test_catalogue_files_only_raise_catalog_error(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        q, f = Path(d) / "qemu.toml", Path(d) / "firmware.toml"
        q.write_bytes(text)
        f.write_bytes(text)
        try:
            catalog.load(q, f)
        except CatalogError as exc:
            assert str(q) in str(exc) or str(f) in str(exc)


@SETTINGS
@given(data=json_like)
def test_firmware_descriptors_only_raise_our_errors(data: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "50-fuzz.json"
        path.write_text(json.dumps(data))
        for arg in (None, data):
            with contextlib.suppress(HarnessError):
                firmware.parse_descriptor(path, Path(d), arg)


@SETTINGS
@given(data=st.dictionaries(
    st.sampled_from(["interface-types", "mapping", "targets", "features", "description"]),
    json_like, max_size=5))
def test_descriptor_shaped_objects_only_raise_our_errors(data: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d, contextlib.suppress(HarnessError):
        firmware.parse_descriptor(Path(d) / "x.json", Path(d), data)


# --- varstore ------------------------------------------------------------------------------

# a really booted OVMF 2025.02 varstore kept with the tests: no provisioned build needed
TEMPLATE_BYTES = lzma.decompress((Path(__file__).parent / "data" / "varstore" / "booted-2025.02-4m.fd.xz").read_bytes())


@SETTINGS
@given(writes=st.lists(st.tuples(st.integers(0, 8191), st.binary(min_size=1, max_size=16)),
                       min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(1, len(TEMPLATE_BYTES) - 1)))
def test_varstore_with_damaged_headers_only_raises_varstore_error(
        writes: list[tuple[int, bytes]], cut: int | None) -> None:
    # the firmware-volume header and the first variable headers live in the first 8 KiB
    data = bytearray(TEMPLATE_BYTES)
    for off, blob in writes:
        data[off:off + len(blob)] = blob
    if cut is not None:
        data = data[:cut]
    assume(bytes(data) != TEMPLATE_BYTES)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz_VARS.fd"
        path.write_bytes(bytes(data))
        try:
            model = varstore.read_varstore(path)
        except VarstoreError as exc:
            assert str(path) in str(exc)
        else:
            assert model is not None


@SETTINGS
@given(data=st.binary(max_size=64))
def test_boot_order_decoding_only_raises_varstore_error(data: bytes) -> None:
    try:
        order = varstore.decode_boot_order(data)
    except VarstoreError:
        assert len(data) % 2 == 1
    else:
        assert len(order) == len(data) // 2


# --- specs ---------------------------------------------------------------------------------

SPEC_FIELDS = ["qemu", "machine", "cpu", "smp", "memory_mb", "memory_backend", "firmware",
               "firmware_mode", "flash", "boot", "image", "ssh", "accel", "guest_mem_mb", "seed",
               "disk_bootindex", "boot_order", "uuid", "aux_ram_share", "nested", "name",
               "extra_args", "guest_config"]  # fmt: skip


@SETTINGS
@given(fields=st.dictionaries(st.sampled_from(SPEC_FIELDS + ["bogus"]), json_like, max_size=4))
def test_malformed_specs_only_raise_spec_error(fields: dict[str, Any]) -> None:
    try:
        spec = from_dict(fields)
    except SpecError:
        return
    assert isinstance(spec, VmSpec)


# --- guest output ----------------------------------------------------------------------------

guest_text = st.one_of(
    st.text(max_size=400),
    st.builds(lambda a, b: a + b, st.sampled_from(["{", "[", '{"a":', "[[[[", "\x1b[31m{"]),
              st.text(max_size=200)),
)


@SETTINGS
@given(stdout=guest_text)
def test_agent_answers_parse_or_raise_guest_command_error(stdout: str) -> None:
    res = CommandResult("agent status", 0, stdout, "", 0.0)
    try:
        value = res.json()
    except GuestCommandError as exc:
        assert exc.command == "agent status"
    else:
        assert isinstance(value, dict | list)


@SETTINGS
@given(raw=st.binary(max_size=2000))
def test_console_cleaning_leaves_no_escape_or_control_bytes(raw: bytes) -> None:
    text = clean(raw.decode("utf-8", "replace"))
    assert "\x1b" not in text and "\r" not in text
    assert all(c in "\n\t" or ord(c) >= 0x20 for c in text if ord(c) < 0x80 and c != "\x7f")


@SETTINGS
@given(raw=st.binary(max_size=4000), tail=st.sampled_from([b"", b"\x1b[0m", b"\r\n", b"\xff\xfe"]))
def test_console_wait_finds_a_marker_after_any_garbage(raw: bytes, tail: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "serial.log"
        log.write_bytes(raw + tail + b"\nHARNESS-MARK 42\n")
        m = Console(log).wait_for(r"HARNESS-MARK (\d+)", timeout=2, since=0)
        assert m.group(1) == "42"
