# Membrane: every target bootstraps what it needs on a fresh Debian 12 machine (run as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KVER := $(shell uname -r)
# Debian packages the tests and the demo use (the bench peers are installed by `make bench`).
APT_PACKAGES := python3-bpfcc linux-headers-amd64 iproute2 curl dnsutils kcat nghttp2-client bpftool containernetworking-plugins
BENCH_APT_PACKAGES := haproxy wrk nghttp2-client dnsperf nginx-light nsd dnsdist
FUZZ_SECONDS ?= 60
PYTEST_ARGS ?=

.PHONY: setup system-deps kernel-headers test lint typecheck pytest demo fuzz bench bench-k8s clean cleanup-stale

setup: system-deps kernel-headers $(VENV)/.installed

# Installs only what is missing, so a second run takes well under a second.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# bcc compiles at load time against /lib/modules/$(uname -r)/build; this kernel ships no headers, so
# link Debian's (network programs only use UAPI structs, so the version mismatch is harmless).
kernel-headers: system-deps
	@if [ ! -e /lib/modules/$(KVER)/build ]; then \
	  hdr=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n1); \
	  common=$$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n1); \
	  mkdir -p /lib/modules/$(KVER); \
	  ln -sfn $$hdr /lib/modules/$(KVER)/build; ln -sfn $$common /lib/modules/$(KVER)/source; \
	  echo "linked kernel headers: $$hdr"; \
	fi

# The product folders install as `membrane.<folder>` (see pyproject.toml). The editable install is
# strict: every file is linked under build/, so a folder (at any depth) that gains or loses a file
# (its mtime changes) triggers a reinstall; edits to existing files need none.
PRODUCT_DIRS := parsers policies proxy bpf control cli sandbox examples
$(VENV)/.installed: pyproject.toml $(shell find $(PRODUCT_DIRS) -type d -not -name __pycache__)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  ln -sfn /usr/lib/python3/dist-packages/bcc $$site/bcc
	@rm -rf build/__editable__.*
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=strict
	@touch $@

lint: setup
	$(VENV)/bin/ruff check $(PRODUCT_DIRS) tests fuzz bench
	$(VENV)/bin/mypy

typecheck: lint

pytest: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint pytest

demo: setup
	$(VENV)/bin/membrane demo

fuzz: setup
	$(PY) fuzz/run_all.py --seconds $(FUZZ_SECONDS)

bench: setup
	@missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi
	$(PY) bench/run_all.py

# The Kubernetes source at 5,000 pods / 500 CNPs against the API server double (no root, no kernel; ~15 min).
bench-k8s: setup
	$(PY) bench/k8s_scale.py

cleanup-stale: setup
	$(VENV)/bin/membrane cleanup-stale

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
