"""`csi-perssd serve`: run the CSI gRPC server (controller, node or both)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .. import malloc_tuning
from ..config import MODES, Config
from ..errors import CsiError
from .flags import add, config_from_args, store_flags

log = logging.getLogger("csi_perssd")


def add_parser(sub: Any) -> None:
    c = Config()
    s = sub.add_parser("serve", help="run the CSI gRPC server")
    add(s, "--mode", c.mode, "which services to run", choices=MODES)
    add(s, "--endpoint", c.endpoint, "unix:///path/to/csi.sock")
    add(s, "--node-id", c.node_id, "this node's ID (node and all modes)")
    add(s, "--pool", c.pool, "the node's pool (topology key nvme.perssd.io/pool)")
    add(s, "--pool-from-node-label", c.pool_from_node_label, "read the pool from this label of the Kubernetes Node")
    add(s, "--state-dir", c.state_dir, "node state directory")
    add(s, "--backend", c.backend, "local backend", choices=("rawfile", "lvm"))
    add(s, "--rawfile-dir", c.rawfile_dir, "directory of the rawfile backend")
    add(s, "--volume-group", c.volume_group, "LVM volume group (lvm backend)")
    add(s, "--thin-pool", c.thin_pool, "LVM thin pool name (lvm backend)")
    add(s, "--lvm-config", c.lvm_config, "extra lvm --config settings (lvm backend)")
    add(s, "--max-volume-bytes", c.max_volume_bytes, "largest volume to create (0 = capacity)")
    add(s, "--reserve-bytes", c.reserve_bytes, "space of the backend kept free")
    add(s, "--max-volumes-per-node", c.max_volumes_per_node, "reported in NodeGetInfo")
    add(s, "--metrics-address", c.metrics_address, "serve Prometheus metrics here, e.g. :9808 (off when empty)")
    add(s, "--flush-workers", c.flush_workers, "parallel uploads per flush")
    add(s, "--hydrate-workers", c.hydrate_workers, "parallel downloads per hydrate")
    add(s, "--hydrate", c.hydrate, "default hydration of volumes whose StorageClass sets none: "
        "full (download, then mount) or lazy (mount at once, fetch chunks as they are read)",
        choices=("full", "lazy"))
    add(s, "--lazy-background-workers", c.lazy_background_workers,
        "lazy hydration: parallel background fetches per volume (0 = fetch on demand only)")
    add(s, "--lazy-fetch-timeout-seconds", c.lazy_fetch_timeout_seconds,
        "lazy hydration: how long a read of a missing chunk waits for the object store before EIO")
    add(s, "--heartbeat-seconds", c.heartbeat_seconds, "node heartbeat interval (local; writes only changes)")
    add(s, "--node-refresh-seconds", c.node_refresh_seconds, "rewrite an unchanged node record this often")
    add(s, "--volume-check-seconds", c.volume_check_seconds, "check that local copies' volumes still exist")
    add(s, "--wake-poll-seconds", c.wake_poll_seconds, "snapshot wake-up poll while volumes are staged")
    add(s, "--wake-idle-seconds", c.wake_idle_seconds, "snapshot wake-up poll while no volume is staged")
    add(s, "--request-sweep-seconds", c.request_sweep_seconds, "list this node's requests anyway this often")
    add(s, "--gc-interval-seconds", c.gc_interval_seconds, "controller: garbage collection interval (0 = off)")
    add(s, "--gc-grace-seconds", c.gc_grace_seconds, "chunks younger than this are never collected")
    add(s, "--gc-keep-generations", c.gc_keep_generations, "generations kept per volume")
    add(s, "--grace-seconds", c.grace_seconds, "SIGTERM: time for in-flight RPCs")
    add(s, "--unstage-wait-seconds", c.unstage_wait_seconds,
        "NodeUnstage waits this long for the flush before answering ABORTED with its progress")
    add(s, "--freeze-timeout-seconds", c.freeze_timeout_seconds, "snapshots: longest file system freeze")
    add(s, "--enable-alpha", c.enable_alpha, "enable alpha CSI capabilities")
    add(s, "--encryption-key-file", c.encryption_key_file,
        "KEK for encrypted volumes when the call's secret has no encryptionKey (file: base64 of 32 bytes)")
    add(s, "--enable-snapshot-metadata", c.enable_snapshot_metadata,
        "serve the SnapshotMetadata service (CSI alpha; for the external-snapshot-metadata sidecar)")
    add(s, "--pvc-events", c.pvc_events, "post Events on volumes' PVCs (auto: in a pod or with --kubeconfig)",
        choices=("auto", "on", "off"))
    add(s, "--kubeconfig", c.kubeconfig, "kubeconfig of the API server for events (default: the pod's service account)")
    add(s, "--events-progress-seconds", c.events_progress_seconds, "FlushProgress events at least this far apart")
    store_flags(s)
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.pool_from_node_label and cfg.mode in ("node", "all"):
        from ..kube import pool_from_node_label
        try:
            cfg.pool = pool_from_node_label(cfg.node_id, cfg.pool_from_node_label)
        except CsiError as e:
            print(f"csi-perssd: {e}", file=sys.stderr)
            return 2
        log.info("pool %s from label %s of node %s", cfg.pool, cfg.pool_from_node_label, cfg.node_id)
    malloc_tuning.tune()            # before the first chunk buffer: see malloc_tuning
    from ..runtime import Runtime
    try:
        rt = Runtime(cfg)
    except ValueError as e:
        print(f"csi-perssd: {e}", file=sys.stderr)
        return 2
    rt.serve_forever()
    return 0
