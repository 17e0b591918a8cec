"""`csi-perssd gc`: delete chunks and generations no volume or snapshot references."""
from __future__ import annotations

import argparse
from typing import Any

from ..config import Config
from ..errors import CsiError
from . import progress
from .flags import config_from_args, env_default, store_flags


def add_parser(sub: Any) -> None:
    c = Config()
    g = sub.add_parser("gc", help="delete chunks and generations no volume or snapshot references")
    g.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    g.add_argument("--grace-seconds", type=float, default=env_default("gc-grace-seconds", c.gc_grace_seconds))
    g.add_argument("--keep-generations", type=int, default=env_default("gc-keep-generations", c.gc_keep_generations))
    progress.add_flag(g)
    store_flags(g)
    g.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..remote.gc import collect
    from ..stores import Stores
    cfg = config_from_args(args)
    dry_run = args.dry_run
    cat = Stores(cfg).catalog()
    what = "gc (dry run)" if dry_run else "gc"
    try:
        with progress.Ticker(progress.from_args(args),
                             lambda: f"{what}: {progress.store_activity(cat.store) or 'collecting'}"):
            rep = collect(cat, grace=args.grace_seconds, keep=args.keep_generations, dry_run=dry_run)
    except CsiError as e:
        print(f"gc failed: {e}")
        return 1
    verb = "would delete" if dry_run else "deleted"
    for key in rep.deleted_manifests + rep.deleted_other + rep.deleted_chunks:
        print(f"{verb} {key}")
    print(rep.summary())
    return 0
