"""S3Store: the ObjectStore interface on an S3-compatible bucket (s3://BUCKET/PREFIX), with boto3.

- Conditional writes: PutObject IfNoneMatch='*' (create only) and IfMatch=<etag> (replace only
  that version). 412 / 409 / PreconditionFailed -> PreconditionFailed. SeaweedFS answers 412 to
  If-Match on a missing key where AWS answers 404: both mean "PreconditionFailed" here.
- Retries: botocore's own retries are off; every call goes through one bounded loop with
  exponential backoff and full jitter on 5xx, throttling, timeouts and connection errors.
  After `Retry.attempts` (or `Retry.deadline_s`) the call raises StoreError (-> UNAVAILABLE).
  A conditional PUT retried after an ambiguous failure that then answers 412 is checked
  against the object's ETag: if our own bytes are there, the first attempt won.
- Keys are PREFIX/ + check_key(key); bucket and prefix are validated so that nothing (a CSI
  secret included) can point outside the prefix.
- Credentials are never logged or shown in repr(); `stats` counts requests, errors and bytes.
"""
from __future__ import annotations

import atexit
import base64
import functools
import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import boto3
import botocore
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.exceptions
import botocore.httpsession
import botocore.parsers
import urllib3.exceptions

from .store import NotFound, ObjectInfo, ObjectStore, Page, PreconditionFailed, Retry, StoreError, StoreStats, check_key

log = logging.getLogger(__name__)
T = TypeVar("T")

_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_SEG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LIST_PREFIX_RE = re.compile(r"[A-Za-z0-9._/-]*")
_ENDPOINT_RE = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(:[0-9]{1,5})?/?")
_REGION_RE = re.compile(r"[a-z0-9-]{1,32}")
_THROTTLE = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout",
             "TooManyRequestsException", "RequestLimitExceeded",
             "ServiceUnavailable", "InternalError", "OperationAborted"}
_PRECONDITION = {"PreconditionFailed", "ConditionalRequestConflict"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://BUCKET[/PREFIX] -> (bucket, prefix without slashes); ValueError if unsafe."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url[:80]!r}")
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.rstrip("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket or "-." in bucket or ".-" in bucket:
        raise ValueError(f"invalid bucket name {bucket[:80]!r}")
    if prefix:
        if len(prefix) > 200:
            raise ValueError("object prefix too long")
        for seg in prefix.split("/"):
            if not _PREFIX_SEG_RE.fullmatch(seg) or seg in (".", ".."):
                raise ValueError(f"invalid object prefix {prefix[:80]!r}")
    return bucket, prefix


def _etag(raw: str | None) -> str:
    return (raw or "").strip('"')


def _status(e: botocore.exceptions.ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _retryable(e: Exception) -> bool:
    if isinstance(e, botocore.exceptions.ClientError):
        st = _status(e)
        return st >= 500 or st == 429 or _code(e) in _THROTTLE
    return isinstance(e, (botocore.exceptions.ConnectionError,
                          botocore.exceptions.HTTPClientError,
                          botocore.exceptions.ReadTimeoutError,
                          botocore.exceptions.ResponseStreamingError,
                          ConnectionError, TimeoutError))


def _describe(e: Exception) -> str:
    if isinstance(e, botocore.exceptions.ClientError):
        return f"{_code(e) or 'error'} (HTTP {_status(e)})"
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return ("no S3 credentials: none came with the call's CSI secrets and the driver has none of its own "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or a role)")
    return f"{type(e).__name__}: {e}"


class _Precondition(Exception):
    """Internal: a 412 inside the retry loop (decided on by the caller)."""



def _read_body_into(body: Any, out: memoryview) -> bool:
    """Fill `out` (exactly the body's Content-Length) from a GetObject body with recv_into on
    the connection's socket (see _readinto_raw). False, having read nothing, where that is not
    possible: the caller then reads it the usual way."""
    raw = getattr(body, "_raw_stream", None)            # urllib3.response.HTTPResponse
    return raw is not None and _readinto_raw(raw, out)


def _readinto_raw(raw: Any, out: memoryview) -> bool:
    """Fill `out` (exactly the body's Content-Length) from urllib3's response `raw` with
    recv_into on the connection's socket: through the http.client response under it (urllib3's
    own read() would read into a new bytes object, and its readinto() copies from one). False,
    having read nothing, where that response is not there or the body is content-encoded. A
    short body is a ConnectionError (retried); once the body is read the connection goes back to
    urllib3's pool, as after body.read()."""
    fp = getattr(raw, "_fp", None)                      # http.client.HTTPResponse
    if fp is None or not hasattr(fp, "readinto") or fp.isclosed():
        return False
    if (raw.headers.get("content-encoding") or "identity").lower() != "identity":
        return False
    got, n = 0, len(out)
    try:
        while got < n:
            k = fp.readinto(out[got:])
            if not k:
                break
            got += k
    except TimeoutError:
        raise
    except (OSError, http.client.HTTPException) as e:
        raise ConnectionError(f"GET body cut off after {got} of {n} bytes: {e}") from e
    if got != n:
        raise ConnectionError(f"GET body cut off after {got} of {n} bytes")
    if fp.isclosed():               # http.client closes it at Content-Length: connection reusable
        raw.release_conn()
    return True


class _Unusual(Exception):
    """Internal: a response the lean GET leaves to boto3 (a redirect, a 400)."""


class _LeanGet:
    """GetObject without boto3's per-call machinery, for the hydrate's chunk GETs (a landing
    buffer given): botocore's own SigV4 signer (S3SigV4Auth, the client's credentials, frozen at
    each call so refreshable ones refresh, and region) and the client's own HTTP session
    (URLLib3Session: the same urllib3 pools, TLS verification and CA bundle, proxies, connect and
    read timeouts, and the same exception types, which the retry loop classifies), the body read
    straight into the buffer. Path-style URL on the configured endpoint, as the client's.

    What it skips, measured per 4 MiB GET (in process, SeaweedFS on the same host): parameter
    validation, serialization, the event hooks, endpoint rules, response parsing, the (disabled)
    retry handler, ~1.1 ms of CPU per request. Error responses are parsed by botocore's own
    parser into the ClientError boto3 raises (so NotFound / retry / StoreError map as before);
    redirects and 400s (a region mismatch: boto3 follows it) go to boto3 (`_Unusual`).
    `for_client` returns None, and every GET goes through boto3, where anything is not as
    expected: no endpoint URL (AWS's own endpoint rules decide the URL there), no credentials,
    virtual-hosted addressing, or a botocore whose internals differ."""

    def __init__(self, client: Any, bucket: str, endpoint_url: str):
        self._http = client._endpoint.http_session
        self._creds = client._request_signer._credentials
        self._region = client.meta.region_name
        self._base = f"{endpoint_url.rstrip('/')}/{bucket}/"
        self._model = client.meta.service_model.operation_model("GetObject")
        self._parser = botocore.parsers.create_parser("rest-xml")
        self._ua = f"csi-perssd botocore/{botocore.__version__}"

    @classmethod
    def for_client(cls, client: Any, bucket: str, endpoint_url: str | None) -> _LeanGet | None:
        try:
            if (not endpoint_url or client._request_signer._credentials is None
                    or client._request_signer._signature_version not in ("s3v4", "v4")
                    or (client.meta.config.s3 or {}).get("addressing_style") != "path"
                    or not isinstance(client._endpoint.http_session, botocore.httpsession.URLLib3Session)):
                return None
            return cls(client, bucket, endpoint_url)
        except (AttributeError, TypeError, KeyError):      # another botocore: boto3 it is
            return None

    def get(self, key: str, buf: memoryview) -> tuple[bytes | memoryview, str]:
        """GET the full key `key` (prefix included): into `buf` when the body fits, else as
        bytes. Raises as boto3's get_object would (ClientError, botocore's connection errors);
        ConnectionError for a body shorter than its Content-Length."""
        req = botocore.awsrequest.AWSRequest(method="GET", url=self._base + urllib.parse.quote(key, safe="/~"),
                                             headers={"User-Agent": self._ua})
        botocore.auth.S3SigV4Auth(self._creds.get_frozen_credentials(), "s3", self._region).add_auth(req)
        prepared = req.prepare()
        prepared.stream_output = True
        raw = self._http.send(prepared).raw            # urllib3.response.HTTPResponse, body unread
        done = False
        try:
            if raw.status != 200:
                body = raw.read()
                if raw.status in (301, 302, 307, 308, 400):
                    raise _Unusual(raw.status)
                parsed = self._parser.parse({"status_code": raw.status, "headers": raw.headers, "body": body},
                                            self._model.output_shape)
                done = True
                raise botocore.exceptions.ClientError(parsed, "GetObject")
            etag = _etag(raw.headers.get("ETag"))
            length = raw.headers.get("Content-Length")
            size = int(length) if length is not None and length.isdigit() else -1
            data: bytes | memoryview
            if 0 <= size <= len(buf) and _readinto_raw(raw, buf[:size]):
                data = buf[:size]
            else:
                try:
                    data = raw.read()
                except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as e:
                    raise ConnectionError(f"GET body cut off: {e}") from e
                if size >= 0 and len(data) != size:
                    raise ConnectionError(f"GET body cut off after {len(data)} of {size} bytes")
            done = True
            return data, etag
        finally:
            if not done:                # the connection is in an unknown state: not reused
                raw.close()
            raw.release_conn()


def _no_expect_continue(model: Any, params: dict[str, Any], **kwargs: Any) -> None:
    if getattr(model, "name", "") == "PutObject":
        params.get("headers", {}).pop("Expect", None)


_SESSION_LOCK = threading.Lock()
_SESSION: list[boto3.session.Session] = []


def _shared_session() -> boto3.session.Session:
    """One boto3 session for every store of the process. A session loads botocore's service
    models on its first client (it lists every service's data directory: thousands of stat calls,
    over a minute on a slow root file system such as the test VM's 9p); a session per store paid
    that for each store, and the node's first heartbeat timed out behind it. Call under
    _SESSION_LOCK."""
    if not _SESSION:
        _SESSION.append(boto3.session.Session())
    return _SESSION[0]


def warm() -> None:
    """Pay the shared session's first-client cost (loading botocore's S3 model) now, ahead of the
    first store: a client with placeholder credentials, never used (no request is made)."""
    with _SESSION_LOCK:
        _shared_session().client("s3", region_name="us-east-1", aws_access_key_id="warm",
                                 aws_secret_access_key="warm")


class S3Store:
    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None,
                 ca_bundle: str | None = None, max_pool_connections: int = 32,
                 retries: Retry | int | None = None, list_page_size: int = 1000,
                 sign_payload: bool | None = None):
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = endpoint_url or None
        self.retry = Retry(attempts=retries) if isinstance(retries, int) else (retries or Retry())
        self.list_page_size = max(1, min(1000, list_page_size))
        self.stats = StoreStats()
        def client(payload_signing: bool | None) -> Any:
            cfg = botocore.config.Config(
                retries={"total_max_attempts": 1, "mode": "standard"},  # our own loop retries
                max_pool_connections=max_pool_connections,
                connect_timeout=self.retry.connect_timeout_s,
                read_timeout=self.retry.read_timeout_s,
                s3={"addressing_style": "path", "payload_signing_enabled": payload_signing},
                signature_version="s3v4",
                # CRC32 on every PUT: without a body checksum SeaweedFS stores a PUT whose body was
                # cut off (connection lost after "100 Continue") as an empty object
                request_checksum_calculation="when_supported",
                response_checksum_validation="when_required",
            )
            with _SESSION_LOCK:     # a boto3 session is not thread-safe; its clients are
                return _shared_session().client(
                    "s3", endpoint_url=self.endpoint_url, region_name=region or "us-east-1",
                    aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None,
                    verify=ca_bundle if ca_bundle else None, config=cfg)

        self._client = client(sign_payload)
        # the hydrate's chunk GETs (get_into) skip boto3's per-call machinery (see _LeanGet);
        # PERSSD_S3_LEAN_GET=0 sends them through boto3 too (an escape hatch, and the bench's A/B)
        self._lean: _LeanGet | None = (_LeanGet.for_client(self._client, self.bucket, self.endpoint_url)
                                       if os.environ.get("PERSSD_S3_LEAN_GET", "1") != "0" else None)
        # chunk bodies: SigV4 would SHA-256 every byte (botocore always does over http) on top of
        # the CRC32 the server checks; a chunk's content is its BLAKE3 name, verified on every
        # read, so its PUTs go unsigned unless sign_payload=True. Records stay signed. That
        # client is made at the first chunk PUT: a store that only reads (the lazy hydration
        # server, a hydrate) does not pay for a second client (~0.1-0.2 s of CPU).
        self._unsigned: Any = self._client if sign_payload is not None else None
        self._unsigned_mu = threading.Lock()
        self._make_unsigned = functools.partial(client, False)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint_url!r})"

    @property
    def _chunk_client(self) -> Any:
        """The client chunk PUTs go through (unsigned payload), made at the first use."""
        if self._unsigned is None:
            with self._unsigned_mu:
                if self._unsigned is None:
                    c = self._make_unsigned()
                    # chunk PUTs send their body at once: with "Expect: 100-continue" (botocore
                    # adds it to every PUT of a file-like body) each waited for the server's
                    # interim answer before the first body byte, a round trip per 4 MiB chunk (11%
                    # of a flush's samples in wait_for_read). The body's CRC32 still guards
                    # against a cut-off body; records keep the header (a refused conditional
                    # write then costs no body)
                    c.meta.events.register_last("before-call.s3", _no_expect_continue)
                    self._unsigned = c
        return self._unsigned

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- the retry loop ---------------------------------------------------------------------
    def _call(self, op: str, key: str, fn: Callable[[], T], *, up: int = 0) -> T:
        """Run fn with retries. ClientErrors that are not retryable are re-raised as they are;
        the loop ends in StoreError when the budget runs out."""
        start = time.monotonic()
        attempt = 0
        while True:
            self.stats.count(op, up=up)
            try:
                return fn()
            except Exception as e:      # noqa: BLE001 - classified right below
                if not _retryable(e):
                    if isinstance(e, botocore.exceptions.ClientError):
                        raise
                    if isinstance(e, botocore.exceptions.BotoCoreError):
                        self.stats.add(errors=1, op=op)
                        raise StoreError(f"{op} {self.url}/{key}: {_describe(e)}") from e
                    raise
                self.stats.add(errors=1, op=op)
                attempt += 1
                elapsed = time.monotonic() - start
                if attempt >= self.retry.attempts or elapsed >= self.retry.deadline_s:
                    raise StoreError(f"{op} {self.url}/{key} failed after {attempt} attempts "
                                     f"in {elapsed:.1f}s: {_describe(e)}") from e
                pause = min(self.retry.delay(attempt - 1),
                            max(0.0, self.retry.deadline_s - elapsed))
                log.debug("%s %s: %s, retry %d in %.2fs", op, key, _describe(e), attempt, pause)
                self.stats.add(retries=1)
                time.sleep(pause)

    def _fail(self, op: str, key: str, e: botocore.exceptions.ClientError) -> StoreError:
        self.stats.add(errors=1, op=op)
        return StoreError(f"{op} {self.url}/{key}: {_describe(e)}")

    # -- ObjectStore ------------------------------------------------------------------------
    def get(self, key: str) -> tuple[bytes, str]:
        data, etag = self._get(key, None)
        assert isinstance(data, bytes)      # no buffer: the body as read
        return data, etag

    def get_into(self, key: str, buf: memoryview) -> tuple[bytes | memoryview, str]:
        """get() with the body read straight from the socket into `buf` when it fits (see
        _read_body_into): no 4 MiB bytes object per chunk (its allocation page-faulted every
        4 KiB of it: ~60,000 faults per 256 MiB hydrate) and no copy into the O_DIRECT buffer."""
        return self._get(key, buf)

    def _get(self, key: str, buf: memoryview | None) -> tuple[bytes | memoryview, str]:
        """GET `key`: into `buf` when given and the body fits, else as bytes."""
        k = self._key(key)

        def once() -> tuple[bytes | memoryview, str]:
            lean = self._lean
            if lean is not None and buf is not None:
                try:
                    got = lean.get(k, buf)
                    self.stats.add(down=len(got[0]))
                    return got
                except _Unusual:
                    self._lean = None                   # from now on boto3 (its redirects, its errors)
                    self.stats.count("get")             # this attempt's second request
            r = self._client.get_object(Bucket=self.bucket, Key=k)
            body = r["Body"]
            try:
                data: bytes | memoryview
                size = int(r.get("ContentLength", -1)) if buf is not None else -1
                if buf is not None and 0 <= size <= len(buf) and _read_body_into(body, buf[:size]):
                    data = buf[:size]
                else:
                    data = body.read()
            finally:
                body.close()
            self.stats.add(down=len(data))
            return data, _etag(r.get("ETag"))

        try:
            return self._call("get", key, once)
        except botocore.exceptions.ClientError as e:
            if _code(e) != "NoSuchBucket" and (_status(e) == 404 or _code(e) == "NoSuchKey"):
                raise NotFound(key) from None
            raise self._fail("get", key, e) from e

    def head(self, key: str) -> ObjectInfo | None:
        k = self._key(key)
        try:
            r = self._call("head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=k))
        except botocore.exceptions.ClientError as e:
            if _status(e) == 404 or _code(e) in ("NoSuchKey", "NotFound", "404"):
                return None
            raise self._fail("head", key, e) from e
        mtime = r.get("LastModified")
        return ObjectInfo(key=key, size=int(r.get("ContentLength", 0)), etag=_etag(r.get("ETag")),
                          mtime=mtime.timestamp() if mtime else 0.0)

    def put(self, key: str, data: bytes | bytearray, *, if_none_match: bool = False,
            if_match: str | None = None) -> str:
        if if_none_match and if_match is not None:
            raise ValueError("if_none_match and if_match are exclusive")
        k = self._key(key)
        # the body's CRC32, computed here: zlib releases the GIL on large buffers (botocore's
        # own pass goes through binascii 1 MiB at a time and holds it: 19% of a flush's samples)
        crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        kw: dict[str, Any] = {"Bucket": self.bucket, "Key": k, "Body": data, "ChecksumCRC32": crc}
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        if if_match is not None:
            if not if_match or not re.fullmatch(r'"?[A-Za-z0-9-]+"?', if_match):
                raise PreconditionFailed(f"{key}: invalid etag {if_match[:40]!r}")
            kw["IfMatch"] = f'"{_etag(if_match)}"'
        conditional = if_none_match or if_match is not None
        tries = 0

        cl = self._chunk_client if key.startswith("chunks/") else self._client

        def once() -> str:
            nonlocal tries
            tries += 1
            try:
                return _etag(cl.put_object(**kw).get("ETag"))
            except botocore.exceptions.ClientError as e:
                if conditional and (_status(e) in (409, 412) or _code(e) in _PRECONDITION):
                    raise _Precondition(tries) from e       # 409: a concurrent conditional write
                if (if_match is not None and _code(e) != "NoSuchBucket"
                        and (_status(e) == 404 or _code(e) == "NoSuchKey")):
                    raise _Precondition(tries) from e       # AWS: If-Match on a missing key
                raise

        try:
            return self._call("put", key, once, up=len(data))
        except _Precondition as p:
            if p.args[0] > 1:
                # an earlier attempt may have landed before the connection broke: if the
                # object now holds exactly our bytes, that attempt won the condition
                info = self.head(key)
                md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
                if info is not None and info.etag == md5:
                    return info.etag
            raise PreconditionFailed(f"{key}: condition not met "
                                     f"({'exists' if if_none_match else 'etag changed'})") from None
        except botocore.exceptions.ClientError as e:
            raise self._fail("put", key, e) from e

    def delete(self, key: str) -> None:
        k = self._key(key)
        try:
            self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=k))
        except botocore.exceptions.ClientError as e:
            if _status(e) == 404 and _code(e) != "NoSuchBucket":
                return
            raise self._fail("delete", key, e) from e

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if not _LIST_PREFIX_RE.fullmatch(prefix) or ".." in prefix or prefix.startswith("/"):
            raise ValueError(f"refusing unsafe list prefix {prefix[:80]!r}")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        if self.prefix and not prefix:
            full = self.prefix + "/"
        # Some servers (SeaweedFS walks its directory tree: "a/x" before "a.json") do not list
        # in byte order, so the listing is collected and sorted before it is yielded: list
        # narrow prefixes (e.g. one chunks/<h0h1>/ shard at a time) for huge buckets.
        out = sorted(self._list_pages(prefix, full, strip), key=lambda o: o.key.encode())
        yield from out

    def scan(self, prefix: str, start_after: str = "") -> Iterator[ObjectInfo]:
        """Objects under prefix with keys after start_after, lazily (see scan_pages)."""
        for page, _ in self.scan_pages(prefix, start_after):
            yield from page

    def scan_pages(self, prefix: str, start_after: str = "", token: str = "") -> Iterator[tuple[Page, str]]:
        """(page, continuation token or "" at the end) of objects under prefix after start_after
        (or from an earlier page's token), lazily: one LIST per page of `list_page_size` keys,
        fetched only when the caller asks for it. In the server's order (byte order on S3;
        SeaweedFS lists "x.json" and "x/..." in an order of its own)."""
        if start_after and not start_after.startswith(prefix):
            raise ValueError("start_after must lie under the scanned prefix")
        if not _LIST_PREFIX_RE.fullmatch(prefix) or ".." in prefix or prefix.startswith("/"):
            raise ValueError(f"refusing unsafe list prefix {prefix[:80]!r}")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        after = f"{self.prefix}/{start_after}" if self.prefix and start_after else start_after
        yield from self._page_lists(prefix, full, strip, start_after=after, token=token)

    def _list_pages(self, prefix: str, full: str, strip: int) -> Iterator[ObjectInfo]:
        for page, _ in self._page_lists(prefix, full, strip):
            yield from page

    def _page_lists(self, prefix: str, full: str, strip: int, *,
                    start_after: str = "", token: str = "") -> Iterator[tuple[Page, str]]:
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, "MaxKeys": self.list_page_size}
            if token:
                kw["ContinuationToken"] = token
            elif start_after:
                kw["StartAfter"] = start_after
            try:
                page = self._call("list", prefix, functools.partial(self._client.list_objects_v2, **kw))
            except botocore.exceptions.ClientError as e:
                raise self._fail("list", prefix, e) from e
            got = [ObjectInfo(key=o["Key"][strip:], size=int(o.get("Size", 0)), etag=_etag(o.get("ETag")),
                              mtime=o["LastModified"].timestamp() if o.get("LastModified") else 0.0)
                   for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken") or ""
            if not page.get("IsTruncated"):
                token = ""
            yield got, token
            if not token:
                return

    def create_bucket(self) -> None:
        """Create the bucket if missing (test servers and demos; production buckets exist)."""
        def once() -> None:
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as e:
                if _code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        try:
            self._call("create_bucket", "", once)
        except botocore.exceptions.ClientError as e:
            raise self._fail("create_bucket", "", e) from e


# -- building stores ------------------------------------------------------------------------
_ca_lock = threading.Lock()
_ca_dir: str | None = None


def _ca_file(pem: str) -> str:
    """Write PEM text (from a secret) to a private file; the same text reuses the same file."""
    global _ca_dir
    if "-----BEGIN CERTIFICATE-----" not in pem or len(pem) > 1 << 20:
        raise ValueError("caBundle is not a PEM certificate bundle")
    with _ca_lock:
        if _ca_dir is None:
            _ca_dir = tempfile.mkdtemp(prefix="perssd-ca-")      # mode 0700
            atexit.register(shutil.rmtree, _ca_dir, True)
        path = os.path.join(_ca_dir, hashlib.sha256(pem.encode()).hexdigest()[:32] + ".pem")
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(dir=_ca_dir)
            with os.fdopen(fd, "w") as f:
                f.write(pem)
            os.replace(tmp, path)
        return path


def _default(defaults: Any, name: str) -> str:
    """Read a default from a Config (attribute s3_<name>) or a dict (secret-style key)."""
    if defaults is None:
        return ""
    if isinstance(defaults, Mapping):
        return str(defaults.get(name) or "")
    attr = {"endpoint": "s3_endpoint", "region": "s3_region", "caBundle": "s3_ca_bundle",
            "accessKeyId": "s3_access_key", "secretAccessKey": "s3_secret_key"}[name]
    return str(getattr(defaults, attr, "") or "")


def settings(url: str, secrets: Mapping[str, str], defaults: Any = None) -> dict[str, Any]:
    """S3Store keyword arguments for `url` from CSI secrets (keys endpoint, region, accessKeyId,
    secretAccessKey, caBundle = PEM text) over the driver's defaults (a Config with s3_endpoint,
    s3_region, s3_ca_bundle = a file path, or a dict with the secret keys). Missing credentials
    fall back to boto3's chain (env, instance role). ValueError for unsafe or malformed values."""
    parse_s3_url(url)
    endpoint = secrets.get("endpoint") or _default(defaults, "endpoint")
    region = secrets.get("region") or _default(defaults, "region")
    access = secrets.get("accessKeyId") or _default(defaults, "accessKeyId")
    secret = secrets.get("secretAccessKey") or _default(defaults, "secretAccessKey")
    if endpoint and not _ENDPOINT_RE.fullmatch(endpoint):
        raise ValueError("S3 endpoint must be http(s)://host[:port]")
    if region and not _REGION_RE.fullmatch(region):
        raise ValueError("invalid S3 region")
    if bool(access) != bool(secret):
        raise ValueError("accessKeyId and secretAccessKey must be given together")
    ca: str | None = None
    if secrets.get("caBundle"):
        ca = _ca_file(secrets["caBundle"])
    elif _default(defaults, "caBundle"):
        ca = _default(defaults, "caBundle")
        if isinstance(defaults, Mapping) and "-----BEGIN" in ca:
            ca = _ca_file(ca)
    return {"endpoint_url": endpoint or None, "region": region or None, "access_key": access or None,
            "secret_key": secret or None, "ca_bundle": ca}


def from_config(url: str, secrets: Mapping[str, str] | None = None, defaults: Any = None,
                *, cache: bool = True, **opts: Any) -> ObjectStore:
    """The store for `url` (see `settings`), from the process's one store cache
    (`factory.STORES`) unless cache=False."""
    from .factory import STORES
    return STORES.open(url, secrets, defaults, cache=cache, **opts)


def open_store(url: str, **opts: Any) -> ObjectStore:
    """file:///DIR -> FileStore(DIR); s3://BUCKET/PREFIX -> S3Store(url, **opts)."""
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path.startswith("/"):
            raise ValueError(f"file:// store needs an absolute path: {url[:80]!r}")
        from .filestore import FileStore
        return FileStore(path)
    if url.startswith("s3://"):
        return S3Store(url, **opts)
    raise ValueError(f"unsupported store URL {url[:80]!r} (file:// or s3://)")
