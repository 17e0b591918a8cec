"""Validation of every identifier before it becomes a path, a device name or an S3 key.

IDs minted by the driver look like `pvol-<32 hex>` / `psnap-<32 hex>`, but IDs from other
sources (csi-sanity, an operator) only need to be safe: a leading alphanumeric, then
alphanumerics, `.`, `_` or `-`, at most 128 bytes. That rules out `/`, `..` as a component,
NUL bytes, whitespace and anything a shell or an S3 key could misread.
"""
from __future__ import annotations

import os
import re
import uuid

from .errors import invalid

MAX_ID_BYTES = 128          # CSI "Size Limits": strings up to 128 bytes
MAX_NAME_BYTES = 128
MAX_NODE_ID_BYTES = 253     # a Kubernetes node name is a DNS subdomain
MAX_PATH_BYTES = 4096

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NODE_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")

VOLUME_PREFIX = "pvol-"
SNAPSHOT_PREFIX = "psnap-"
GROUP_PREFIX = "pgrp-"


def new_volume_id() -> str:
    return VOLUME_PREFIX + uuid.uuid4().hex


def new_snapshot_id() -> str:
    return SNAPSHOT_PREFIX + uuid.uuid4().hex


def new_group_snapshot_id() -> str:
    return GROUP_PREFIX + uuid.uuid4().hex


def _check(kind: str, value: str, regex: re.Pattern[str], limit: int) -> str:
    if not value:
        raise invalid(f"{kind} is required")
    if not isinstance(value, str):
        raise invalid(f"{kind} must be a string")
    if len(value.encode("utf-8")) > limit:
        raise invalid(f"{kind} is longer than {limit} bytes")
    if regex.fullmatch(value) is None:
        raise invalid(f"{kind} {value[:64]!r} contains characters that are not allowed "
                      f"(use letters, digits, '.', '_' and '-', starting with a letter or digit)")
    return value


def volume_id(value: str) -> str:
    return _check("volume_id", value, _ID_RE, MAX_ID_BYTES)


def snapshot_id(value: str) -> str:
    return _check("snapshot_id", value, _ID_RE, MAX_ID_BYTES)


def group_snapshot_id(value: str) -> str:
    return _check("group_snapshot_id", value, _ID_RE, MAX_ID_BYTES)


def node_id(value: str) -> str:
    return _check("node_id", value, _NODE_RE, MAX_NODE_ID_BYTES)


def pool_name(value: str) -> str:
    return _check("pool", value, _NODE_RE, 63)


def name(value: str, kind: str = "name") -> str:
    """A CO-supplied name: any printable text (it is hashed before it becomes a key)."""
    if not value:
        raise invalid(f"{kind} is required")
    if len(value.encode("utf-8")) > MAX_NAME_BYTES:
        raise invalid(f"{kind} is longer than {MAX_NAME_BYTES} bytes")
    if "\x00" in value or any(ord(c) < 0x20 for c in value):
        raise invalid(f"{kind} contains control characters")
    return value


def host_path(value: str, kind: str) -> str:
    """A path on the node given by the CO: absolute, normalised, no NUL, no `..`."""
    if not value:
        raise invalid(f"{kind} is required")
    if "\x00" in value:
        raise invalid(f"{kind} contains a NUL byte")
    if len(value.encode("utf-8")) > MAX_PATH_BYTES:
        raise invalid(f"{kind} is longer than {MAX_PATH_BYTES} bytes")
    if not value.startswith("/"):
        raise invalid(f"{kind} {value!r} is not an absolute path")
    if ".." in value.split("/"):
        raise invalid(f"{kind} {value!r} contains '..'")
    norm = os.path.normpath(value)
    return norm
