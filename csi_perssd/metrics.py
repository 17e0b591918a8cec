"""Prometheus metrics (served with --metrics-address; off by default)."""
from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
S3_REQUESTS = Counter("perssd_s3_requests_total", "Object store requests", ["op"])
S3_ERRORS = Counter("perssd_s3_errors_total", "Object store request errors", ["op"])
POOL_BYTES = Gauge("perssd_pool_bytes", "Local pool usage", ["kind"])   # total, available, cache


def serve(address: str) -> None:
    """Start the HTTP endpoint, address like ':9808' or '127.0.0.1:9808'."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")
    log.info("metrics on http://%s:%s/metrics", host or "0.0.0.0", port)
