"""A test harness that boots real QEMU guests and proves that guest state, the UEFI
varstore and boot order survive live updates (CPR) and cross-version migrations."""

__version__ = "0.1.0"
