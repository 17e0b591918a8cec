"""ObjectStore: the one shared state of the driver (S3 bucket/prefix, or a local directory).

Both implementations (`FileStore` for file://DIR, `S3Store` for s3://BUCKET/PREFIX) share this
interface and one test suite. Keys are relative ('volumes/pvol-1.json'); they are built only by
`remote.catalog` / `remote.transfer` from validated IDs and hex hashes.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")


class StoreError(Exception):
    """The store cannot be reached or failed after retries (maps to UNAVAILABLE)."""


class NotFound(StoreError):
    pass


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    mtime: float        # seconds since the epoch


def check_key(key: str) -> str:
    if len(key) > 900 or _KEY_RE.fullmatch(key) is None:
        raise ValueError(f"refusing unsafe object key {key[:80]!r}")
    return key


@runtime_checkable
class ObjectStore(Protocol):
    url: str

    def get(self, key: str) -> tuple[bytes, str]:
        """Return (data, etag); NotFound if missing."""

    def put(self, key: str, data: bytes | bytearray, *, if_none_match: bool = False,
            if_match: str | None = None) -> str:
        """Write and return the new etag. if_none_match: only create. if_match: only replace
        that version. PreconditionFailed when the condition does not hold."""

    def head(self, key: str) -> ObjectInfo | None: ...

    def delete(self, key: str) -> None:
        """Remove; missing is fine."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """All objects whose key starts with prefix, in key order."""
