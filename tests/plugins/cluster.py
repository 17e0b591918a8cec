"""A module-scoped csi-perssd cluster (controller + node-a + node-b as real processes) on the
session's SeaweedFS, under a fresh bucket prefix per module, with Prometheus endpoints on the nodes.

A test module may tune it with a module attribute:

    CLUSTER = {"node_extra": ["--flush-workers", "1"], "env": {"PERSSD_UNSTAGE_WAIT_SECONDS": "1"}}

Teardown stops every driver process, then unmounts and detaches whatever is left under the
cluster's directory (the driver keeps clean cached volumes attached by design; tests may not).
"""
from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.harness.cluster import Cluster
from tests.harness.seaweed import Seaweed


@pytest.fixture(scope="module")
def cluster(seaweed: Seaweed, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Cluster]:
    opts = dict(getattr(request.module, "CLUSTER", {}))
    if not seaweed.running:           # an outage test of another module left it stopped
        seaweed.start()
    cl = Cluster(tmp_path_factory.mktemp("cluster"), seaweed=seaweed, prefix=f"c-{secrets.token_hex(5)}",
                 node_extra=opts.get("node_extra"), metrics=True, env=opts.get("env"))
    try:
        cl.start()
        yield cl
    finally:
        cl.stop()
