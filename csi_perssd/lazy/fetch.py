"""Fetch one chunk for lazy hydration: GET with retries up to a deadline, then decode + verify.

`open_chunk` is the one place a stored blob becomes plaintext (decode, BLAKE3 check): when chunks
get encrypted, decrypt-and-verify replaces it there and nothing else changes.
"""
from __future__ import annotations

import logging
import random
import time

from ..remote.chunks import CorruptBlob, chunk_hash, chunk_key, decompress
from ..remote.store import NotFound, ObjectStore, StoreError
from ..remote.transfer import ChunkCorrupted, ChunkMissing

log = logging.getLogger(__name__)


class FetchTimeout(Exception):
    """The object store did not answer within the fetch timeout (a read gets EIO)."""


def open_chunk(blob: bytes, h: str, max_size: int) -> bytes | memoryview:
    """The plaintext of a stored blob whose name is `h`; ChunkCorrupted when it does not match."""
    key = chunk_key(h)
    try:
        raw = decompress(blob, max_size=max_size)
    except CorruptBlob as e:
        raise ChunkCorrupted(key, str(e)) from None
    if chunk_hash(raw) != h:
        raise ChunkCorrupted(key, "content does not match its BLAKE3 hash")
    return raw


def fetch_chunk(store: ObjectStore, h: str, max_size: int, timeout: float,
                pause: float = 0.2) -> bytes | memoryview:
    """GET chunk `h` and verify it. Store errors are retried (exponential backoff, jitter) until
    `timeout` seconds have passed, then FetchTimeout. A missing or corrupt chunk is not retried:
    it will not heal by waiting (ChunkMissing / ChunkCorrupted)."""
    key = chunk_key(h)
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            blob, _ = store.get(key)
            return open_chunk(blob, h, max_size)
        except NotFound:
            raise ChunkMissing(key, "missing from the store") from None
        except StoreError as e:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise FetchTimeout(f"chunk {key}: object store unreachable for {timeout:.0f}s "
                                   f"({attempt} attempts): {e}") from e
            delay = min(left, random.uniform(pause / 2, pause * 2 ** min(attempt, 5)))
            log.warning("chunk %s: object store error (attempt %d, retrying for %.0fs more): %s",
                        key, attempt, left, e)
            time.sleep(delay)
