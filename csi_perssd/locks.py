"""Per-ID locks: a second concurrent operation on the same ID gets ABORTED (CSI spec)."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import aborted


class IdLocks:
    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._held: set[str] = set()

    @contextmanager
    def hold(self, *ids: str) -> Iterator[None]:
        keys = sorted(set(i for i in ids if i))
        with self._mu:
            busy = [k for k in keys if k in self._held]
            if busy:
                raise aborted(f"an operation on {busy[0]} is already in progress")
            self._held.update(keys)
        try:
            yield
        finally:
            with self._mu:
                self._held.difference_update(keys)
