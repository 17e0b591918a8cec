"""`csi-perssd rekey`: rewrap every lineage data key in the bucket under a new KEK.

Chunks and manifests stay as they are (they are sealed with the data keys, not with the KEK).
KEKs are read from files holding base64 of 32 bytes (`head -c32 /dev/urandom | base64`), or
from environment variables (`env:NAME`); they are never printed."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..crypto import keys as ck
from ..crypto.errors import CryptoError
from ..encryption import rekey
from ..stores import Stores
from .flags import config_from_args, store_flags


def add_parser(sub: Any) -> None:
    p = sub.add_parser("rekey", help="rewrap every data key under a new KEK (chunks untouched)")
    p.add_argument("--kek-from", action="append", required=True, metavar="FILE|env:NAME",
                   help="a KEK the data keys are wrapped with now (repeat for several)")
    p.add_argument("--new-kek-from", required=True, metavar="FILE|env:NAME", help="the KEK to wrap them with")
    store_flags(p)
    p.set_defaults(run=run)


def read_kek(source: str) -> ck.Kek:
    if source.startswith("env:"):
        text = os.environ.get(source[4:])
        if text is None:
            raise CryptoError(f"{source}: environment variable not set")
        return ck.parse_kek(text, source)
    try:
        with open(source, "rb") as f:
            return ck.parse_kek(f.read(4096), source)
    except OSError as e:
        raise CryptoError(f"{source}: {e.strerror}") from None


def run(args: argparse.Namespace) -> int:
    try:
        olds = [read_kek(s) for s in args.kek_from]
        new = read_kek(args.new_kek_from)
    except CryptoError as e:
        print(f"csi-perssd rekey: {e}", file=sys.stderr)
        return 2
    rep = rekey(Stores(config_from_args(args)).catalog(), olds, new)
    for rid in rep.rewrapped:
        print(f"rewrapped {rid}")
    for line in rep.failed:
        print(f"not rewrapped {line}", file=sys.stderr)
    print(f"{len(rep.rewrapped)} data keys rewrapped under KEK {new.kid}, {rep.current} already were, "
          f"{len(rep.failed)} failed")
    return 1 if rep.failed else 0
