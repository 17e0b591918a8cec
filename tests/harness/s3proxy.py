"""A counting HTTP proxy in front of an S3 server (the scale benchmark's independent request count).

    with CountingProxy("http://127.0.0.1:8333") as px:    # point the driver at px.endpoint
        ...
        px.counts()  -> {"GET": n, "HEAD": n, "PUT": n, "LIST": n, "DELETE": n, "POST": n}
        px.by_key()  -> {("PUT", "/bucket/prefix/volumes/pvol-….json"): n, ...}  (paths without the query)

Requests are forwarded byte for byte (the Host header included, so SigV4 signatures still hold);
a GET with list-type=2 in its query is counted as LIST, as AWS bills it.
"""
from __future__ import annotations

import http.client
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def classify(method: str, path: str) -> str:
    query = urllib.parse.urlsplit(path).query
    if method == "GET" and "list-type=" in query:
        return "LIST"
    return method


class CountingProxy:
    def __init__(self, upstream: str):
        u = urllib.parse.urlsplit(upstream)
        self.up_host, self.up_port = u.hostname or "127.0.0.1", u.port or 80
        self._mu = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._keys: Counter[tuple[str, str]] = Counter()
        self.bytes_down = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                proxy._relay(self)
            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = http.client.HTTPConnection(self.up_host, self.up_port, timeout=60)
        return c

    def _relay(self, h: BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else None
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP and k.lower() != "expect"}
        with self._mu:
            self._counts[classify(h.command, h.path)] += 1
            self._keys[(classify(h.command, h.path), urllib.parse.urlsplit(h.path).path)] += 1
        for attempt in (0, 1):
            try:
                c = self._conn()
                c.request(h.command, h.path, body=body, headers=headers)
                r = c.getresponse()
                data = r.read()
                break
            except (http.client.HTTPException, OSError):
                self._local.conn = None
                if attempt:
                    raise
        with self._mu:
            self.bytes_down += len(data)
        h.send_response_only(r.status, r.reason)
        for k, v in r.getheaders():
            if k.lower() not in HOP and k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data) if h.command != "HEAD" else r.getheader("Content-Length") or 0))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def counts(self) -> dict[str, int]:
        with self._mu:
            return dict(self._counts)

    def by_key(self) -> dict[tuple[str, str], int]:
        with self._mu:
            return dict(self._keys)

    def __enter__(self) -> CountingProxy:
        threading.Thread(target=self.server.serve_forever, name="s3proxy", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
