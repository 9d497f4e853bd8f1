# Two entry points on a fresh Debian 12 machine (as root): `make demo` and
# `make test`. Each installs what it needs (apt packages, .venv, the build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Build and run-time needs, then what the Soft-RoCE VM lane needs.
APT_BUILD := build-essential python3-dev python3-venv pkg-config rdma-core ibverbs-providers \
             libibverbs-dev librdmacm-dev
# The etcd server the discovery tests start (tests/etcd_server.py).
APT_TEST := etcd-server
APT_VM := qemu-system-x86 linux-image-amd64 ibverbs-utils rdmacm-utils perftest iproute2 \
          busybox-static util-linux
PIP_BUILD := "setuptools>=77" wheel "Cython>=3.0" "numpy>=1.24"
# What running the package needs (pyproject's dependencies, pinned to the tested versions).
PIP_RUN := tqdm==4.70.1
# The disaggregated demo's servers, proxy and client (kvcache.demo); its model needs torch.
PIP_DEMO := aiohttp==3.14.5
# torch on its own line: PyPI's x86_64 wheel is the multi-GB CUDA build; e.g.
# TORCH_PIP_OPTS="--index-url https://download.pytorch.org/whl/cpu" takes the CPU one.
PIP_TORCH := torch==2.13.0
TORCH_PIP_OPTS ?=
PIP_TEST := "pytest>=7" "hypothesis>=6" virtme-ng etcd3gw==2.7.0 \
            transformers==4.57.6
# Pinned: a new ruff release must not fail CI by itself. Rules: [tool.ruff] in pyproject.toml.
RUFF_VERSION := 0.17.5
PIP_LINT := ruff==$(RUFF_VERSION)
# `kvcache bench --peers` (never needed by `make test`): Mooncake comes from the `peers` extra in
# pyproject.toml; nixl-cu12 goes in without dependencies (it declares torch, which PyPI resolves
# to a multi-GB CUDA build; its Python side imports only numpy).
PIP_PEERS_NODEPS := nixl-cu12==1.5.1
# Extra options for `make bench-peers`, e.g. "--plot docs/transfer_bench.png --readme".
BENCH_PEERS_ARGS ?=
PIP_PLOT := matplotlib==3.10.8

.PHONY: setup setup-run setup-vm build demo demo-rdma test test-host test-rdma bench-verbs \
        bench readme-bench clean lint wheel-check

# Two set-ups: setup-run (build and run the package: what `make demo` needs) and setup
# (setup-run plus what the tests need: `make test`).
setup-run: $(VENV)/.installed-run

$(VENV)/.installed-run: setup.py pyproject.toml $(wildcard pyverbs_kv/*.pyx pyverbs_kv/*.pxd)
	scripts/apt-ensure $(APT_BUILD)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_BUILD) $(PIP_RUN) $(PIP_DEMO)
	$(PY) -m pip install -q $(TORCH_PIP_OPTS) $(PIP_TORCH)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed: $(VENV)/.installed-run
	scripts/apt-ensure $(APT_TEST)
	$(PY) -m pip install -q $(PIP_TEST)
	touch $@

setup-vm: setup
	scripts/apt-ensure $(APT_VM)

build: setup-run
	$(PY) setup.py -q build_ext --inplace

# The main job on the embedded default (no RDMA needed): a model served by a
# prefill and a decode server behind an OpenAI-style proxy, the KV cache pushed
# layer by layer over shared memory, every token checked against one process.
demo: build
	$(PY) -m kvcache demo

demo-rdma: setup-vm build
	scripts/rdma-vm --timeout 600 -- python examples/verbs_demo.py

# Lint first (seconds), then the wheel as users install it, then the suites.
test: lint setup-vm build wheel-check test-host test-rdma

# ruff only needs the venv, not the build: it fails fast on a fresh machine.
lint: $(VENV)/.ruff-$(RUFF_VERSION)
	$(VENV)/bin/ruff check .

$(VENV)/.ruff-$(RUFF_VERSION):
	scripts/apt-ensure python3-venv
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_LINT)
	touch $@

# `pip wheel .` from a clean copy of the tree (build isolation, as a user installs), then the
# wheel in a fresh venv, used from outside the source tree: every module imports,
# examples/pull_blocks.py runs (scripts/wheel_check.py says what it checks).
wheel-check: setup
	$(PY) scripts/wheel_check.py --python $(PYTHON)

# KVCACHE_REQUIRE_ETCD=1: the etcd tests fail, never skip, when etcd is missing.
test-host: setup build
	KVCACHE_REQUIRE_ETCD=1 $(PY) -m pytest -q tests

# The VM lane: every test marked rdma, inside Soft-RoCE. Fails (never skips)
# when the VM does not boot or rxe0 does not appear.
test-rdma: setup-vm build
	scripts/rdma-vm --timeout 2400 -- python -m pytest -p no:cacheprovider -m rdma -v \
	    --junitxml=.ci-out/rdma-junit.xml tests

# Prints the table; touches no tracked file.
bench: build
	$(PY) -m kvcache bench --transports tcp,shm --threads 1,2

# Regenerates README.md's benchmark table and docs/transfer_bench.png (only when asked).
readme-bench: build
	$(PY) -m pip install -q $(PIP_PLOT)
	$(PY) -m kvcache bench --transports tcp,shm --threads 1,2 --plot docs/transfer_bench.png \
	    --readme

$(VENV)/.peers-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q --no-build-isolation -e ".[peers,bench]"
	$(PY) -m pip install -q --no-deps $(PIP_PEERS_NODEPS)
	touch $@

# Our tcp and shm rows next to Mooncake's and NIXL's, in one run.
.PHONY: bench-peers
bench-peers: build $(VENV)/.peers-installed
	$(PY) -m kvcache bench --transports tcp,shm --threads 1,2 --peers $(BENCH_PEERS_ARGS)

bench-verbs: setup-vm build
	scripts/rdma-vm --timeout 2400 -- python bench/verbs_bench.py

clean:
	rm -rf build .ci-out pyverbs_kv/*.c pyverbs_kv/*.so
