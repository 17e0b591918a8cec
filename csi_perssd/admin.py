"""Operator commands that read (and for takeover/gc, change) only the bucket."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from . import ids
from .config import Config
from .errors import CsiError, precondition
from .remote.catalog import VolumeRecord
from .stores import Stores

log = logging.getLogger("csi_perssd.admin")


def takeover(cfg: Config, vid: str, from_node: str, to_node: str) -> int:
    """Move ownership from a (dead) node: epoch+1, so that node can no longer commit anything.
    What it wrote after the last generation it committed is lost; the log and output say so."""
    ids.volume_id(vid)
    ids.node_id(from_node)
    if to_node:
        ids.node_id(to_node)
    cat = Stores(cfg).catalog()
    before: list[VolumeRecord] = []

    def apply(r: VolumeRecord) -> None:
        if r.owner != from_node:
            raise precondition(f"volume {vid} is owned by {r.owner or 'nobody'}, not {from_node}")
        before[:] = [dataclasses.replace(r)]
        r.owner = to_node
        r.epoch += 1
    rec = cat.update_volume(vid, apply)
    if rec.persistence != "object":
        risk = f"{vid} is persistence={rec.persistence}: its only copy is on {from_node}"
    elif not rec.generation:
        risk = f"no generation was ever committed: everything {from_node} wrote is lost"
    elif rec.generation_node == from_node:
        risk = (f"{from_node} committed generation {rec.generation} itself; writes after that commit, "
                f"if it staged the volume again, are lost")
    else:
        risk = (f"generation {rec.generation} was committed by {rec.generation_node or 'another node'}; "
                f"everything {from_node} wrote since it took the volume (epoch {before[0].epoch}) is lost")
    log.warning("volume %s taken over from %s (epoch %d -> %d, owner now %s): %s; %s can no longer commit",
                vid, from_node, before[0].epoch, rec.epoch, to_node or "none", risk, from_node)
    print(f"volume {vid}: ownership moved from {from_node} to {to_node or '(released)'}, epoch {rec.epoch}; "
          f"committed generation {rec.generation} is what the next node sees. Data lost: {risk}.")
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
