"""Fetch one chunk for lazy hydration: the hydrate pipeline's GET -> decode -> verify
(remote/stages.fetch_verified, the same code a full hydrate runs), retried on store errors up to
a deadline.
"""
from __future__ import annotations

import logging
import random
import threading
import time

from ..remote.chunks import chunk_key
from ..remote.codec import PLAIN, Codec
from ..remote.stages import fetch_verified
from ..remote.store import ObjectStore, StoreError

log = logging.getLogger(__name__)


class FetchTimeout(Exception):
    """The object store did not answer within the fetch timeout (a read gets EIO)."""


def fetch_chunk(store: ObjectStore, h: str, max_size: int, timeout: float,
                pause: float = 0.2, codec: Codec = PLAIN,
                stop: threading.Event | None = None,
                landing: memoryview | None = None) -> bytes | memoryview:
    """GET chunk `h` and verify it. Store errors are retried (exponential backoff, jitter) until
    `timeout` seconds have passed, then FetchTimeout; at once when `stop` is set (the server is
    shutting down: its hydrator must end before the plugin's kill deadline). A missing or corrupt
    chunk is not retried: it will not heal by waiting (ChunkMissing / ChunkCorrupted). With
    `landing` the object is read into it (ObjectStore.get_into) and the plaintext may be a view
    of it, valid until it is reused."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            return fetch_verified(store, h, max_size, codec, landing=landing)[0]
        except StoreError as e:
            attempt += 1
            left = deadline - time.monotonic()
            key = chunk_key(h)
            if left <= 0:
                raise FetchTimeout(f"chunk {key}: object store unreachable for {timeout:.0f}s "
                                   f"({attempt} attempts): {e}") from e
            if stop is not None and stop.is_set():
                raise FetchTimeout(f"chunk {key}: not retried, the server is stopping: {e}") from e
            delay = min(left, random.uniform(pause / 2, pause * 2 ** min(attempt, 5)))
            log.warning("chunk %s: object store error (attempt %d, retrying for %.0fs more): %s",
                        key, attempt, left, e)
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
