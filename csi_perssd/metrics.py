"""Prometheus metrics (served with --metrics-address; off by default).

Most metrics are plain prometheus-client objects that the code updates where things happen
(server.py: RPC latency; sync.py: transfer bytes, durations, flush jobs and backlog;
runtime.py: pool usage; perssd_local_volumes* read from the node state at scrape time).
The object-store counters are different: every S3Store already counts
its requests in `store.stats` (remote/s3.py), so instead of a second set of increments in the
store's hot path, a collector reads those counters at scrape time:

    perssd_s3_requests_total{op="put"}   requests by operation (each retry attempt counts)
    perssd_s3_errors_total{op="put"}     failed attempts by operation (op="any" when the
                                          store only keeps a total)
    perssd_s3_bytes_total{direction="up"|"down"}

Stores are counted once they are registered: `track_store(store)` for one store, and
`watch_stores(factory)` (the runtime calls it) for every store the process's store factory
(remote/factory.py) has opened or will open. A store once seen stays counted (its stats object
is kept), so the counters never go backwards when a store leaves the factory's cache.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .remote.store import ObjectStore

log = logging.getLogger(__name__)

RPC_LATENCY = Histogram("perssd_rpc_duration_seconds", "CSI RPC latency", ["method", "code"],
                        buckets=(0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
BYTES = Counter("perssd_transfer_bytes_total",
                "Bytes moved by flush/hydrate, by kind: flushed_read, uploaded, hydrated, skipped_hole, skipped_known",
                ["kind"])
TRANSFER_SECONDS = Histogram("perssd_transfer_duration_seconds", "Duration of flush and hydrate", ["op"],
                             buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600))
FLUSH_JOBS = Gauge("perssd_flush_jobs_in_flight", "Flush jobs running on this node")
FLUSH_BACKLOG = Gauge("perssd_flush_backlog_bytes", "Bytes still to read by running flush jobs")
POOL_BYTES = Gauge("perssd_pool_bytes", "Local pool usage", ["kind"])   # total, available, cache


class StoreStatsCollector(Collector):
    """perssd_s3_* counters summed over the stats objects of every store seen so far."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._stats: dict[int, Any] = {}        # id(stats) -> stats (kept alive on purpose)
        self._extra_requests: dict[str, int] = {}
        self._extra_errors: dict[str, int] = {}

    def track(self, store: ObjectStore) -> None:
        with self._mu:
            self._stats.setdefault(id(store.stats), store.stats)

    def count(self, op: str, error: bool = False) -> None:
        """For stores without their own stats: count one request (and error) by hand."""
        with self._mu:
            self._extra_requests[op] = self._extra_requests.get(op, 0) + 1
            if error:
                self._extra_errors[op] = self._extra_errors.get(op, 0) + 1

    def totals(self) -> dict[str, Any]:
        """{"requests": {op: n}, "errors": {op: n}, "bytes_up": n, "bytes_down": n}."""
        with self._mu:
            stats = list(self._stats.values())
            req = dict(self._extra_requests)
            err = dict(self._extra_errors)
        up = down = 0
        for s in stats:
            snap = s.snapshot()
            for op, n in snap.get("requests", {}).items():
                req[op] = req.get(op, 0) + int(n)
            by_op = snap.get("errors_by_op")
            if isinstance(by_op, dict):
                for op, n in by_op.items():
                    err[op] = err.get(op, 0) + int(n)
            elif snap.get("errors"):
                err["any"] = err.get("any", 0) + int(snap["errors"])
            up += int(snap.get("bytes_up", 0))
            down += int(snap.get("bytes_down", 0))
        return {"requests": req, "errors": err, "bytes_up": up, "bytes_down": down}

    def collect(self) -> Iterator[CounterMetricFamily]:
        t = self.totals()
        reqs = CounterMetricFamily("perssd_s3_requests", "Object store requests (attempts) by operation",
                                   labels=["op"])
        for op, n in sorted(t["requests"].items()):
            reqs.add_metric([op], n)
        yield reqs
        errs = CounterMetricFamily("perssd_s3_errors", "Failed object store request attempts by operation",
                                   labels=["op"])
        for op, n in sorted(t["errors"].items()):
            errs.add_metric([op], n)
        yield errs
        byt = CounterMetricFamily("perssd_s3_bytes", "Object store payload bytes", labels=["direction"])
        byt.add_metric(["up"], t["bytes_up"])
        byt.add_metric(["down"], t["bytes_down"])
        yield byt

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("perssd_s3_requests", "", labels=["op"])
        yield CounterMetricFamily("perssd_s3_errors", "", labels=["op"])
        yield CounterMetricFamily("perssd_s3_bytes", "", labels=["direction"])


S3_STATS = StoreStatsCollector()
REGISTRY.register(S3_STATS)

FLUSH_STATES = ("none", "running", "uploaded", "committed", "failed", "fenced")


class LocalVolumeCollector(Collector):
    """perssd_local_volumes{flush=STATE}: this node's local volumes by the state of their last
    flush job ("none": never flushed here), and perssd_local_volumes_unflushed: volumes not
    staged anywhere whose changes exist only on this node. Read from the node state at scrape."""

    def __init__(self) -> None:
        self._source: Callable[[], Iterable[Any]] | None = None

    def watch(self, source: Callable[[], Iterable[Any]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = dict.fromkeys(FLUSH_STATES, 0)
        unflushed = 0
        try:
            volumes = list(self._source()) if self._source is not None else []
        except Exception as e:       # a scrape must not fail because one state file is odd
            log.warning("cannot count local volumes for metrics: %s", e)
            volumes = []
        for lv in volumes:
            state = str(getattr(lv.flush.state, "value", lv.flush.state)) if lv.flush is not None else "none"
            counts[state] = counts.get(state, 0) + 1
            unflushed += bool(lv.dirty and not lv.staged and lv.persistence == "object")
        g = GaugeMetricFamily("perssd_local_volumes", "Local volumes on this node by flush state",
                              labels=["flush"])
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g
        yield GaugeMetricFamily("perssd_local_volumes_unflushed",
                                "Unstaged local volumes with changes not committed to the object store",
                                value=unflushed)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("perssd_local_volumes", "", labels=["flush"])
        yield GaugeMetricFamily("perssd_local_volumes_unflushed", "")


LOCAL_VOLUMES = LocalVolumeCollector()
REGISTRY.register(LOCAL_VOLUMES)


def watch_local_volumes(source: Callable[[], Iterable[Any]]) -> None:
    """Count these LocalVolume records (the node state's `all`) in perssd_local_volumes*."""
    LOCAL_VOLUMES.watch(source)


def track_store(store: Any) -> None:
    """Count this store's requests in perssd_s3_*."""
    S3_STATS.track(store)


def watch_stores(factory: Any) -> None:
    """Count every store `factory` (a remote.factory.StoreFactory) opens, from now and before."""
    factory.observe(S3_STATS.track)


def serve(address: str) -> None:
    """Start the HTTP endpoint, address like ':9808' or '127.0.0.1:9808'."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")
    log.info("metrics on http://%s:%s/metrics", host or "0.0.0.0", port)
