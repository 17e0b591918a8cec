"""Command line: `csi-perssd serve|takeover|gc|ls|inspect|pool`. Every flag can also be set
with an environment variable PERSSD_<FLAG> (e.g. PERSSD_NODE_ID, PERSSD_CATALOG)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from . import __version__
from .config import MODES, Config

log = logging.getLogger("csi_perssd")


def _env(name: str, default: Any) -> Any:
    v = os.environ.get("PERSSD_" + name.upper().replace("-", "_"))
    if v is None:
        return default
    if isinstance(default, bool):
        return v.lower() in ("1", "true", "yes", "on")
    return type(default)(v) if default is not None else v


def _add(p: argparse.ArgumentParser, flag: str, default: Any, help: str, **kw: Any) -> None:
    name = flag.lstrip("-")
    d = _env(name, default)
    if isinstance(default, bool):
        p.add_argument(flag, action="store_true", default=d, help=help + " [PERSSD_%s]" % name.upper().replace("-", "_"))
    else:
        p.add_argument(flag, default=d, type=type(default) if default is not None else str,
                       help=f"{help} (default {default!r}) [PERSSD_{name.upper().replace('-', '_')}]", **kw)


def _store_flags(p: argparse.ArgumentParser) -> None:
    c = Config()
    _add(p, "--catalog", c.catalog, "object store URL: file:///DIR or s3://BUCKET/PREFIX")
    _add(p, "--s3-endpoint", c.s3_endpoint, "S3 endpoint URL (credentials from AWS_* env or CSI secrets)")
    _add(p, "--s3-region", c.s3_region, "S3 region")
    _add(p, "--s3-ca-bundle", c.s3_ca_bundle, "CA bundle file for the S3 endpoint")
    _add(p, "--log-level", c.log_level, "debug, info, warning or error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csi-perssd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"csi-perssd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = Config()

    s = sub.add_parser("serve", help="run the CSI gRPC server")
    _add(s, "--mode", c.mode, "which services to run", choices=MODES)
    _add(s, "--endpoint", c.endpoint, "unix:///path/to/csi.sock")
    _add(s, "--node-id", c.node_id, "this node's ID (node and all modes)")
    _add(s, "--pool", c.pool, "the node's pool (topology key nvme.perssd.io/pool)")
    _add(s, "--pool-from-node-label", c.pool_from_node_label, "read the pool from this label of the Kubernetes Node")
    _add(s, "--state-dir", c.state_dir, "node state directory")
    _add(s, "--backend", c.backend, "local backend", choices=("rawfile", "lvm"))
    _add(s, "--rawfile-dir", c.rawfile_dir, "directory of the rawfile backend")
    _add(s, "--volume-group", c.volume_group, "LVM volume group (lvm backend)")
    _add(s, "--thin-pool", c.thin_pool, "LVM thin pool name (lvm backend)")
    _add(s, "--lvm-config", c.lvm_config, "extra lvm --config settings (lvm backend)")
    _add(s, "--max-volume-bytes", c.max_volume_bytes, "largest volume to create (0 = capacity)")
    _add(s, "--reserve-bytes", c.reserve_bytes, "space of the backend kept free")
    _add(s, "--max-volumes-per-node", c.max_volumes_per_node, "reported in NodeGetInfo")
    _add(s, "--metrics-address", c.metrics_address, "serve Prometheus metrics here, e.g. :9808 (off when empty)")
    _add(s, "--flush-workers", c.flush_workers, "parallel uploads per flush")
    _add(s, "--hydrate-workers", c.hydrate_workers, "parallel downloads per hydrate")
    _add(s, "--heartbeat-seconds", c.heartbeat_seconds, "node heartbeat interval")
    _add(s, "--gc-interval-seconds", c.gc_interval_seconds, "controller: garbage collection interval (0 = off)")
    _add(s, "--gc-grace-seconds", c.gc_grace_seconds, "chunks younger than this are never collected")
    _add(s, "--gc-keep-generations", c.gc_keep_generations, "generations kept per volume")
    _add(s, "--grace-seconds", c.grace_seconds, "SIGTERM: time for in-flight RPCs")
    _add(s, "--unstage-wait-seconds", c.unstage_wait_seconds,
         "NodeUnstage waits this long for the flush before answering ABORTED with its progress")
    _add(s, "--freeze-timeout-seconds", c.freeze_timeout_seconds, "snapshots: longest file system freeze")
    _add(s, "--enable-alpha", c.enable_alpha, "enable alpha CSI capabilities")
    _add(s, "--pvc-events", c.pvc_events, "post Events on volumes' PVCs (auto: in a pod or with --kubeconfig)",
         choices=("auto", "on", "off"))
    _add(s, "--kubeconfig", c.kubeconfig, "kubeconfig of the API server for events (default: the pod's service account)")
    _add(s, "--events-progress-seconds", c.events_progress_seconds, "FlushProgress events at least this far apart")
    _store_flags(s)

    t = sub.add_parser("takeover", help="take a volume over from a dead node (loses its unflushed data)")
    t.add_argument("volume_id")
    t.add_argument("--from", dest="from_node", required=True, help="the node that owns it now")
    t.add_argument("--to", dest="to_node", default="", help="give ownership to this node (default: release)")
    _store_flags(t)

    g = sub.add_parser("gc", help="delete chunks and generations no volume or snapshot references")
    g.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    g.add_argument("--grace-seconds", type=float, default=_env("gc-grace-seconds", c.gc_grace_seconds))
    g.add_argument("--keep-generations", type=int, default=_env("gc-keep-generations", c.gc_keep_generations))
    _store_flags(g)

    ls = sub.add_parser("ls", help="list volumes, snapshots and generations in the bucket")
    _store_flags(ls)
    i = sub.add_parser("inspect", help="show one volume or snapshot in detail")
    i.add_argument("id")
    _store_flags(i)
    try:
        from . import pool_cli
        pool_cli.add_parser(sub)
    except ImportError:
        pass
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in fields})


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"))
    if args.command == "serve":
        cfg = config_from_args(args)
        if cfg.pool_from_node_label and cfg.mode in ("node", "all"):
            from .errors import CsiError
            from .kube import pool_from_node_label
            try:
                cfg.pool = pool_from_node_label(cfg.node_id, cfg.pool_from_node_label)
            except CsiError as e:
                print(f"csi-perssd: {e}", file=sys.stderr)
                return 2
            log.info("pool %s from label %s of node %s", cfg.pool, cfg.pool_from_node_label, cfg.node_id)
        from .runtime import Runtime
        try:
            rt = Runtime(cfg)
        except ValueError as e:
            print(f"csi-perssd: {e}", file=sys.stderr)
            return 2
        rt.serve_forever()
        return 0
    from . import admin
    return admin.run(args, config_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
