"""Operator commands that read (and for takeover/gc, change) only the bucket."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import Config
from .errors import CsiError
from .stores import Stores

log = logging.getLogger("csi_perssd.admin")


def takeover(cfg: Config, vid: str, from_node: str, to_node: str) -> int:
    from . import ids
    ids.volume_id(vid)
    cat = Stores(cfg).catalog()

    def apply(r) -> None:  # type: ignore[no-untyped-def]
        if r.owner != from_node:
            raise CsiError(__import__("grpc").StatusCode.FAILED_PRECONDITION,
                           f"volume {vid} is owned by {r.owner or 'nobody'}, not {from_node}")
        r.owner = to_node
        r.epoch += 1
    rec = cat.update_volume(vid, apply)
    lost = "nothing" if rec.generation_node == from_node or not rec.generation else "unknown"
    log.warning("volume %s taken over from %s (epoch now %d, owner %s): writes on %s after generation %d "
                "that it had not flushed are lost; %s can no longer commit", vid, from_node, rec.epoch,
                to_node or "none", from_node, rec.generation, from_node)
    print(f"volume {vid}: ownership moved from {from_node} to {to_node or '(released)'}, epoch {rec.epoch}; "
          f"data after committed generation {rec.generation} that {from_node} had not flushed is lost "
          f"(last committer: {rec.generation_node or '-'}; at risk: {lost})")
    return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    try:
        if args.command == "takeover":
            return takeover(cfg, args.volume_id, args.from_node, args.to_node)
        if args.command in ("gc", "ls", "inspect"):
            from . import gc, inventory
            if args.command == "gc":
                return gc.main(cfg, dry_run=args.dry_run, grace=args.grace_seconds, keep=args.keep_generations)
            if args.command == "ls":
                return inventory.ls(cfg)
            return inventory.inspect(cfg, args.id)
        if args.command == "pool":
            return args.handler(args)
    except CsiError as e:
        print(f"csi-perssd {args.command}: {e}", file=sys.stderr)
        return 1
    print(f"unknown command {args.command}", file=sys.stderr)
    return 2
