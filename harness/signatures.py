"""Naming failures: QEMU's migration error texts classified into signatures.

A failed migration, save, restore or live update leaves text behind: the destination's
stderr, the source's QMP error or ``query-migrate`` ``error-desc``.  :func:`classify`
turns that text into a :class:`Signature` with a stable name (``"section-footer-read"``,
``"ramblock-length-mismatch"``, ...) and an explanation a user can act on, so results,
reports and ``harness repro --until-fail`` can say *which* failure happened.

The registry :data:`SIGNATURES` is data: one entry per failure, most specific first.
QEMU usually prints a specific line and then a generic one (``check_section_footer: Read
section footer failed: -5`` followed by ``load of migration failed: Invalid argument``); the
first entry that matches anywhere in the text wins, so specific entries must come before
the generic ones at the end.  Adding a failure is adding one entry here plus a real sample
under ``tests/unit/data/signatures/`` (recorded with ``tools/record_signatures.py``, or
quoted from a cited report).

Each entry's ``source`` says where its sample text came from: a real run on this project's
machine (the recorder command and case) or a cited report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from harness.errors import ConfigError

_NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_RECORDER = ".venv/bin/python tools/record_signatures.py"


@dataclass(frozen=True)
class Signature:
    """One named kind of migration failure and the texts that identify it."""

    name: str
    patterns: tuple[re.Pattern[str], ...]
    explanation: str
    source: str

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"signature name {self.name!r} is not a lowercase slug")
        if not self.patterns:
            raise ConfigError(f"signature {self.name!r} has no patterns")

    def search(self, text: str) -> re.Match[str] | None:
        """The first match of any of this signature's patterns in ``text``, or None."""
        for pattern in self.patterns:
            match = pattern.search(text)
            if match:
                return match
        return None

    def matches(self, text: str) -> bool:
        """Whether ``text`` shows this failure."""
        return self.search(text) is not None

    def evidence(self, text: str) -> str | None:
        """The line of ``text`` (stripped) where this signature matched, for reports."""
        match = self.search(text)
        if match is None:
            return None
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.start())
        return text[start : end if end != -1 else len(text)].strip()


def signature(name: str, patterns: Iterable[str], explanation: str, source: str) -> Signature:
    """Build a :class:`Signature`, compiling its patterns (case-sensitive, as QEMU prints)."""
    try:
        compiled = tuple(re.compile(p) for p in patterns)
    except re.error as exc:
        raise ConfigError(f"signature {name!r}: bad pattern: {exc}") from exc
    return Signature(name, compiled, explanation, source)


def _real(case: str, what: str) -> str:
    return f"real run here: {_RECORDER} {case} ({what})"


_SEED_REPORT = (
    "https://lore.kernel.org/qemu-devel/e7ca7637-0bd6-d52c-c260-8d7e37cc1753@akamai.com/ "
    "(second cpr-reboot from the same QEMU, 2023-04-07); "
    "https://lore.kernel.org/qemu-devel/f855963e-b7dd-4ce8-89dc-dfaa87e896c4@akamai.com/ "
    "(back-to-back live updates on 8.2.2, 2024-05-13)"
)

#: Every known signature, most specific first.  ``classify`` returns the first match.
SIGNATURES: tuple[Signature, ...] = (
    # --- the stream's own framing ------------------------------------------------------
    signature(
        "section-footer-read",
        [r"check_section_footer: Read section footer failed: -?\d+"],
        "The destination could not read the footer that ends a device section: the stream "
        "or state file ended or broke inside a section. For back-to-back CPR on QEMU < 9.0 "
        "this is the known corrupted-save-file bug (fixed by 'migration: stop vm for cpr'); "
        "otherwise check the state file is complete and was not written by two QEMUs at once.",
        "cited: " + _SEED_REPORT + "; and " + _real(
            "section-footer", "10.0.2 did two cpr-reboot cycles from one QEMU without error, "
            "so the text was made by cutting the cycle-2 state file just before a footer"),
    ),
    signature(
        "section-footer-missing",
        [r"Missing section footer for \S+"],
        "A device section was followed by something other than its footer: source and "
        "destination disagree about that device's state layout (a QEMU or machine-type "
        "compatibility bug), or the stream is corrupt. The device is named in the message.",
        _real("section-footer", "a footer byte of a 10.0.2 cpr-reboot state file overwritten")
        + "; cited: https://access.redhat.com/solutions/7053750 (piix4_pm, qemu-kvm 6.2)",
    ),
    signature(
        "bad-magic",
        [r"Not a migration stream"],
        "The file or stream does not start with QEMU's migration magic: it is empty, not a "
        "QEMU state file, or was overwritten. Check the path and that the save completed.",
        _real("state-file", "10.0.2 loading an empty file and one with its first byte flipped"),
    ),
    signature(
        "unsupported-version",
        [r"Unsupported migration stream version"],
        "The stream's format version is not one this QEMU reads: the file is corrupt or was "
        "written by an incompatible QEMU.",
        _real("state-file", "10.0.2 loading a state file whose version word was changed"),
    ),
    signature(
        "stream-corrupt",
        [r"Unknown savevm section type \d+", r"Unable to read ID string for section \d+"],
        "The destination met bytes that are not a valid section header, or the stream ended "
        "inside one: the migration stream or state file is corrupt or truncated.",
        _real("state-file", "10.0.2 loading a state file with a section-type byte changed, "
              "and one cut inside a section name")
        + "; cited: " + _SEED_REPORT,
    ),
    signature(
        "state-incomplete",
        [r"Expected vmdescription section, but got \d+"],
        "QEMU found the end-of-stream marker earlier than the trailing VM description: device "
        "sections after that point were not loaded, yet QEMU may resume the guest. Treat the "
        "state file as truncated or corrupt even though the load 'succeeded'.",
        _real("state-file", "10.0.2 loaded a state file whose 5th section header was turned "
              "into an EOF marker, printed this warning and resumed the guest"),
    ),
    # --- configuration mismatches between source and destination --------------------------
    signature(
        "machine-type-not-found",
        [r"unsupported machine type"],
        "This QEMU build does not know the requested machine type (it is newer than the "
        "build, or was removed). Start the destination with a machine type both builds list "
        "in '-machine help', normally the source's versioned type.",
        _real("machine-type-not-found", "5.2 and 7.2 with -machine pc-q35-10.0, 10.0.2 with "
              "pc-q35-11.0"),
    ),
    signature(
        "machine-type-mismatch",
        [r"Machine type received is '[^']*' and local is '[^']*'"],
        "Source and destination run different machine types; migration needs the same "
        "versioned machine type on both sides (e.g. pc-q35-7.2 on both).",
        _real("machine-type-mismatch", "10.0.2 pc-q35-7.2 -> 10.0.2 pc-q35-10.0"),
    ),
    signature(
        "uuid-mismatch",
        [r"UUID received is \S+ and local is \S+"],
        "With the validate-uuid capability on, the destination's -uuid must equal the "
        "source's; start the destination with the source's UUID (or turn validate-uuid off).",
        _real("uuid-mismatch", "10.0.2 -> 10.0.2, validate-uuid, different -uuid"),
    ),
    signature(
        "ramblock-length-mismatch",
        [r"(?:Length|Size) mismatch: \S+: 0x[0-9a-fA-F]+ (?:in )?!= 0x[0-9a-fA-F]+"],
        "A RAM region (often firmware: pc.bios or system.flash0) has a different size on the "
        "destination. Use the same firmware build and size on both sides (e.g. OVMF_CODE_4M "
        "with OVMF_VARS_4M everywhere, not the 2 MB OVMF_CODE.fd on one side).",
        _real("ramblock-length-mismatch", "5.2, 7.2 and 10.0.2: OVMF 4M pflash -> 2 MB pflash")
        + "; cited: https://lore.kernel.org/qemu-devel/87sgjhxbtc.fsf@zen.linaroharston/ "
        "('Length mismatch: pc.bios', 2020)",
    ),
    signature(
        "unknown-ramblock",
        [r'Unknown ramblock "[^"]*", cannot accept migration'],
        "The source sent a RAM region the destination does not have (a device ROM or a "
        "memory backend present only on the source). Give both sides the same devices, ROM "
        "files (romfile=) and memory backends.",
        _real("unknown-ramblock", "10.0.2: e1000 with its ROM -> e1000,romfile="),
    ),
    signature(
        "unknown-section",
        [r"Unknown savevm section or instance '[^']*' \d+"],
        "The source sent state for a device the destination does not have (named in the "
        "message): a device added or hot-plugged on the source only, or a different device "
        "at that address. Start the destination with the same devices. A garbled name means "
        "a corrupt stream instead.",
        _real("unknown-section", "10.0.2: source with -device virtio-rng-pci, destination "
              "without"),
    ),
    signature(
        "device-config-mismatch",
        [r"Bad config data: i=0x[0-9a-fA-F]+"],
        "A device exists on both sides but is configured differently (its PCI config space "
        "differs, e.g. another number of MSI-X vectors or a ROM BAR). Use identical -device "
        "options on both sides.",
        _real("device-config-mismatch", "10.0.2: virtio-net-pci vectors=3 -> vectors=4"),
    ),
    signature(
        "cpu-feature-mismatch",
        [r"(?:TCG|host) doesn't support requested feature"],
        "The destination cannot provide CPU features the requested CPU model needs (another "
        "accelerator or an older host CPU). Use a CPU model both hosts support on both sides.",
        _real("cpu-feature-mismatch", "10.0.2 TCG with -cpu Skylake-Client-v4,enforce"),
    ),
    # --- refusals on the source and transport problems ------------------------------------
    signature(
        "migration-blocked",
        [r"Migration is disabled when using feature", r"is not compatible with CPR"],
        "A device or memory configuration blocks this migration mode (named in the message). "
        "Remove that device, or for CPR modes back guest RAM with a shared memory backend "
        "(share=on) and set -machine aux-ram-share=on where the mode requires it.",
        _real("migration-blocked", "10.0.2 with ivshmem-plain; 10.0.2 cpr-transfer with "
              "non-shared RAM"),
    ),
    signature(
        "no-space",
        [r"No space left on device"],
        "The state file's filesystem is full; free space or save elsewhere. The partial file "
        "must not replace a previous good state file.",
        _real("no-space", "10.0.2 migrate file: onto a 256 KiB tmpfs"),
    ),
    signature(
        "destination-unreachable",
        [r"Failed to connect to '[^']*'"],
        "Nothing listens at the migration address: start the destination with -incoming "
        "(or migrate-incoming) on that exact address before migrating, and check the path "
        "or port.",
        _real("destination-unreachable", "10.0.2 migrate to a missing unix socket and to "
              "tcp:127.0.0.1:9"),
    ),
    signature(
        "state-file-missing",
        [r"Could not open '[^']*': No such file or directory"],
        "The state file to load does not exist: check the path and that the save completed "
        "(and was renamed into place).",
        _real("state-file-missing", "10.0.2 migrate-incoming file: of a missing file"),
    ),
    signature(
        "state-file-truncated",
        [r"error while loading state section id \d+\([^)]*\)[\s\S]*?"
         r"load of migration failed: Input/output error",
         r"Failed to load configuration:\w+[\s\S]*?load of migration failed: Input/output error",
         r"Failed to read instance/version ID: -5",
         r"Configuration section missing"],
        "The stream ended while a section was being read: the state file is truncated, or "
        "the source closed the connection mid-migration. Re-save and compare file sizes.",
        _real("state-file", "10.0.2 loading state files cut to half their size, to 8, 20 and "
              "40 bytes"),
    ),
    signature(
        "nested-guest-mode-without-nested-state",
        [r"vCPU set in guest-mode inconsistent with migrated kernel nested state"],
        "The source vCPU was running a nested (L2) guest when its state was saved, but the "
        "stream has no cpu/nested_state to put it back in guest mode: the source's L0 is "
        "TCG (or a KVM without nested-state support), and a destination built with KVM "
        "support refuses the 'cpu' section. Timing-dependent with a TCG L0: retry, or "
        "pause L2 first; on KVM hosts check the kernel's nested state support.",
        "real run here: harness repro nested --mode live (a TCG L1 running an L2, "
        "QEMU 7.2 -> 10.0.2; recorded in tests/unit/test_nested.py)",
    ),
    signature(
        "guest-kernel-panic",
        [r"the guest's kernel crashed: \S+: (?:Kernel panic|BUG: |general protection fault|Oops: |kernel BUG)"],
        "The guest's kernel crashed after a hop (its console has the oops; with panic=-1 it "
        "rebooted, so the checks also see a new boot id). State the destination gave the "
        "guest is not what the source ran it with: memory or a device's state (a timer, an "
        "interrupt controller) changed across the hop. The console named in the message is "
        "the QEMU process the guest crashed in; the hop into that process is the suspect.",
        "real run here: make test 2026-11-30, test_cross_version.py::test_pair[7.2-to-10.0.2]: "
        "2 s after a live migration 7.2 -> 10.0.2 (pc-q35-7.2, OVMF 2022.11) the guest "
        "oopsed in __run_timers (NULL pointer dereference, a LIST_POISON2 next pointer: a "
        "timer list corrupted) and rebooted; seen once in over 300 such hops. And the nightly "
        "of 2026-11-30 (night of 2026-12-01, half CPU share): live 7.2 -> 7.2 of a cold-booted "
        "guest, an hrtimer callback pointing into a kernel stack (NX fault in the timer "
        "interrupt). Cause found 2026-11-30: a source QEMU older than 9.0 under TCG loses "
        "dirty pages (see guest-ram-differs)",
    ),
    signature(
        "guest-ram-differs",
        [r"guest RAM differs across the hop: \d+ of \d+ pages"],
        "With verify_ram the destination started paused and, once the source had stopped, "
        "both guests' RAM was compared page by page: some pages the guest wrote during "
        "precopy never reached the destination (the source's dirty tracking missed the "
        "writes). Under TCG, QEMU before 9.0 clears the migration dirty bits without "
        "resetting the vCPUs' TLB entries, so later writes through those entries go "
        "unrecorded (upstream fix 03bfc2188f06, 'physmem: Fix migration dirty bitmap "
        "coherency with TCG memory access', QEMU 9.0; not in 7.2.x stable). Left running, "
        "such a guest crashes later (guest-kernel-panic); the harness keeps it on the source.",
        "real run here: 2026-11-30, a guest restored from a saved 7.2 boot, live 7.2 -> 7.2 "
        "under a 0.3 CPU share (harness throttle): 11 of 262144 pages differed at "
        "0x3e01f000-0x3e039000 and 0x3e76a000, the per-CPU area where the guest's kernel, "
        "left to run, crashed in its timer code",
    ),
    signature(
        "guest-tpm-driver-failed",
        [r"the guest's TPM driver failed at boot \(\S+: tpm"],
        "The guest's kernel gave up on its TPM while booting (for example 'tpm tpm0: "
        "Operation Timed out': the vTPM, swtpm behind QEMU, answered a command later than "
        "the driver waits), so the guest has no /dev/tpm and every PCR and NV check after "
        "that boot fails. The TPM's state is not the suspect: the host did not run swtpm "
        "and QEMU in time (seen under half the CPU share, whose quota stops every process "
        "of the run for tens of milliseconds at a time).",
        "real run here: harness throttle --cpu-share 0.5 -- harness nightly --night "
        "2026-12-01, 2026-11-30 (entry secure-boot-qemu11.1.3-ovmf2022.11): after five hops "
        "the guest was restarted in a new QEMU 11.1.3 and its kernel printed 'tpm tpm0: "
        "Operation Timed out' 4.2 s into the boot",
    ),
    # --- the firmware's own text ---------------------------------------------------------
    signature(
        "secure-boot-image-refused",
        [r"BdsDxe: failed to load Boot[0-9A-F]{4} .*: (?:Access Denied|Security Violation)"],
        "The firmware's Secure Boot check refused the boot image (its signature is not in "
        "db, or it is in dbx): expected for an unsigned image, a finding for one signed with "
        "an enrolled key.",
        "real run here: harness boot --secure-boot --unsigned (OVMF 2022.11 secboot, "
        "snakeoil keys)",
    ),
    # --- not QEMU's text: findings of the harness's own checks --------------------------
    signature(
        "smbase-lock-lost",
        [r"the SMRAM regions of QEMU's memory tree differ: source only \[[^\]]*smbase-(?:blackhole|window)"],
        "The firmware locked SMRAM at the default SMBASE (QEMU's smbase-blackhole and "
        "smbase-window regions enabled), and after the hop the destination has them disabled: "
        "the area at 0x30000-0x4ffff is ordinary RAM again for the non-SMM guest, which can "
        "then plant code that the next SMI on a hot-plugged CPU runs in SMM. The destination "
        "does not re-derive the lock from the migrated MCH configuration (QEMU before 10.0.8; "
        "its stable release notes list 'q35: Fix migration of SMRAM state').",
        "real run here: harness repro secure-boot --qemu 10.0.2 --set ops=live (OVMF 2022.11 "
        "secboot, q35 smm=on)",
    ),
    signature(
        "announce-timer-freed",
        [r"died \(signal 11\) resetting the guest after a load with announce-rounds 0\b"],
        "QEMU crashed (SIGSEGV) on the guest's first reset after an incoming migration with "
        "the migration parameter announce-rounds 0. With no rounds, virtio-net's post-load "
        "frees its announce timer (qemu_announce_timer_del) instead of arming it, and "
        "virtio_net_reset then calls timer_del() on the freed, NULL timer. Any later guest "
        "reboot or system_reset kills the guest. Use announce-rounds 1 or more (the harness's "
        "restores use 1). No upstream fix known as of 2026-12-01.",
        "real run here: harness repro announce-reset --qemu 10.0.2 (and 7.2, 10.0.13, "
        "11.1.3), 2026-12-01; first seen as test_bootorder.py's BootNext reboot of a restored "
        "guest killing QEMU 10.0.2",
    ),
    signature(
        "varstore-file-lost-writes",
        [r"the varstore file \S+: HarnessStorm\d+ (?:is missing|holds other data|exists, but "
         r"its last completed write deleted it)",
         r"the varstore file \S+ is unreadable: varstore \S+: no edk2 variable store",
         r"\S+\.fd: the variable at offset 0x[0-9a-f]+ is in deleted transition \(an update did not finish\)",
         r"\S+\.fd: the variable at offset 0x[0-9a-f]+ \(4294967295-byte name, 4294967295-byte data\) runs past "
         r"the store's end"],
        "After the hop the destination's varstore file lacks variable writes the guest saw "
        "complete (its own view, served from the firmware's cache, still has them): the "
        "flash contents QEMU wrote to the destination's file are older than the guest's last "
        "writes. Variables written while the flash was being migrated are lost at the next "
        "cold start. When the lost write was an update's last (the old copy's DELETED state "
        "byte), the file holds a variable still in deleted transition; when it was a new "
        "variable's header, the file has erased flash (all bytes 0xff: a 4294967295-byte name) "
        "where the header should be. When the lost writes were a reclaim's rewrite of the store's first page "
        "(erased, then rewritten by the source), the file has no variable store at all: its "
        "first bytes are erased flash.",
        "real run here: harness repro storm --qemu 10.0.2 --set arch=aarch64 --set ops=live "
        "(AAVMF 2022.11, a live migration while the agent's storm wrote variables)",
    ),
    signature(
        "bootorder-apps-moved",
        [r"the firmware moved its application entries \(load-option category APP\) after "
         r"the boot devices in BootOrder"],
        "The newer firmware rewrote BootOrder on its first boot of an older firmware's "
        "varstore: its application entries (UiApp/'EFI Firmware Setup', the EFI Shell) now "
        "come after the boot devices and it added a BootManagerMenuApp entry. The devices "
        "and the guest's own entries kept their relative order, so what boots is unchanged; "
        "tools that compare BootOrder byte for byte (or expect Boot0000 first) see a change.",
        "real run here: harness nightly, firmware-upgrade-ovmf2025.02-to-ovmf2026.08 "
        "(QEMU 11.1.3, OVMF 2025.02 varstore cold-booted by OVMF 2026.08)",
    ),
    # --- not migration: a guest that never comes up ------------------------------------
    signature(
        "firmware-silent",
        [r"no output at all on the serial console .* the firmware hung before its console came up"],
        "The guest's firmware printed nothing on the serial console within the harness's "
        "silence limit (HARNESS_FIRMWARE_SILENCE, default 90 s): it hung before its console "
        "came up. Usually a firmware build the QEMU build cannot run (the firmware needs a "
        "newer machine or device model); try the firmware on a newer QEMU, or an older "
        "firmware on this QEMU.",
        "real run here: harness boot --qemu 5.2 --ovmf 2025.02 (OVMF 2025.02 on QEMU 5.2, q35, TCG)",
    ),
    signature(
        "vmstate-load-assertion",
        [r"vmstate_load_state: Assertion `[^']*' failed"],
        "The destination QEMU aborted on an assertion while loading the stream instead of "
        "refusing it: it cannot load what the source sent (usually a newer build's device "
        "state), and it crashes where it should report an error. The source keeps the guest "
        "after a live attempt; after a save the old process must be kept to go back.",
        "real run here: aarch64 live migration QEMU 11.1.3 -> 10.0.13 on virt-10.0, "
        "cortex-a57 (tests/integration/test_aarch64.py)",
    ),
    signature(
        "virtio-vring-exceeds-max",
        [r"VQ \d+ vring\.num \d+ exceeds allocated max \d+"],
        "A virtqueue arrived bigger than the destination allocated for that device: the "
        "source ran it with a larger ring (vring.num) than the destination's device model "
        "has for the machine type, so the guest-visible device ABI differs between the two "
        "builds. Newer QEMUs check this on load and refuse the device's state.",
        "real run here: harness repro cross-version --qemu 10.0.13 --qemu 11.1.2 --set parts=pairs "
        "(a guest booted on 10.0.13, live to 11.1.2 on pc-q35-10.0)",
    ),
    signature(
        "device-load-failed",
        [r"error while loading state for instance 0x[0-9a-fA-F]+ of device '[^']*'"],
        "One device's saved state was rejected by the destination (device named in the "
        "message): a configuration or version mismatch for that device, or a corrupt stream.",
        "cited: " + _SEED_REPORT,
    ),
    signature(
        "destination-aborted",
        [r"Unable to write to socket: (?:Broken pipe|Connection reset by peer)"],
        "The destination closed the migration connection: it failed to load the stream. "
        "The cause is in the destination's stderr, not on the source.",
        _real("ramblock-length-mismatch", "source side of every live case whose destination "
              "failed"),
    ),
    # --- generic catch-alls: keep last ---------------------------------------------------
    signature(
        "load-invalid-argument",
        [r"load of migration failed: Invalid argument"],
        "The destination rejected the incoming stream (EINVAL) without a more specific "
        "message this harness knows; read the lines before it in the destination's stderr.",
        _real("state-file", "10.0.2 loading a state file whose section type became 0x08"),
    ),
    signature(
        "load-failed",
        [r"load of migration failed: \S.*"],
        "The destination failed to load the incoming stream; the error after 'load of "
        "migration failed:' and the lines before it say why.",
        _real("unsupported-version", "10.0.2 'Operation not supported' after a bad version"),
    ),
)


def _index(signatures: Iterable[Signature]) -> dict[str, Signature]:
    table: dict[str, Signature] = {}
    for sig in signatures:
        if sig.name in table:
            raise ConfigError(f"signature {sig.name!r} is registered twice")
        table[sig.name] = sig
    return table


_BY_NAME = _index(SIGNATURES)


def classify(text: str, signatures: Iterable[Signature] = SIGNATURES) -> Signature | None:
    """The most specific signature that ``text`` shows, or None for unknown text."""
    for sig in signatures:
        if sig.matches(text):
            return sig
    return None


def classify_all(text: str, signatures: Iterable[Signature] = SIGNATURES) -> list[Signature]:
    """Every signature ``text`` shows, most specific first."""
    return [sig for sig in signatures if sig.matches(text)]


def by_name(name: str) -> Signature:
    """The registered signature called ``name``; ConfigError naming the known ones if none."""
    try:
        return _BY_NAME[name]
    except KeyError as exc:
        known = ", ".join(_BY_NAME)
        raise ConfigError(f"unknown failure signature {name!r}; known: {known}") from exc


def names() -> list[str]:
    """Every registered signature name, in classification order."""
    return list(_BY_NAME)
