"""Shared flag helpers: every flag has a PERSSD_<FLAG> environment variable as its default."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Any

from ..config import Config


def env_name(flag: str) -> str:
    return "PERSSD_" + flag.lstrip("-").upper().replace("-", "_")


def env_default(name: str, default: Any) -> Any:
    """The value of PERSSD_<NAME>, converted to the type of `default`; `default` when unset."""
    v = os.environ.get(env_name(name))
    if v is None:
        return default
    if isinstance(default, bool):
        return v.lower() in ("1", "true", "yes", "on")
    return type(default)(v) if default is not None else v


def add(p: argparse.ArgumentParser, flag: str, default: Any, help: str, **kw: Any) -> None:
    name = flag.lstrip("-")
    d = env_default(name, default)
    if isinstance(default, bool):
        p.add_argument(flag, action="store_true", default=d, help=help + f" [{env_name(name)}]")
    else:
        p.add_argument(flag, default=d, type=type(default) if default is not None else str,
                       help=f"{help} (default {default!r}) [{env_name(name)}]", **kw)


def store_flags(p: argparse.ArgumentParser) -> None:
    """The object store flags every bucket-reading command takes, and --log-level."""
    c = Config()
    add(p, "--catalog", c.catalog, "object store URL: file:///DIR or s3://BUCKET/PREFIX")
    add(p, "--s3-endpoint", c.s3_endpoint, "S3 endpoint URL (credentials from AWS_* env or CSI secrets)")
    add(p, "--s3-region", c.s3_region, "S3 region")
    add(p, "--s3-ca-bundle", c.s3_ca_bundle, "CA bundle file for the S3 endpoint")
    add(p, "--log-level", c.log_level, "debug, info, warning or error")


def config_from_args(args: argparse.Namespace) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in fields})


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
