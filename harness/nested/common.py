"""Nested virtualization: names every part shares (paths inside L1, ports, variables)."""

from __future__ import annotations

L1_IMAGE = "nested-l1"
L1_MEMORY_MB = 2048  # L1's kernel and agent, L2's 512 MiB, and room for a second L2 (migrate_l2)
L2_RUN = "/run/l2"
L2_PORT = 2222
L2_HEARTBEAT_S = 0.5  # the heartbeat_s L1's agent writes into L2's config (`agent l2 start`)
L2_DATA = "/data"
L2_VARS_TEMPLATE = f"{L2_DATA}/ovmf/OVMF_VARS_4M.fd"
L2_MODULE_DIR = f"{L2_DATA}/qemu/lib/qemu"
HELPER_PATH = "/run/harness/unixcat"
L2_CYCLE_VAR = "HarnessL2Cycle"
L1_CYCLE_VAR = "HarnessL1Cycle"

# vmstate subsections that carry an L1 vCPU's nested (L2) state
KVM_NESTED_SECTIONS = ("cpu/nested_state", "cpu/kvm_nested_state")
TCG_GUEST_MODE_SECTIONS = ("cpu/svn_npt", "cpu/svm_guest")
