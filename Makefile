# DeepFS: the two commands are `make run` (local cluster, mounted) and `make test`.
# Both install what they need on a fresh Debian 12 machine (as root): the apt
# packages below when missing, then a virtual environment with the project.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# openssl: test TLS certificates (deepfs.tls, deepfs up --tls, the TLS tests and bench target).
APT_PACKAGES := fuse3 libfuse3-dev pkg-config fio bindfs git sqlite3 tar iproute2 nftables openssl etcd-server
STAMP := $(VENV)/.installed-stamp
DATA_DIR ?= ./deepfs-data
MOUNTPOINT ?= ./mnt

.PHONY: run test lint test-unit test-process test-fuse test-cuda chaos fuzz deps venv proto bench clean

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# pyfuse3 is built from its source release with DeepFS's patch first
# (third_party/pyfuse3/README.md); the project's own install then finds it in place.
$(STAMP): pyproject.toml third_party/pyfuse3/install.py third_party/pyfuse3/deepfs.patch
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) third_party/pyfuse3/install.py
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: deps $(STAMP)

# The cluster makes its keys in $(DATA_DIR)/keys (cluster.secret, admin.key, mount.key, node<i>.key): the mount
# uses mount.key; for clients and deepfs status from another shell, export DEEPFS_KEY=$(DATA_DIR)/keys/admin.key.
run: venv
	$(VENV)/bin/deepfs run --data-dir $(DATA_DIR) --mountpoint $(MOUNTPOINT)

# Two pytest workers (pytest-xdist), each taking whole test modules (their module-scoped clusters and
# mounts stay in one process): the suite's servers mostly wait (leases, timeouts, fsyncs), so two
# workers on the 2 cores it is sized for take 10-11 minutes instead of 15-16. TEST_WORKERS=0 runs it in
# this one process.
TEST_WORKERS ?= 2
test: venv lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# ruff over the whole tree, mypy --strict over the pure core (settings in pyproject.toml).
lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy

# One layer of the suite each (markers in pyproject.toml); together they are `make test`.
# unit: in-process only, seconds. process: real servers on loopback. fuse: real mounts.
test-unit: venv
	$(PY) -m pytest -q -m unit

test-process: venv
	$(PY) -m pytest -q -m process

test-fuse: venv
	$(PY) -m pytest -q -m fuse

# The GPU paths of the torch adapter, on a machine with a CUDA device: fails, never
# skips, when torch sees none (make test reports these tests as skipped there).
test-cuda: venv
	DEEPFS_REQUIRE_CUDA=1 $(PY) -m pytest -q tests/test_torch_cuda.py

# The chaos test of make test, for minutes: nodes, the metadata server and the mount daemon fail under
# load, then every acknowledged file must read back and repair restore every stripe. A failure prints
# its seed; replay it with make chaos CHAOS_SEED=N. (make test runs a 30 s version with a fixed seed.)
CHAOS_SECONDS ?= 300
CHAOS_SEED ?= $(shell date +%s)
chaos: venv
	DEEPFS_CHAOS_SECONDS=$(CHAOS_SECONDS) DEEPFS_CHAOS_SEED=$(CHAOS_SEED) $(PY) -m pytest -q -s tests/test_chaos.py -k long

# The parser fuzzing of make test, longer (~15 min): the hypothesis properties of tests/test_fuzz_parsers.py with
# FUZZ_EXAMPLES examples each and random seeds, then each atheris target for FUZZ_SECONDS (coverage-guided;
# a crash leaves its input in ./crash-*, replay it with .venv/bin/python tests/test_fuzz_parsers.py TARGET FILE).
FUZZ_EXAMPLES ?= 10000
FUZZ_SECONDS ?= 60
fuzz: venv
	DEEPFS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz_parsers.py
	for target in $$($(PY) tests/test_fuzz_parsers.py --list); do \
	  $(PY) tests/test_fuzz_parsers.py $$target -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 || exit 1; \
	done

# The full benchmark (~20 min; installs GlusterFS from Debian's packages when missing).
# Options go in BENCH_ARGS, e.g. make bench BENCH_ARGS="--targets deepfs,local --reps 5".
BENCH_ARGS ?=
bench: venv
	$(VENV)/bin/deepfs bench $(BENCH_ARGS)

# Regenerate the committed gRPC stubs after editing deepfs/proto/control.proto.
proto: venv
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. deepfs/proto/control.proto

clean:
	rm -rf $(VENV) $(DATA_DIR) build *.egg-info
