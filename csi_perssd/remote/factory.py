"""The one place object stores are opened and cached, for the whole process.

`STORES.open(url, secrets, defaults)` builds a FileStore (file:///DIR) or an S3Store
(s3://BUCKET/PREFIX, settings from CSI secrets over the driver's defaults, validated by
`s3.settings`) and caches it per distinct settings, so repeated calls share connection pools.
Whoever needs to see every store (the metrics collector) says so with `STORES.observe(fn)`:
fn is called for each store already open and each one opened later. Nothing is found by
looking into modules.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from .store import ObjectStore

Observer = Callable[[ObjectStore], None]


class StoreFactory:
    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self._mu = threading.Lock()
        self._cache: OrderedDict[str, ObjectStore] = OrderedDict()
        self._observers: list[Observer] = []

    def observe(self, fn: Observer) -> None:
        with self._mu:
            if fn in self._observers:
                return
            self._observers.append(fn)
            current = list(self._cache.values())
        for st in current:
            fn(st)

    def _opened(self, st: ObjectStore) -> None:
        with self._mu:
            observers = list(self._observers)
        for fn in observers:
            fn(st)

    def open(self, url: str, secrets: Mapping[str, str] | None = None, defaults: Any = None,
             *, cache: bool = True, **opts: Any) -> ObjectStore:
        """ValueError for unsafe or malformed settings (callers map it to INVALID_ARGUMENT);
        StoreError when a store cannot be set up (a FileStore's directory)."""
        from . import s3
        if url.startswith("s3://"):
            kwargs = s3.settings(url, secrets or {}, defaults)
            kwargs.update(opts)
            ident = "s3\0" + hashlib.sha256(repr((url, sorted(kwargs.items()))).encode()).hexdigest()

            def build() -> ObjectStore:
                return s3.S3Store(url, **kwargs)
        else:
            ident = "url\0" + url + "\0" + repr(sorted(opts.items()))

            def build() -> ObjectStore:
                return s3.open_store(url, **opts)
        if not cache:
            st = build()
            self._opened(st)
            return st
        return self._cached(ident, build)

    def _cached(self, ident: str, build: Callable[[], ObjectStore]) -> ObjectStore:
        with self._mu:
            hit = self._cache.get(ident)
            if hit is not None:
                self._cache.move_to_end(ident)
                return hit
        st = build()
        with self._mu:
            hit = self._cache.get(ident)
            if hit is not None:
                return hit          # another thread built the same store meanwhile
            self._cache[ident] = st
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        self._opened(st)
        return st


STORES = StoreFactory()
