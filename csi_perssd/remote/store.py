"""ObjectStore: the one shared state of the driver (S3 bucket/prefix, or a local directory).

Both implementations (`FileStore` for file://DIR, `S3Store` for s3://BUCKET/PREFIX) share this
interface and one test suite. Keys are relative ('volumes/pvol-1.json'); they are built only by
`remote.layout` from validated IDs and hex hashes.

`unreachable(e, where)` is the one place a StoreError becomes a CsiError (UNAVAILABLE);
`reachable(store)` applies it around a block of store calls and lets NotFound and
PreconditionFailed pass through, since callers decide what those mean.
"""
from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import CsiError, unavailable

_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")


class StoreError(Exception):
    """The store cannot be reached or failed after retries (maps to UNAVAILABLE)."""


class NotFound(StoreError):
    pass


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists (If-None-Match) or changed (If-Match)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object. From `list`, `etag` is a version tag: it changes whenever the object does
    (S3: the ETag, as `get` returns it; FileStore: inode, mtime and size, not the content MD5)."""
    key: str
    size: int
    etag: str
    mtime: float        # seconds since the epoch


Page = list[ObjectInfo]             # one LIST response (a name that a class's `list` method cannot shadow)


def unreachable(e: StoreError, where: str) -> CsiError:
    """The one translation of a failed store request: CsiError(UNAVAILABLE), `where` (naming the
    store or the operation, never a key's secret) before the store's own message."""
    return unavailable(f"{where}: {e}")


@contextmanager
def reachable(store: ObjectStore | str) -> Iterator[None]:
    """Map a failed store request to CsiError(UNAVAILABLE) naming the store (or its URL, for
    one not opened yet), never its keys."""
    try:
        yield
    except (NotFound, PreconditionFailed):
        raise
    except StoreError as e:
        raise unreachable(e, f"object store {store if isinstance(store, str) else store.url}") from e


@dataclass(frozen=True)
class Retry:
    """Retry budget: `attempts` tries in all, sleeping base*2^n (capped, full jitter) between them,
    and never starting a new try after `deadline_s` seconds since the first."""
    attempts: int = 6
    base_s: float = 0.1
    cap_s: float = 4.0
    deadline_s: float = 30.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0

    def delay(self, n: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * (2 ** n)))


@dataclass
class StoreStats:
    """Counters of one store (thread-safe increments; read the fields or snapshot())."""
    requests: dict[str, int] = field(default_factory=dict)     # by operation
    errors: int = 0               # failed attempts (each retry counts)
    errors_by_op: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, op: str, up: int = 0, down: int = 0) -> None:
        with self._lock:
            self.requests[op] = self.requests.get(op, 0) + 1
            self.bytes_up += up
            self.bytes_down += down

    def add(self, *, errors: int = 0, retries: int = 0, down: int = 0, op: str = "") -> None:
        with self._lock:
            self.errors += errors
            if errors and op:
                self.errors_by_op[op] = self.errors_by_op.get(op, 0) + errors
            self.retries += retries
            self.bytes_down += down

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": dict(self.requests), "total_requests": sum(self.requests.values()),
                    "errors": self.errors, "errors_by_op": dict(self.errors_by_op), "retries": self.retries,
                    "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}


def check_key(key: str) -> str:
    if len(key) > 900 or _KEY_RE.fullmatch(key) is None:
        raise ValueError(f"refusing unsafe object key {key[:80]!r}")
    return key


@runtime_checkable
class ObjectStore(Protocol):
    url: str
    stats: StoreStats           # requests, errors, retries and bytes of this store
    retry: Retry                # its retry budget (a local directory tries once)

    def get(self, key: str) -> tuple[bytes, str]:
        """Return (data, etag); NotFound if missing."""

    def get_into(self, key: str, buf: memoryview) -> tuple[bytes | memoryview, str]:
        """get() into a caller's buffer: (data, etag) where data is a view of the start of `buf`
        when the object fits in it (no allocation, no copy: the hydrate reads chunk bodies into
        reused page-aligned buffers), else a new bytes object. NotFound if missing."""

    def put(self, key: str, data: bytes | bytearray, *, if_none_match: bool = False,
            if_match: str | None = None) -> str:
        """Write and return the new etag. if_none_match: only create. if_match: only replace
        that version. PreconditionFailed when the condition does not hold."""

    def head(self, key: str) -> ObjectInfo | None: ...

    def delete(self, key: str) -> None:
        """Remove; missing is fine."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """All objects whose key starts with prefix, in key order."""

    def scan(self, prefix: str, start_after: str = "") -> Iterator[ObjectInfo]:
        """Objects under prefix with keys after start_after, fetched lazily page by page (a
        caller that stops early pays only for the pages it read); each page in key order."""

    def scan_pages(self, prefix: str, start_after: str = "", token: str = "") -> Iterator[tuple[Page, str]]:
        """The same as (page, the server's continuation token, "" after the last page), one per
        LIST request; `token` continues from an earlier page."""
