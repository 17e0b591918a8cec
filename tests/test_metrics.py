"""Prometheus metrics: the S3 counters read from store stats (in process), and a real node's
--metrics-address endpoint scraped around a flush whose content is known."""
from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_perssd import metrics
from csi_perssd.remote.s3 import Retry, S3Store
from tests.harness.cluster import Cluster, block_cap, free_port, scrape
from tests.harness.procs import DriverProcess
from tests.harness.seaweed import Seaweed
from tests.plugins.s3 import make_s3_store

MiB = 1 << 20
CHUNK = 1 * MiB
UPLOADED = 'perssd_transfer_bytes_total{kind="uploaded"}'


def moved(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


# -- the S3 counters, in process ----------------------------------------------------------------
@pytest.mark.s3
def test_s3_counters_follow_store_stats(seaweed: Seaweed) -> None:
    store = make_s3_store(seaweed)
    metrics.track_store(store)
    t0 = metrics.S3_STATS.totals()
    store.put("a/one", b"x" * 1000)
    store.put("a/two", b"y" * 24)
    assert store.get("a/one")[0] == b"x" * 1000
    assert store.head("a/missing") is None          # a 404 is an answer, not an error
    t1 = metrics.S3_STATS.totals()
    req = {op: t1["requests"].get(op, 0) - t0["requests"].get(op, 0) for op in ("put", "get", "head")}
    assert req == {"put": 2, "get": 1, "head": 1}
    assert t1["bytes_up"] - t0["bytes_up"] == 1024
    assert t1["bytes_down"] - t0["bytes_down"] == 1000
    assert sum(t1["errors"].values()) == sum(t0["errors"].values())
    # tracking the same store twice does not count it twice
    metrics.track_store(store)
    assert metrics.S3_STATS.totals()["requests"].get("put", 0) == t1["requests"]["put"]


@pytest.mark.s3
def test_s3_errors_are_counted() -> None:
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    store = S3Store(f"s3://perssd/t-{secrets.token_hex(4)}", endpoint_url=dead, access_key="AKX",
                    secret_key="not-used", retries=Retry(attempts=2, base_s=0.01, cap_s=0.02,
                                                         deadline_s=2, connect_timeout_s=0.5))
    metrics.track_store(store)
    t0 = metrics.S3_STATS.totals()
    with pytest.raises(Exception):
        store.get("chunks/ab/x")
    t1 = metrics.S3_STATS.totals()
    assert t1["requests"].get("get", 0) - t0["requests"].get("get", 0) == 2      # both attempts
    assert t1["errors"].get("get", 0) - t0["errors"].get("get", 0) == 2      # by operation


# -- a real node ------------------------------------------------------------------------------------
@pytest.fixture
def node_with_metrics(seaweed: Seaweed, tmp_path: Path) -> Iterator[tuple[Cluster, int]]:
    if not seaweed.running:
        seaweed.start()
    port = free_port()
    cl = Cluster(tmp_path / "cl", nodes=(), seaweed=seaweed, prefix=f"m-{secrets.token_hex(5)}")
    try:
        cl.start()
        cl.nodes["node-a"] = DriverProcess(
            cl.workdir, mode="node", node_id="node-a", pool=cl.pool, catalog=seaweed.url(cl.prefix),
            env=cl.env, extra=cl.store_args() + ["--metrics-address", f"127.0.0.1:{port}",
                                                  "--heartbeat-seconds", "3600"]).start()
        yield cl, port
    finally:
        cl.stop()


@pytest.mark.root
@pytest.mark.s3
def test_flush_moves_the_counters_by_the_right_amounts(node_with_metrics: tuple[Cluster, int],
                                                       seaweed: Seaweed) -> None:
    cl, port = node_with_metrics
    size = 8 * MiB
    vid = cl.create("metrics-vol", size, block_cap(), params={"chunkSize": "1Mi"})
    dev = cl.attach("node-a", vid, block_cap())
    a, b, c = os.urandom(CHUNK), os.urandom(CHUNK), os.urandom(CHUNK)
    text = b"".join(b"line %d of a compressible log\n" % i for i in range(40_000))[:CHUNK]
    # chunks 0..4 written (chunk 3 repeats chunk 0: dedup), 5..7 never written (holes)
    with open(dev, "r+b", buffering=0) as f:
        for i, data in enumerate((a, b, c, a, text)):
            f.seek(i * CHUNK)
            f.write(data)
        os.fsync(f.fileno())

    before = scrape(port)
    cl.release("node-a", vid)
    after = scrape(port)

    # uploaded bytes == the sizes of the chunk objects the flush created
    client = seaweed.client()
    objs = client.list_objects_v2(Bucket=seaweed.bucket, Prefix=f"{cl.prefix}/chunks/").get("Contents", [])
    assert len(objs) == 4                              # a, b, c, text: the repeat is stored once
    stored = sum(o["Size"] for o in objs)
    assert moved(before, after, UPLOADED) == stored
    assert stored < 3 * CHUNK + CHUNK // 2             # the text chunk was compressed

    # read: the written chunks (5 MiB) once per pass; holes and the repeat were skipped
    read = moved(before, after, 'perssd_transfer_bytes_total{kind="flushed_read"}')
    assert 5 * MiB <= read <= 10 * MiB
    assert moved(before, after, 'perssd_transfer_bytes_total{kind="skipped_hole"}') >= 3 * CHUNK
    assert moved(before, after, 'perssd_transfer_bytes_total{kind="skipped_known"}') >= CHUNK

    # RPC histogram by method and code
    assert moved(before, after, 'perssd_rpc_duration_seconds_count{code="OK",method="NodeUnstageVolume"}') == 1
    assert moved(before, after, 'perssd_rpc_duration_seconds_count{code="OK",method="NodeUnpublishVolume"}') == 1
    assert after.get('perssd_rpc_duration_seconds_count{code="OK",method="NodeStageVolume"}', 0) >= 1
    assert moved(before, after, 'perssd_transfer_duration_seconds_count{op="flush"}') >= 1

    # S3 requests by operation: every chunk object was PUT once, plus manifest and record
    puts = moved(before, after, 'perssd_s3_requests_total{op="put"}')
    assert puts >= len(objs) + 2
    assert moved(before, after, 'perssd_s3_requests_total{op="head"}') >= len(objs)
    assert sum(v for k, v in after.items() if k.startswith("perssd_s3_errors_total")) == \
        sum(v for k, v in before.items() if k.startswith("perssd_s3_errors_total"))
    assert moved(before, after, 'perssd_s3_bytes_total{direction="up"}') >= stored

    # nothing left in flight; the pool gauges are set
    assert after["perssd_flush_jobs_in_flight"] == 0
    assert after["perssd_flush_backlog_bytes"] == 0
    assert after['perssd_pool_bytes{kind="total"}'] > 0

    cl.delete(vid)


def listening_tcp_ports(pid: int) -> set[int]:
    """TCP ports a process listens on (its socket inodes matched against /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:          # 0A = LISTEN
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.root
@pytest.mark.s3
def test_metrics_endpoint_is_off_by_default_and_on_when_asked(node_with_metrics: tuple[Cluster, int]) -> None:
    cl, port = node_with_metrics
    on = cl.nodes["node-a"].proc
    assert on is not None and listening_tcp_ports(on.pid) == {port}
    assert cl.controller is not None and cl.controller.proc is not None
    assert listening_tcp_ports(cl.controller.proc.pid) == set()     # started without the flag
