"""Opens the catalog's object store from the driver's configuration or a call's CSI secrets.

Stores come from the process's one cache (remote/factory.py), per distinct settings.
Secrets are never logged; only the digest's first characters identify a cached store.

Every CSI call uses its own secrets, else the driver's own configured credentials, never the
secrets of another call (`catalog`: Controller RPCs; `volume_catalog`: work on one volume, the
Node RPCs, hydrate and flush). A call without secrets in a deployment whose only credentials come
with CSI secrets fails (UNAVAILABLE, "no S3 credentials"). Only the driver's own background work
(`background_catalog`: heartbeats, garbage collection, the snapshot workers) reuses the secrets
the CO gave last, since a secrets-only deployment has nothing else, and only secrets that have
worked: a new set is adopted after the store answered a probe request with it, so one call with
a wrong endpoint or wrong keys cannot cut the node off from its own object store.

`own_store()` tells, once per process, whether calls without secrets can reach the catalog at
all: the controller advertises the RPCs whose requests carry no secrets (ListVolumes,
ControllerGetVolume, GetCapacity) only then."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import weakref

from .config import Config
from .errors import invalid
from .remote.catalog import Catalog, RecordCache
from .remote.factory import STORES, StoreFactory
from .remote.layout import PROBE_KEY
from .remote.store import ObjectStore, reachable

log = logging.getLogger(__name__)
SECRET_KEYS = ("endpoint", "region", "accessKeyId", "secretAccessKey", "caBundle")
_CREDENTIAL_RE = re.compile(r"[\x21-\x7e]{1,256}")       # printable ASCII, no whitespace


def _own_credentials() -> bool:
    """Whether boto3's credential chain (environment, shared files, container or instance role)
    finds credentials: what an S3 call without CSI secrets signs with."""
    import botocore.exceptions
    import botocore.session
    try:
        return botocore.session.Session().get_credentials() is not None
    except botocore.exceptions.BotoCoreError as e:
        log.warning("the driver's own S3 credentials cannot be loaded: %s", type(e).__name__)
        return False


def _check_secrets(secrets: dict[str, str]) -> None:
    for k in ("accessKeyId", "secretAccessKey"):
        v = secrets.get(k)
        if v and not _CREDENTIAL_RE.fullmatch(v):
            raise invalid(f"object store settings: {k} must be 1-256 printable ASCII characters without spaces")


class Stores:
    """The driver's view of its object store: opened through the process's one factory
    (`remote.factory.STORES`, which caches the stores), one record cache per store."""

    def __init__(self, cfg: Config, factory: StoreFactory = STORES):
        self.cfg = cfg
        self.factory = factory
        self._mu = threading.Lock()
        self._records: weakref.WeakKeyDictionary[ObjectStore, RecordCache] = weakref.WeakKeyDictionary()
        self._proven: set[str] = set()
        self.last_secrets: dict[str, str] = {}
        self._own: bool | None = None

    def _open(self, secrets: dict[str, str]) -> ObjectStore:
        url = self.cfg.catalog
        if not url.startswith(("file://", "s3://")):
            raise invalid(f"catalog URL {url!r} must be file:///DIR or s3://BUCKET/PREFIX")
        if url.startswith("s3://"):
            _check_secrets(secrets)
        try:
            with reachable(url):
                return self.factory.open(url, secrets, self.cfg)
        except ValueError as e:
            raise invalid(f"object store settings: {e}") from e

    def own_store(self) -> bool:
        """Whether calls without CSI secrets reach the catalog: a file:// catalog, or an s3://
        one with credentials of the driver's own. Decided on the first call and kept for the
        process's life (the capabilities that depend on it must not change)."""
        with self._mu:
            if self._own is None:
                self._own = not self.cfg.catalog.startswith("s3://") or _own_credentials()
                if not self._own:
                    log.warning("the driver has no S3 credentials of its own: only calls that carry CSI "
                                "secrets reach %s (a secrets-only deployment)", self.cfg.catalog)
            return self._own

    @staticmethod
    def _digest(secrets: dict[str, str]) -> str:
        return hashlib.sha256(json.dumps(secrets, sort_keys=True).encode()).hexdigest()

    def store(self, secrets: dict[str, str] | None = None) -> ObjectStore:
        return self._open({k: v for k, v in (secrets or {}).items() if k in SECRET_KEYS})

    def _adopt(self, secrets: dict[str, str], st: ObjectStore) -> None:
        """Remember secrets for calls that come without them, once they have worked."""
        digest = self._digest(secrets)
        with self._mu:
            proven = digest in self._proven
        if not proven:
            try:
                with reachable(st):
                    st.head(PROBE_KEY)
            except ValueError as e:
                raise invalid(f"object store settings: {e}") from e
        with self._mu:
            self._proven.add(digest)
            self.last_secrets = secrets

    def _catalog(self, st: ObjectStore) -> Catalog:
        with self._mu:
            cache = self._records.get(st)
            if cache is None:
                cache = self._records[st] = RecordCache()
        return Catalog(st, cache)

    def volume_catalog(self, secrets: dict[str, str] | None) -> Catalog:
        """The catalog for work on ONE volume: through the secrets given for that volume, else
        through the driver's own configured credentials; never secrets another call left."""
        return self.catalog(secrets)

    def catalog(self, secrets: dict[str, str] | None = None) -> Catalog:
        """The catalog for a CSI call: through its secrets (adopted for background work once they
        worked), else through the driver's own configured credentials; never another call's."""
        given = {k: v for k, v in (secrets or {}).items() if k in SECRET_KEYS}
        st = self.store(given)
        if given:
            self._adopt(given, st)
        return self._catalog(st)

    def background_catalog(self) -> Catalog:
        """The catalog for the driver's own work (heartbeats, GC, the snapshot workers): the
        secrets the CO gave last that worked, else the driver's own configured credentials."""
        with self._mu:
            given = dict(self.last_secrets)
        return self._catalog(self.store(given))
