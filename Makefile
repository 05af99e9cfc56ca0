# Two commands for a fresh machine: `make nightly` and `make test`.  Both run `make setup`,
# which is idempotent and cached (a few seconds when nothing changed).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HARNESS := $(VENV)/bin/harness
PYTEST := $(VENV)/bin/pytest
# Host tools the harness runs (apt packages); `harness doctor` says which one is missing.
HOST_PACKAGES := apt dpkg xz-utils zstd cpio binutils dosfstools mtools e2fsprogs chromium gcc libc6-dev \
  sbsigntool swtpm swtpm-tools make flex bison bc libelf-dev libssl-dev lz4
DEPS_STAMP := $(VENV)/.deps-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
JOBS ?= 2

.PHONY: setup host-packages venv provision images test nested unit integration nightly lint bench soak clean doctor \
  test-halved bench-halved nightly-halved

setup: host-packages venv provision images

host-packages:
	@missing=$$(for p in $(HOST_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing host packages: $$missing"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

venv: $(DEPS_STAMP) $(VENV)/.qemu-python

$(DEPS_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip" "setuptools<75" wheel
	$(PY) -m pip install -q -e ".[avocado,dev]"
	@rm -f $(VENV)/.deps-*; touch $@

# qemu.machine is not on PyPI: installed from QEMU's own python/ tree (docs/install.md).
$(VENV)/.qemu-python: $(DEPS_STAMP) harness/data/qemu.toml
	$(HARNESS) install-qemu-machine
	@touch $@

provision: venv
	$(HARNESS) provision

images: provision
	$(HARNESS) images build

doctor: setup
	$(HARNESS) doctor

# The nightly matrix (harness/nightly/suite, run by `harness nightly`) and the avocado wrappers
# (run by avocado itself; tests/integration/test_avocado.py drives them) are not collected here.
# `--durations` lists the slowest tests: what to move to fast start next.  `worksteal` lets
# an idle worker take queued tests from a busy one (the long nested tests end the run).
# Tests marked `exhaustive` (more variants of a capability another test checks) run in the
# nightly's "exhaustive" row instead (harness/nightly/runner.py).
TEST_CMD = $(PYTEST) -n $(JOBS) --dist worksteal --durations=25 -m "not exhaustive" tests
test: setup
	$(TEST_CMD)

# The same runs on half the machine's CPU time (a cgroup quota, `harness throttle`): how a
# machine half as fast would see them (docs/performance.md, "Measuring as a slower machine").
HALF := $(HARNESS) throttle --cpu-share 0.5 --
test-halved: setup
	$(HALF) $(TEST_CMD)
bench-halved: setup
	$(HALF) $(PY) -m bench
nightly-halved: setup
	$(HARNESS) snapshots prune
	$(HALF) $(HARNESS) nightly

# The nested L1/L2 tests alone (they are part of `make test` too).
nested: setup
	$(PYTEST) -n 1 tests/integration/test_nested.py

unit: venv
	$(PYTEST) -n $(JOBS) tests/unit

integration: setup
	$(PYTEST) -n $(JOBS) tests/integration

# Snapshots not restored for 14 days go first: every changed input makes a new one.
nightly: setup
	$(HARNESS) snapshots prune
	$(HARNESS) nightly

lint: venv
	$(VENV)/bin/ruff check harness tests bench
	$(VENV)/bin/mypy
	$(PYTEST) -q -p no:cacheprovider tests/unit/test_layers.py tests/unit/test_docs.py

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) results .pytest_cache .mypy_cache .ruff_cache

# Soak: 50 back-to-back cycles each of cpr-reboot and cpr-transfer (`harness repro ... --json`)
# and 10 runs of the integration suite; counts failures, leaked QEMU processes and leftover
# work files, and reports the longest guest pause (results/soak/soak.json).
SOAK_CYCLES ?= 50
SOAK_RUNS ?= 10
soak: setup
	$(HARNESS) soak --cycles $(SOAK_CYCLES) --suite-runs $(SOAK_RUNS) --jobs $(JOBS) --out results/soak

# Build dependencies of `harness build-qemu` (apt packages and a Meson tools venv; the list
# is harness/inventory/sources.py BUILD_DEPS).  `harness build-qemu` installs them itself when missing.
.PHONY: build-deps
build-deps: venv
	$(HARNESS) build-qemu --deps-only
