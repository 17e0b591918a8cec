"""The LVM suite runs only inside the test VM (tests/vm/run.py sets PERSSD_VM=1).

Devices there: /dev/nvme0n1 (24 GiB, sparse) carries the session's thin pool, /dev/nvme1n1 (2 GiB) is
left for the `pool init` tests. The VM has no udev rules for lvm, so lvm gets NO_UDEV_CONFIG.
"""
from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from csi_perssd.cli import pool as pool_cli
from csi_perssd.local.lvm import LvmBackend
from csi_perssd.local.lvmcli import NO_UDEV_CONFIG
from csi_perssd.remote.s3 import Retry, S3Store

from tests.lvm.util import IN_VM, POOL, POOL_DEVICE, VG


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    skip = pytest.mark.skip(reason="LVM suite runs inside the test VM only (make test-lvm)")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.vm)
            if not IN_VM:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def lvm_pool() -> Iterator[str]:
    """A thin pool on the pool device, created with `pool init` and removed at the end."""
    pool_cli.init(POOL_DEVICE, VG, POOL, chunk_size="64k", lvm_config=NO_UDEV_CONFIG)
    try:
        yield VG
    finally:
        subprocess.run(["lvm", "vgremove", "--config", NO_UDEV_CONFIG, "-ff", "-y", VG],
                       capture_output=True)
        subprocess.run(["lvm", "pvremove", "--config", NO_UDEV_CONFIG, "-ff", "-y", POOL_DEVICE],
                       capture_output=True)


@pytest.fixture(scope="session")
def backend(lvm_pool: str) -> LvmBackend:
    return LvmBackend(lvm_pool, POOL, lvm_config=NO_UDEV_CONFIG)


@pytest.fixture
def vid(backend: LvmBackend) -> Iterator[str]:
    v = f"pvol-{uuid.uuid4().hex}"
    yield v
    backend.delete(v)


@pytest.fixture
def s3_store() -> S3Store:
    """An S3Store on the SeaweedFS that tests/vm/run.py started on the host (fresh prefix)."""
    endpoint = os.environ.get("PERSSD_VM_S3_ENDPOINT")
    if not endpoint:
        pytest.fail("PERSSD_VM_S3_ENDPOINT is not set: run the suite through tests/vm/run.py")
    return S3Store(f"s3://{os.environ['PERSSD_VM_S3_BUCKET']}/lvm-{uuid.uuid4().hex[:12]}",
                   endpoint_url=endpoint, access_key=os.environ["PERSSD_VM_S3_ACCESS_KEY"],
                   secret_key=os.environ["PERSSD_VM_S3_SECRET_KEY"], retries=Retry())
