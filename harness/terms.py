"""The domain's words as types: hop operations, migration modes, a hop's status and a test
run's outcome.  Each is a ``StrEnum``: a member *is* its string (``Op.LIVE == "live"``), so
records, JSON and command lines keep their text while code and mypy see a closed set."""

from __future__ import annotations

from enum import StrEnum


class Op(StrEnum):
    """A way a guest moves (:mod:`harness.migration`)."""

    LIVE = "live"
    SAVE_RESTORE = "save-restore"
    CPR_REBOOT = "cpr-reboot"
    CPR_TRANSFER = "cpr-transfer"
    CPR_EXEC = "cpr-exec"


class Mode(StrEnum):
    """QEMU's migration mode (``migrate-set-parameters mode``)."""

    NORMAL = "normal"
    CPR_REBOOT = "cpr-reboot"
    CPR_TRANSFER = "cpr-transfer"
    CPR_EXEC = "cpr-exec"


class Status(StrEnum):
    """Where a hop ended (:class:`harness.migration.MigrationResult`)."""

    PENDING = "pending"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNSUPPORTED = "unsupported"


class Outcome(StrEnum):
    """A test item's outcome in the nightly's records (:mod:`harness.nightly.results`)."""

    PASSED = "passed"
    FAILED = "failed"
    ERROR = "error"
    XFAILED = "xfailed"
    SKIPPED = "skipped"
