# pykvm: set-up, guests, run, tests, benchmarks.
#
#   make run     boot the main guest and print what it prints (does all set-up)
#   make test    the whole suite (does all set-up)
#   make bench   benchmarks -> bench/results/
#
# Set-up installs the Debian packages it needs when missing (needs root or
# sudo) and makes .venv/ with pykvm installed editable (.venv/bin/pykvm).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := gcc make libc6-dev liburing-dev qemu-system-x86 qemu-utils fio acpica-tools lz4 \
	e2fsprogs libnbd-dev python3-libnbd libnbd-bin nbdkit
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all setup deps libnbd-python guests linux-kernel linux-kit run test test-unit test-integration bench bench-deps bench-quick fuzz fuzz-deps stress clean distclean

all: setup guests

# Debian packages: install only what is missing.
deps: $(VENV)/.deps-stamp
$(VENV)/.deps-stamp: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

# The virtualenv, with pykvm editable; rebuilt when the native code changes.
# Byte-compiled once here: with PYTHONDONTWRITEBYTECODE set, every run would
# otherwise compile what it imports (tens of ms for each pykvm img command).
setup: deps $(VENV)/.install-stamp
	@$(PY) -m compileall -q pykvm >/dev/null
$(VENV)/.install-stamp: pyproject.toml setup.py $(wildcard native/*.c native/*.h native/*.py)
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(MAKE) -s libnbd-python
	touch $@

# libnbd's Python binding comes from Debian (python3-libnbd, built for Debian's
# Python 3.11): the virtualenv sees only its two files, through a .pth entry.
libnbd-python: deps
	@mkdir -p build/libnbd-python && \
	ln -sf /usr/lib/python3/dist-packages/nbd.py build/libnbd-python/ && \
	ln -sf /usr/lib/python3/dist-packages/libnbdmod.cpython-311-x86_64-linux-gnu.so build/libnbd-python/ && \
	echo "$(CURDIR)/build/libnbd-python" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/libnbd-debian.pth && \
	$(PY) -c 'import nbd' || { echo "libnbd's Python binding does not load in $(PY) (Debian's is built for Python 3.11)"; exit 1; }

guests: deps
	$(MAKE) -C guest

# The main job: a sparse 1 GiB disk in a temporary folder, and the workload
# guest running 5 s of random reads and writes with verification on it.
run: setup guests
	@dir=$$(mktemp -d) && truncate -s 1G $$dir/disk.img && \
	$(VENV)/bin/pykvm fio --disk file=$$dir/disk.img --rw randrw --bs 4k --iodepth 32 \
		--runtime 5 --verify crc32c; rc=$$?; rm -rf $$dir; exit $$rc

# Debian's cloud kernel, taken out of its .deb (nothing is installed), for the
# Linux boot tests; cached under build/linux/.
linux-kernel: setup
	$(PY) -m tests.helpers.linux_kernel --vmlinux

# The Linux test kit: that kernel and an initramfs (busybox, e2fsprogs, fio, the
# virtio modules, an /init that runs a script given on the command line), built
# from Debian packages into build/linux-kit/ (tests/helpers/linux_kit.py).
linux-kit: setup linux-kernel
	$(PY) -m tests.helpers.linux_kit

test: setup guests linux-kernel linux-kit fuzz-deps
	$(VENV)/bin/pytest -q tests examples

test-unit: setup guests linux-kernel
	$(VENV)/bin/pytest -q tests/unit

test-integration: setup guests linux-kernel
	$(VENV)/bin/pytest -q tests/integration

# Kill loops: STRESS_ITERATIONS SIGKILLs of the VMM per image kind and path
# (tests/stress/kill_loop.py; make test runs 5 of each). Then ASAN_MQ_SECONDS of
# 4 queues on 4 C threads, every request type mixed and verified, with the C
# code under ASan and UBSan (tests/stress/mq_asan.py).
STRESS_ITERATIONS ?= 100
ASAN_MQ_SECONDS ?= 600
stress: setup guests
	$(PY) -m tests.stress.kill_loop --iterations $(STRESS_ITERATIONS)
	$(PY) -m tests.stress.mq_asan --seconds $(ASAN_MQ_SECONDS)

bench-deps: setup
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -e '.[test,bench]' \
		--config-settings editable_mode=compat

bench: setup guests bench-deps
	$(PY) bench/run.py

bench-quick: setup guests bench-deps
	$(PY) bench/run.py --quick

# Coverage-guided fuzzing (tests/fuzz/harness.py): the fuzzer from the optional
# extra 'fuzz'; each target runs FUZZ_SECONDS, new corpus entries and crashers
# are kept under tests/fuzz/corpus/TARGET/ and tests/fuzz/crashers/TARGET/.
FUZZ_SECONDS ?= 120
FUZZ_TARGETS ?= $(notdir $(basename $(wildcard tests/fuzz/fuzz_*.py)))

fuzz-deps: setup
	$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install -q -e '.[test,fuzz]' \
		--config-settings editable_mode=compat

fuzz: setup fuzz-deps
	@rc=0; for t in $(FUZZ_TARGETS); do \
		$(PY) -m tests.fuzz.run $${t#fuzz_} --seconds $(FUZZ_SECONDS) --keep || rc=1; \
	done; exit $$rc

clean:
	$(MAKE) -C guest clean
	rm -rf build pykvm/_native*.so pykvm/_native.c pykvm/_native.o *.egg-info

distclean: clean
	rm -rf $(VENV)
