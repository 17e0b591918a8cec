"""`csi-perssd gc`: one garbage collection from the command line (the collector is remote/gc.py)."""
from __future__ import annotations

from .config import Config
from .errors import CsiError
from .remote.gc import collect


def main(cfg: Config, *, dry_run: bool, grace: float, keep: int) -> int:
    from .stores import Stores

    try:
        rep = collect(Stores(cfg).catalog(), grace=grace, keep=keep, dry_run=dry_run)
    except CsiError as e:
        print(f"gc failed: {e}")
        return 1
    verb = "would delete" if dry_run else "deleted"
    for key in rep.deleted_manifests + rep.deleted_other + rep.deleted_chunks:
        print(f"{verb} {key}")
    print(rep.summary())
    return 0
