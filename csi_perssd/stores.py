"""Opens the catalog's object store from the driver's configuration or a call's CSI secrets.

Stores are cached per (url, credentials digest) so repeated calls share connection pools.
Secrets are never logged; only the digest's first characters identify a cached store.

Calls without secrets (NodeUnstage, the flush, heartbeats) reuse the secrets the CO gave last,
but only secrets that have worked: a new set is adopted after the store answered a probe
request with it, so one call with a wrong endpoint or wrong keys cannot cut the node off
from its object store."""
from __future__ import annotations

import hashlib
import json
import re
import threading

from .config import Config
from .errors import invalid, unavailable
from .remote.catalog import Catalog
from .remote.store import ObjectStore, StoreError

SECRET_KEYS = ("endpoint", "region", "accessKeyId", "secretAccessKey", "caBundle")
PROBE_KEY = "nodes/probe.json"          # HEAD only: absent is fine, any answer proves the settings
_CREDENTIAL_RE = re.compile(r"[\x21-\x7e]{1,256}")       # printable ASCII, no whitespace


def _check_secrets(secrets: dict[str, str]) -> None:
    for k in ("accessKeyId", "secretAccessKey"):
        v = secrets.get(k)
        if v and not _CREDENTIAL_RE.fullmatch(v):
            raise invalid(f"object store settings: {k} must be 1-256 printable ASCII characters without spaces")


class Stores:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._mu = threading.Lock()
        self._cache: dict[str, ObjectStore] = {}
        self._proven: set[str] = set()
        self.last_secrets: dict[str, str] = {}

    def _open(self, secrets: dict[str, str]) -> ObjectStore:
        url = self.cfg.catalog
        if url.startswith("file://"):
            from .remote.filestore import FileStore
            return FileStore(url[len("file://"):])
        if url.startswith("s3://"):
            from .remote import s3
            _check_secrets(secrets)
            defaults = {"endpoint": self.cfg.s3_endpoint, "region": self.cfg.s3_region,
                        "caBundle": self.cfg.s3_ca_bundle}
            try:
                return s3.from_config(url, secrets, defaults)
            except ValueError as e:
                raise invalid(f"object store settings: {e}") from e
        raise invalid(f"catalog URL {url!r} must be file:///DIR or s3://BUCKET/PREFIX")

    @staticmethod
    def _digest(secrets: dict[str, str]) -> str:
        return hashlib.sha256(json.dumps(secrets, sort_keys=True).encode()).hexdigest()

    def store(self, secrets: dict[str, str] | None = None) -> ObjectStore:
        secrets = {k: v for k, v in (secrets or {}).items() if k in SECRET_KEYS}
        digest = self._digest(secrets)
        with self._mu:
            st = self._cache.get(digest)
            if st is None:
                try:
                    st = self._open(secrets)
                except StoreError as e:
                    raise unavailable(f"object store {self.cfg.catalog}: {e}") from e
                self._cache[digest] = st
            return st

    def _adopt(self, secrets: dict[str, str], st: ObjectStore) -> None:
        """Remember secrets for calls that come without them, once they have worked."""
        digest = self._digest(secrets)
        with self._mu:
            proven = digest in self._proven
        if not proven:
            try:
                st.head(PROBE_KEY)
            except StoreError as e:
                raise unavailable(f"object store {self.cfg.catalog} with the call's secrets: {e}") from e
            except ValueError as e:
                raise invalid(f"object store settings: {e}") from e
        with self._mu:
            self._proven.add(digest)
            self.last_secrets = secrets

    def catalog(self, secrets: dict[str, str] | None = None) -> Catalog:
        given = {k: v for k, v in (secrets or {}).items() if k in SECRET_KEYS}
        if not given:
            with self._mu:
                given = dict(self.last_secrets)  # calls without secrets reuse what worked last
            return Catalog(self.store(given))
        st = self.store(given)
        self._adopt(given, st)
        return Catalog(st)
