# csi-perssd container image: one image for the controller and the node plugin.
#   make image            (docker build -t csi-perssd:0.1.0 .)
# The controller runs as the numeric non-root USER below; the node DaemonSet overrides it
# with runAsUser: 0 and privileged: true (mount, losetup, mkfs, lvm need root).
# No HEALTHCHECK: Kubernetes ignores it; the livenessprobe sidecar calls the CSI Probe RPC.

ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

# --- builder: turn the source tree into a wheel --------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY csi_perssd ./csi_perssd
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- runtime: system tools the driver calls + the wheel ------------------------------------
FROM ${PYTHON_IMAGE}
# util-linux: losetup, fsfreeze, blkid, wipefs; mount: mount/umount; e2fsprogs/xfsprogs: mkfs,
# grow, fsck, dumpe2fs/xfs_db; lvm2 + thin-provisioning-tools: the LVM thin backend (thin_delta
# for incremental flushes); kmod: modprobe dm_thin_pool (the DaemonSet mounts /lib/modules);
# libfuse3-3: the lazy-hydration FUSE server (mfusepy loads it at start-up).
# Inside a container LVM must not wait for udev (udev_sync/udev_rules off).
# tests/container/test_image.py checks every tool the code calls is here and runs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      util-linux mount e2fsprogs xfsprogs lvm2 thin-provisioning-tools kmod libfuse3-3 \
 && rm -rf /var/lib/apt/lists/* \
 && sed -i -e 's/^\(\s*\)# udev_sync = 1/\1udev_sync = 0/' \
           -e 's/^\(\s*\)# udev_rules = 1/\1udev_rules = 0/' /etc/lvm/lvm.conf
# The runtime dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print(*tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt /tmp/pyproject.toml
COPY --from=builder /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && csi-perssd --version
ENV PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["csi-perssd"]
CMD ["serve", "--help"]
