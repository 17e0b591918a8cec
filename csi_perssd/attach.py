"""ControllerPublishVolume's bookkeeping: the capability and readonly flag a volume was
published with (recorded on the volume, so an incompatible re-publish is ALREADY_EXISTS), and
the node's attach limit (NodeGetInfo's max_volumes_per_node, carried by its catalog record)."""
from __future__ import annotations

import json
from typing import Any

from .errors import Code, CsiError
from .remote.catalog import Catalog, VolumeRecord


def entry(cap: dict[str, Any], readonly: bool) -> dict[str, Any]:
    """What is recorded for a publish (plain JSON, compared after a catalog round trip)."""
    return json.loads(json.dumps({"capability": cap, "readonly": bool(readonly)}, sort_keys=True))


def check_republish(rec: VolumeRecord, node: str, want: dict[str, Any]) -> None:
    """Spec: a volume already published to this node with another capability or readonly flag
    is ALREADY_EXISTS. Records from before publishes were recorded carry none: compatible."""
    if rec.owner != node or not rec.published:
        return
    have = rec.published
    if have != want:
        diff = [k for k in ("capability", "readonly") if have.get(k) != want.get(k)]
        raise CsiError(Code.ALREADY_EXISTS, f"volume {rec.id} is already published to node {node} with a "
                       f"different {' and '.join(diff)} (readonly={have.get('readonly')}); unpublish it first")


def attached(cat: Catalog, node: str) -> list[str]:
    return sorted(v.id for v in cat.list_volumes() if v.owner == node)


def check_limit(cat: Catalog, node: str, limit: int, vid: str) -> None:
    """RESOURCE_EXHAUSTED when `node` already holds `limit` volumes (other than `vid`)."""
    if limit <= 0:
        return
    held = [v for v in attached(cat, node) if v != vid]
    if len(held) >= limit:
        raise CsiError(Code.RESOURCE_EXHAUSTED, f"node {node} already has {len(held)} volumes published, its "
                       f"limit (max_volumes_per_node {limit}); unpublish one before publishing {vid}")
