"""Command line: `csi-perssd serve|takeover|gc|ls|inspect|pool|rekey`. Every flag can also be set
with an environment variable PERSSD_<FLAG> (e.g. PERSSD_NODE_ID, PERSSD_CATALOG).

One module per command; each has `add_parser(subparsers)`, which registers the command and
sets `run` (args -> exit code) as its default. `main` parses, sets up logging and calls `run`;
a CsiError from any command is printed as `csi-perssd <command>: <message>` with exit code 1."""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import CsiError
from . import gc, inspect, ls, pool, rekey, serve, takeover
from .flags import config_from_args, setup_logging

__all__ = ["build_parser", "config_from_args", "main"]

COMMANDS = (serve, takeover, gc, ls, inspect, pool, rekey)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csi-perssd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"csi-perssd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"))
    try:
        return int(args.run(args))
    except CsiError as e:
        print(f"csi-perssd {args.command}: {e}", file=sys.stderr)
        return 1

