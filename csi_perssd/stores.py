"""Opens the catalog's object store from the driver's configuration or a call's CSI secrets.

Stores are cached per (url, credentials digest) so repeated calls share connection pools.
Secrets are never logged; only the digest's first characters identify a cached store."""
from __future__ import annotations

import hashlib
import json
import threading

from .config import Config
from .errors import invalid
from .remote.catalog import Catalog
from .remote.store import ObjectStore, StoreError
from .errors import unavailable

SECRET_KEYS = ("endpoint", "region", "accessKeyId", "secretAccessKey", "caBundle")


class Stores:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._mu = threading.Lock()
        self._cache: dict[str, ObjectStore] = {}
        self.last_secrets: dict[str, str] = {}

    def _open(self, secrets: dict[str, str]) -> ObjectStore:
        url = self.cfg.catalog
        if url.startswith("file://"):
            from .remote.filestore import FileStore
            return FileStore(url[len("file://"):])
        if url.startswith("s3://"):
            from .remote import s3
            defaults = {"endpoint": self.cfg.s3_endpoint, "region": self.cfg.s3_region,
                        "caBundle": self.cfg.s3_ca_bundle}
            try:
                return s3.from_config(url, secrets, defaults)
            except ValueError as e:
                raise invalid(f"object store settings: {e}") from e
        raise invalid(f"catalog URL {url!r} must be file:///DIR or s3://BUCKET/PREFIX")

    def store(self, secrets: dict[str, str] | None = None) -> ObjectStore:
        secrets = {k: v for k, v in (secrets or {}).items() if k in SECRET_KEYS}
        digest = hashlib.sha256(json.dumps(secrets, sort_keys=True).encode()).hexdigest()
        with self._mu:
            st = self._cache.get(digest)
            if st is None:
                try:
                    st = self._open(secrets)
                except StoreError as e:
                    raise unavailable(f"object store {self.cfg.catalog}: {e}") from e
                self._cache[digest] = st
            if secrets:
                self.last_secrets = secrets
            return st

    def catalog(self, secrets: dict[str, str] | None = None) -> Catalog:
        if not secrets and self.last_secrets:
            secrets = self.last_secrets      # calls without secrets reuse what the CO gave last
        return Catalog(self.store(secrets))
