"""ObjectStore contract, run against every implementation (S3 on SeaweedFS, FileStore), plus
S3-specific behaviour: URL/secret validation, retries, outage -> StoreError within the budget.

To add an implementation, append a factory to STORE_FACTORIES: (name, callable(request, tmp_path)).
"""
from __future__ import annotations

import os
import time

import pytest

from csi_perssd.remote import s3 as s3mod
from csi_perssd.remote.filestore import FileStore
from csi_perssd.remote.s3 import Retry, S3Store, from_config, open_store, parse_s3_url
from csi_perssd.remote.store import NotFound, ObjectStore, PreconditionFailed, StoreError
from tests.plugins.s3 import make_s3_store, seaweed_outage


def _s3(request: pytest.FixtureRequest, tmp_path, **opts) -> ObjectStore:
    return make_s3_store(request.getfixturevalue("seaweed"), **opts)


def _file(request: pytest.FixtureRequest, tmp_path, **opts) -> ObjectStore:
    return FileStore(str(tmp_path / "store"))


STORE_FACTORIES = [("s3", _s3), ("file", _file)]


@pytest.fixture(params=[pytest.param(f, id=f[0], marks=[pytest.mark.s3] if f[0] == "s3" else [])
                        for f in STORE_FACTORIES])
def any_store(request, tmp_path) -> ObjectStore:
    name, factory = request.param
    return factory(request, tmp_path)


# -- the contract ---------------------------------------------------------------------------
def test_is_an_object_store(any_store):
    assert isinstance(any_store, ObjectStore)


def test_put_get_roundtrip_returns_matching_etag(any_store):
    etag = any_store.put("volumes/pvol-1.json", b'{"a":1}')
    data, etag2 = any_store.get("volumes/pvol-1.json")
    assert data == b'{"a":1}' and etag and etag == etag2


def test_get_missing_raises_not_found(any_store):
    with pytest.raises(NotFound):
        any_store.get("volumes/missing.json")


def test_get_into_reads_into_the_buffer_when_it_fits_else_returns_bytes(any_store):
    body = os.urandom((1 << 20) + 3)
    etag = any_store.put("chunks/ab/x", body)
    buf = memoryview(bytearray(len(body) + 100))
    data, etag2 = any_store.get_into("chunks/ab/x", buf)
    assert isinstance(data, memoryview) and data.obj is buf.obj and len(data) == len(body)
    assert bytes(data) == body and bytes(buf[:len(body)]) == body and etag2 == etag
    small = memoryview(bytearray(1000))
    data, etag3 = any_store.get_into("chunks/ab/x", small)
    assert isinstance(data, bytes) and data == body and etag3 == etag
    assert bytes(small) == bytes(1000)                  # nothing was written into it
    any_store.put("empty", b"")
    assert bytes(any_store.get_into("empty", buf)[0]) == b""
    with pytest.raises(NotFound):
        any_store.get_into("chunks/ab/missing", buf)


def test_head_reports_size_and_etag_and_none_when_missing(any_store):
    etag = any_store.put("a/b", b"12345")
    info = any_store.head("a/b")
    assert info is not None and info.key == "a/b" and info.size == 5 and info.etag == etag
    assert info.mtime > time.time() - 3600
    assert any_store.head("a/c") is None


def test_overwrite_changes_etag(any_store):
    e1 = any_store.put("k", b"one")
    e2 = any_store.put("k", b"two")
    assert e1 != e2 and any_store.get("k") == (b"two", e2)


def test_delete_and_delete_missing(any_store):
    any_store.put("x/y", b"1")
    any_store.delete("x/y")
    assert any_store.head("x/y") is None
    any_store.delete("x/y")     # missing is fine


def test_conditional_create_twice_fails(any_store):
    any_store.put("names/n1", b"v1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        any_store.put("names/n1", b"v2", if_none_match=True)
    assert any_store.get("names/n1")[0] == b"v1"


def test_if_match_current_etag_replaces(any_store):
    e1 = any_store.put("rec", b"v1")
    e2 = any_store.put("rec", b"v2", if_match=e1)
    assert any_store.get("rec") == (b"v2", e2)


def test_if_match_stale_etag_fails(any_store):
    e1 = any_store.put("rec", b"v1")
    any_store.put("rec", b"v2", if_match=e1)
    with pytest.raises(PreconditionFailed):
        any_store.put("rec", b"v3", if_match=e1)
    assert any_store.get("rec")[0] == b"v2"


def test_if_match_on_missing_key_fails(any_store):
    with pytest.raises(PreconditionFailed):
        any_store.put("rec-missing", b"v", if_match="0123456789abcdef0123456789abcdef")
    assert any_store.head("rec-missing") is None


def test_list_by_prefix_in_key_order(any_store):
    keys = ["volumes/b.json", "volumes/a.json", "volumes/a/gen/1.manifest", "nodes/n1.json"]
    for k in keys:
        any_store.put(k, k.encode())
    got = [o.key for o in any_store.list("volumes/")]
    assert got == sorted(k for k in keys if k.startswith("volumes/"))
    assert {o.key: o.size for o in any_store.list("nodes/")} == {"nodes/n1.json": 13}
    assert list(any_store.list("nothing/")) == []


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/../b", "", "a/./b",
                                 "a b", "a\nb", "x" * 1000])
def test_unsafe_keys_rejected(any_store, key):
    with pytest.raises(ValueError):
        any_store.put(key, b"x")
    with pytest.raises(ValueError):
        any_store.get(key)


# -- S3 only --------------------------------------------------------------------------------
@pytest.mark.s3
def test_list_paginates(seaweed):
    store = make_s3_store(seaweed, list_page_size=2)
    for i in range(7):
        store.put(f"p/{i:02d}", b"x")
    store.put("q/0", b"x")
    before = store.stats.snapshot()["requests"].get("list", 0)
    assert [o.key for o in store.list("p/")] == [f"p/{i:02d}" for i in range(7)]
    assert store.stats.snapshot()["requests"]["list"] - before == 4
    assert [o.key for o in store.list("")] == [f"p/{i:02d}" for i in range(7)] + ["q/0"]


@pytest.mark.s3
def test_prefixes_are_isolated(seaweed):
    a, b = make_s3_store(seaweed, "iso-a"), make_s3_store(seaweed, "iso-a2")
    a.put("k", b"a")
    assert b.head("k") is None and list(b.list("")) == []
    assert [o.key for o in a.list("")] == ["k"]


@pytest.mark.s3
def test_stats_count_requests_and_bytes(s3_store):
    s3_store.put("s/1", b"x" * 1000)
    s3_store.get("s/1")
    s3_store.head("s/1")
    snap = s3_store.stats.snapshot()
    assert snap["requests"]["put"] == 1 and snap["requests"]["get"] == 1
    assert snap["bytes_up"] == 1000 and snap["bytes_down"] == 1000


@pytest.mark.s3
def test_wrong_credentials_is_store_error_without_secret(seaweed):
    store = S3Store(seaweed.url("bad"), endpoint_url=seaweed.endpoint, access_key="AKWRONG",
                    secret_key="very-secret-value", retries=Retry(attempts=2, base_s=0.01))
    with pytest.raises(StoreError) as ei:
        store.put("k", b"x")
    assert not isinstance(ei.value, (NotFound, PreconditionFailed))
    assert "very-secret-value" not in str(ei.value) and "very-secret-value" not in repr(store)


@pytest.mark.s3
def test_outage_raises_store_error_within_budget_and_recovers(seaweed):
    budget = Retry(attempts=4, base_s=0.05, cap_s=0.3, deadline_s=3.0, connect_timeout_s=0.5,
                   read_timeout_s=2.0)
    store = make_s3_store(seaweed, retries=budget)
    store.put("before", b"1")
    with seaweed_outage(seaweed):
        r0, e0 = store.stats.retries, store.stats.errors
        with pytest.raises(StoreError) as ei:
            store.put("during", b"2")
        # the budget ended the call: exactly `attempts` tries, so it cannot hang on the outage
        assert "failed after 4 attempts" in str(ei.value), ei.value
        assert (store.stats.retries - r0, store.stats.errors - e0) == (3, 4)
        assert not isinstance(ei.value, PreconditionFailed)
        with pytest.raises(StoreError):
            store.get("before")
        assert store.stats.retries >= 3
    assert store.get("before")[0] == b"1"          # data survived the restart
    store.put("after", b"3")


def test_parse_s3_url():
    assert parse_s3_url("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert parse_s3_url("s3://my-bucket") == ("my-bucket", "")
    for bad in ["s3://../x", "s3://Bucket/x", "s3://b/x", "s3://bucket/../x", "s3://bucket//x",
                "s3://bucket/a/../../x", "s3://bucket/.hidden", "http://bucket/x",
                "s3://bucket/a b", "s3://bu..cket/x", "s3://bucket/%2e%2e"]:
        with pytest.raises(ValueError):
            parse_s3_url(bad)


def test_from_config_validates_secrets():
    url = "s3://bucket/prefix"
    for secrets in [{"endpoint": "ftp://x"}, {"endpoint": "http://h/../x"},
                    {"region": "us east"}, {"accessKeyId": "a"},
                    {"caBundle": "not a pem"}]:
        with pytest.raises(ValueError):
            from_config(url, secrets, cache=False)
    with pytest.raises(ValueError):
        from_config("s3://bucket/../other", {})


def test_from_config_secrets_override_defaults_and_cache(tmp_path):
    pem = ("-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n")
    s = from_config("s3://bucket/p", {"endpoint": "http://127.0.0.1:1", "accessKeyId": "A",
                                      "secretAccessKey": "S", "caBundle": pem},
                    {"endpoint": "http://127.0.0.1:2", "region": "eu-west-1"})
    assert isinstance(s, S3Store) and s.endpoint_url == "http://127.0.0.1:1"
    assert s.prefix == "p" and s.bucket == "bucket"
    ca = s3mod._ca_file(pem)
    assert open(ca).read() == pem and os.stat(ca).st_mode & 0o077 == 0
    assert os.stat(os.path.dirname(ca)).st_mode & 0o077 == 0
    assert from_config("s3://bucket/p", {"endpoint": "http://127.0.0.1:1", "accessKeyId": "A",
                                         "secretAccessKey": "S", "caBundle": pem},
                       {"endpoint": "http://127.0.0.1:2", "region": "eu-west-1"}) is s
    d = from_config("s3://bucket/p", {}, {"endpoint": "http://127.0.0.1:2"}, cache=False)
    assert d.endpoint_url == "http://127.0.0.1:2"


def test_open_store_dispatch(tmp_path):
    assert isinstance(open_store("s3://bucket/x", endpoint_url="http://127.0.0.1:1"), S3Store)
    with pytest.raises(ValueError):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError):
        open_store("file://relative/dir")
    fs = open_store(f"file://{tmp_path}/st")
    assert isinstance(fs, FileStore)
    fs.put("k", b"v")
    assert fs.get("k")[0] == b"v"


# -- ambiguous failures: a real TCP proxy that swallows one response ---------------------------
def _shut(s) -> None:
    import socket
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


class DroppingProxy:
    """Forwards 127.0.0.1:port to the S3 server; after drop_next_response() the next response
    from the server is swallowed and the client connection closed (the request did happen)."""

    def __init__(self, upstream_port: int):
        import socket
        import threading
        self.upstream = upstream_port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.drop = threading.Event()
        self.cut = threading.Event()
        self.drop_continue = threading.Event()
        self.cut_response = threading.Event()
        self.cut_every = threading.Event()     # cut_response for every response while set
        self.canned: list[bytes] = []           # answer the next requests with these, not the server
        self.dropped = 0
        self.conns: list = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        import socket
        import threading
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.upstream))
            self.conns += [c, u]
            for src, dst, resp in ((c, u, False), (u, c, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, resp), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src, dst, is_response: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if not is_response and self.canned and data[:4] == b"GET ":
                    src.sendall(self.canned.pop(0))     # the request never reaches the server
                    continue
                if is_response and data.startswith(b"HTTP/1.1 100 "):
                    if self.drop_continue.is_set():     # hang up before the body is sent
                        self.drop_continue.clear()
                        self.dropped += 1
                        break
                    dst.sendall(data)       # interim "100 Continue": not the response
                    continue
                if (not is_response and self.cut.is_set() and len(data) > 64
                        and not data[:8].split(b" ")[0].isalpha()):     # body bytes, not headers
                    self.cut.clear()        # forward a part of the request, then hang up
                    dst.sendall(data[:len(data) // 2])
                    self.dropped += 1
                    break
                if (is_response and (self.cut_response.is_set() or self.cut_every.is_set())
                        and not data.startswith(b"HTTP/")):
                    self.cut_response.clear()   # a part of a response body, then hang up
                    dst.sendall(data[:len(data) // 2])
                    self.dropped += 1
                    break
                if is_response and self.drop.is_set():
                    self.drop.clear()
                    self.dropped += 1
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            _shut(s)

    def close(self) -> None:
        import socket
        self.lsock.shutdown(socket.SHUT_RDWR)
        self.lsock.close()
        for s in self.conns:
            _shut(s)
        for t in self.threads:
            t.join(5)


@pytest.fixture
def proxied_store(seaweed):
    proxy = DroppingProxy(seaweed.ports["s3.port"])
    store = S3Store(seaweed.url(f"px-{os.urandom(4).hex()}"),
                    endpoint_url=f"http://127.0.0.1:{proxy.port}", access_key=seaweed.access_key,
                    secret_key=seaweed.secret_key, retries=Retry(attempts=4, base_s=0.01))
    yield store, proxy
    proxy.close()


@pytest.mark.s3
def test_conditional_create_whose_response_was_lost_still_succeeds(proxied_store):
    store, proxy = proxied_store
    store.put("warm", b"x")
    proxy.drop.set()
    etag = store.put("names/lost", b"mine", if_none_match=True)
    assert proxy.dropped == 1 and store.stats.retries >= 1
    assert store.get("names/lost") == (b"mine", etag)
    with pytest.raises(PreconditionFailed):              # a real second create still loses
        store.put("names/lost", b"other", if_none_match=True)


@pytest.mark.s3
def test_if_match_whose_response_was_lost_still_succeeds(proxied_store):
    store, proxy = proxied_store
    e1 = store.put("rec", b"v1")
    proxy.drop.set()
    e2 = store.put("rec", b"v2", if_match=e1)
    assert proxy.dropped == 1 and store.get("rec") == (b"v2", e2)
    with pytest.raises(PreconditionFailed):
        store.put("rec", b"v3", if_match=e1)


@pytest.mark.s3
def test_put_cut_off_midway_leaves_no_truncated_object(proxied_store):
    store, proxy = proxied_store
    store.put("warm", b"x")
    body = os.urandom(3 << 20)
    proxy.cut.set()
    assert store.put("chunk", body) and proxy.dropped == 1
    assert store.get("chunk")[0] == body
    proxy.cut.set()
    store.put("names/cut", body, if_none_match=True)
    assert store.get("names/cut")[0] == body


@pytest.mark.s3
def test_put_lost_before_its_body_leaves_no_empty_object(proxied_store):
    # without a body checksum SeaweedFS keeps such a PUT as an empty object, and the retried
    # If-None-Match create then fails against it
    store, proxy = proxied_store
    store.put("warm", b"x")
    proxy.drop_continue.set()
    store.put("names/early", b"mine", if_none_match=True)
    assert proxy.dropped == 1 and store.get("names/early")[0] == b"mine"


@pytest.mark.s3
def test_chunk_puts_send_their_body_without_waiting_for_100_continue(proxied_store):
    # records keep "Expect: 100-continue" (the proxy hangs up at the server's interim answer);
    # chunk PUTs send the body at once, so the server never sends one
    store, proxy = proxied_store
    store.put("warm", b"x")
    body = os.urandom(3 << 20)
    key = "chunks/ef/" + "e" * 64
    proxy.drop_continue.set()
    store.put(key, body)
    assert proxy.dropped == 0 and store.get(key)[0] == body
    store.put("names/rec", body)
    assert proxy.dropped == 1 and store.get("names/rec")[0] == body


@pytest.mark.s3
def test_get_retries_after_a_dropped_response(proxied_store):
    store, proxy = proxied_store
    store.put("g", b"data" * 1000)
    proxy.drop.set()
    assert store.get("g")[0] == b"data" * 1000 and proxy.dropped == 1


@pytest.mark.s3
def test_get_into_retries_a_body_cut_off_midway_and_reuses_connections(proxied_store):
    store, proxy = proxied_store
    body = os.urandom(3 << 20)
    store.put("chunks/cd/g", body)
    buf = memoryview(bytearray(4 << 20))
    proxy.cut_response.set()
    data, _ = store.get_into("chunks/cd/g", buf)
    assert bytes(data) == body and proxy.dropped == 1 and store.stats.retries == 1
    opened = len(proxy.conns)
    for _ in range(5):                  # read to its end, each body gives its connection back
        assert bytes(store.get_into("chunks/cd/g", buf)[0]) == body
    assert len(proxy.conns) == opened   # (2 sockets per connection: no new one)


def _canned(status: str, code: str = "", close: bool = False) -> bytes:
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>test</Message>'
            f'<Resource>/x</Resource><RequestId>1</RequestId></Error>').encode() if code else b""
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n").encode() + body


def _boto_gets(store: S3Store) -> list[str]:
    """Names of the GetObject calls that go through boto3 (the lean GET makes none)."""
    calls: list[str] = []
    store._client.meta.events.register("before-call.s3.GetObject", lambda **kw: calls.append("get"))
    return calls


@pytest.mark.s3
def test_get_into_takes_the_lean_path_and_counts_like_boto3(s3_store):
    """A chunk GET into a buffer makes no boto3 call; the same GETs through boto3 (the lean
    path off) give the same data, ETag and exactly the same stats (requests, errors, bytes)."""
    body = os.urandom((2 << 20) + 5)
    etag = s3_store.put("chunks/aa/lean", body)
    twin = S3Store(s3_store.url, endpoint_url=s3_store.endpoint_url, access_key="x", secret_key="y")
    twin._client, twin._lean = s3_store._client, None       # same bucket, same client: boto3 only
    calls = _boto_gets(s3_store)
    buf = memoryview(bytearray(4 << 20))
    seen = []
    for st in (s3_store, twin):
        before = st.stats.snapshot()
        data, got = st.get_into("chunks/aa/lean", buf)
        assert isinstance(data, memoryview) and data.obj is buf.obj and bytes(data) == body and got == etag
        small = st.get_into("chunks/aa/lean", memoryview(bytearray(10)))   # does not fit: bytes
        assert small == (body, etag)
        with pytest.raises(NotFound):
            st.get_into("chunks/aa/missing", buf)
        after = st.stats.snapshot()
        seen.append({k: (after[k] if not isinstance(after[k], int) else after[k] - before[k])
                     for k in ("total_requests", "errors", "retries", "bytes_down", "errors_by_op")})
    assert calls == ["get"] * 3         # all three from the twin, none from the lean store
    assert seen[0] == seen[1] == {"total_requests": 3, "errors": 0, "retries": 0,
                                  "bytes_down": 2 * len(body), "errors_by_op": {}}


@pytest.mark.s3
def test_lean_get_of_a_missing_bucket_is_a_store_error(seaweed):
    store = S3Store("s3://no-such-bucket-perssd/x", endpoint_url=seaweed.endpoint,
                    access_key=seaweed.access_key, secret_key=seaweed.secret_key,
                    retries=Retry(attempts=2, base_s=0.01))
    assert store._lean is not None
    with pytest.raises(StoreError) as ei:
        store.get_into("chunks/ab/x", memoryview(bytearray(100)))
    assert type(ei.value) is StoreError and "NoSuchBucket" in str(ei.value)


@pytest.mark.s3
def test_lean_get_signs_with_the_stores_credentials(seaweed):
    store = S3Store(seaweed.url("lean-auth"), endpoint_url=seaweed.endpoint,
                    access_key=seaweed.access_key, secret_key="not-the-secret",
                    retries=Retry(attempts=2, base_s=0.01))
    with pytest.raises(StoreError) as ei:
        store.get_into("chunks/ab/x", memoryview(bytearray(100)))
    assert "HTTP 403" in str(ei.value) and store.stats.retries == 0


@pytest.mark.s3
def test_lean_get_retries_a_5xx_and_a_dropped_response(proxied_store):
    store, proxy = proxied_store
    body = os.urandom(1 << 20)
    store.put("chunks/cd/r", body)
    calls = _boto_gets(store)
    buf = memoryview(bytearray(2 << 20))
    proxy.canned.append(_canned("503 Service Unavailable", "SlowDown"))
    assert bytes(store.get_into("chunks/cd/r", buf)[0]) == body
    assert (store.stats.requests["get"], store.stats.errors, store.stats.retries) == (2, 1, 1)
    proxy.drop.set()
    assert bytes(store.get_into("chunks/cd/r", buf)[0]) == body and proxy.dropped == 1
    assert (store.stats.requests["get"], store.stats.errors, store.stats.retries) == (4, 2, 2)
    assert store.stats.bytes_down == 2 * len(body) and calls == []


@pytest.mark.s3
def test_lean_get_body_always_cut_short_is_a_store_error(proxied_store):
    store, proxy = proxied_store
    body = os.urandom(3 << 20)
    store.put("chunks/cd/short", body)
    buf = memoryview(bytearray(4 << 20))
    proxy.cut_every.set()
    with pytest.raises(StoreError) as ei:
        store.get_into("chunks/cd/short", buf)
    assert "cut off" in str(ei.value) and "4 attempts" in str(ei.value)
    assert (store.stats.requests["get"], store.stats.errors, store.stats.retries) == (4, 4, 3)
    assert store.stats.bytes_down == 0
    proxy.cut_every.clear()
    assert bytes(store.get_into("chunks/cd/short", buf)[0]) == body


@pytest.mark.s3
def test_lean_get_leaves_a_redirect_to_boto3_from_then_on(proxied_store):
    store, proxy = proxied_store
    store.put("chunks/cd/moved", b"payload")
    calls = _boto_gets(store)
    buf = memoryview(bytearray(100))
    proxy.canned.append(_canned("400 Bad Request", "AuthorizationHeaderMalformed"))
    assert bytes(store.get_into("chunks/cd/moved", buf)[0]) == b"payload"
    assert calls == ["get"] and store._lean is None
    assert (store.stats.requests["get"], store.stats.errors, store.stats.retries) == (2, 0, 0)


@pytest.mark.s3
def test_lean_get_logs_no_credentials(proxied_store, caplog, seaweed):
    import logging
    store, proxy = proxied_store
    store.put("chunks/cd/log", b"x" * 100)
    caplog.set_level(logging.DEBUG)
    proxy.canned.append(_canned("500 Internal Server Error", "InternalError"))
    assert bytes(store.get_into("chunks/cd/log", memoryview(bytearray(200)))[0]) == b"x" * 100
    assert store.stats.retries == 1 and caplog.records
    assert seaweed.secret_key not in caplog.text and "Signature=" not in caplog.text


def test_lean_get_only_with_an_endpoint_path_style_and_the_clients_own_http_session(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    st = S3Store("s3://bkt/p", endpoint_url="https://s3.example:9000", access_key="a", secret_key="b",
                 ca_bundle=str(pem))
    assert st._lean is not None and st._lean._http is st._client._endpoint.http_session
    assert st._lean._http._verify == str(pem) and st._lean._base == "https://s3.example:9000/bkt/"
    assert S3Store("s3://bkt/p", access_key="a", secret_key="b")._lean is None     # AWS: its endpoint rules


@pytest.mark.s3
def test_missing_bucket_is_a_store_error_not_a_lost_race(seaweed):
    store = S3Store("s3://no-such-bucket-perssd/x", endpoint_url=seaweed.endpoint,
                    access_key=seaweed.access_key, secret_key=seaweed.secret_key,
                    retries=Retry(attempts=2, base_s=0.01))
    # (SeaweedFS checks If-Match before the bucket: a conditional put answers 412 there)
    for call in (lambda: store.put("k", b"v"), lambda: store.get("k"),
                 lambda: list(store.list(""))):
        with pytest.raises(StoreError) as ei:
            call()
        assert type(ei.value) is StoreError


@pytest.mark.s3
@pytest.mark.parametrize("sign, chunk_header", [(None, "UNSIGNED-PAYLOAD"), (True, "sha256")])
def test_chunk_puts_go_unsigned_records_stay_signed(seaweed, sign, chunk_header):
    """Chunk bodies are not SHA-256 signed by default (BLAKE3-named, verified on read; the server
    still checks their CRC32); records are; sign_payload=True signs everything."""
    store = make_s3_store(seaweed, sign_payload=sign)
    seen: dict[str, str] = {}

    def grab(request, **_):         # noqa: ANN001 - botocore event signature
        seen[request.url.rsplit("/", 2)[-2]] = request.headers.get("x-amz-content-sha256", b"").decode()
        assert request.headers.get("x-amz-checksum-crc32"), "every PUT carries a CRC32"

    for client in {id(c): c for c in (store._client, store._chunk_client)}.values():
        client.meta.events.register("before-send.s3.PutObject", grab)
    h = "ab" * 32
    store.put(f"chunks/ab/{h}", b"\x00chunk body")
    store.put("volumes/rec.json", b"{}")
    assert store.get(f"chunks/ab/{h}")[0] == b"\x00chunk body"
    want_chunk = (lambda v: v == "UNSIGNED-PAYLOAD") if chunk_header == "UNSIGNED-PAYLOAD" \
        else (lambda v: len(v) == 64 and v != "UNSIGNED-PAYLOAD")
    assert want_chunk(seen["ab"]), seen
    assert len(seen["volumes"]) == 64, f"record PUT not signed: {seen}"


@pytest.mark.s3
def test_put_sends_its_own_crc32_and_the_server_rejects_a_wrong_one(seaweed):
    """The CRC32 is computed by S3Store (zlib, off the GIL) and sent with every PUT; SeaweedFS
    refuses a body that does not match it, so a PUT cut short or damaged is never stored."""
    import base64
    import zlib

    import botocore.exceptions

    store = make_s3_store(seaweed)
    sent: list[str] = []
    store._chunk_client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(request.headers["x-amz-checksum-crc32"]))
    body = b"\x00" + bytes(range(256)) * 64
    h = "cd" * 32
    store.put(f"chunks/cd/{h}", body)
    want = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    assert [s.decode() if isinstance(s, bytes) else s for s in sent] == [want]
    wrong = base64.b64encode(zlib.crc32(body + b"x").to_bytes(4, "big")).decode()
    with pytest.raises(botocore.exceptions.ClientError):
        store._chunk_client.put_object(Bucket=store.bucket, Key=store._key(f"chunks/cd/{'ef' * 32}"),
                                       Body=body, ChecksumCRC32=wrong)
    assert store.head(f"chunks/cd/{'ef' * 32}") is None
