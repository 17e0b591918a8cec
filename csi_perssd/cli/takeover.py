"""`csi-perssd takeover`: move a volume's ownership away from a dead node (changes only the bucket)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from .. import ids
from ..config import Config
from ..errors import precondition
from ..remote.catalog import VolumeRecord
from ..stores import Stores
from . import progress
from .flags import config_from_args, store_flags

log = logging.getLogger("csi_perssd.admin")


def takeover(cfg: Config, vid: str, from_node: str, to_node: str,
             show: progress.Progress | None = None) -> int:
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
    line = f"takeover {vid}: moving ownership from {from_node} to {to_node or '(released)'}"
    with progress.Ticker(show or progress.Progress(enabled=False),
                         lambda: f"{line}: {progress.store_activity(cat.store) or 'updating'}"):
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



def add_parser(sub: Any) -> None:
    t = sub.add_parser("takeover", help="take a volume over from a dead node (loses its unflushed data)")
    t.add_argument("volume_id")
    t.add_argument("--from", dest="from_node", required=True, help="the node that owns it now")
    t.add_argument("--to", dest="to_node", default="", help="give ownership to this node (default: release)")
    progress.add_flag(t)
    store_flags(t)
    t.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return takeover(config_from_args(args), args.volume_id, args.from_node, args.to_node,
                    progress.from_args(args))
