"""A stub Kubernetes API server on 127.0.0.1 for the Events the node plugin posts (no API server
can run here). It answers like the real one for what the driver uses:

    POST  /api/v1/namespaces/NS/events        create (201, the stored Event)
    PATCH /api/v1/namespaces/NS/events/NAME   merge patch (200; 404 Status when unknown)

It keeps every request (method, path, Authorization) and the stored events in arrival order.
`hang_s` makes it accept a request, hold it that many seconds and close it unanswered (an API
server that is there but stuck); `gate`, when given, holds each request unanswered until the
test sets it (stuck until the test says so, no clock); `status_override` answers every request with that status.
`describe()` renders the events the way `kubectl describe pvc` prints them.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOKEN = "stub-service-account-token"
_PREFIX = "/api/v1/namespaces/"


@dataclass
class StubKubeApi:
    status_override: int | None = None
    hang_s: float = 0.0
    gate: threading.Event | None = None
    requests: list[tuple[str, str, str]] = field(default_factory=list)   # (method, path, auth)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)      # "ns/name" -> Event
    _mu: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> StubKubeApi:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, path: Path, server: str | None = None) -> Path:
        return write_kubeconfig(path, server or self.url)

    # -- observation -------------------------------------------------------------------------
    def ordered(self) -> list[dict[str, Any]]:
        """Stored events by creation order."""
        with self._mu:
            return list(self.events.values())

    def reasons(self) -> list[str]:
        return [e["reason"] for e in self.ordered()]

    def wait_for(self, reason: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.reasons().count(reason) >= count:
                return self.ordered()
            time.sleep(0.05)
        raise AssertionError(f"no {count} x {reason} event in {timeout}s; got {self.reasons()}")

    # -- request handling --------------------------------------------------------------------
    def handle(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        parts = path.split("?")[0][len(_PREFIX):].split("/") if path.startswith(_PREFIX) else []
        if len(parts) < 2 or parts[1] != "events":
            return 404, _status(404, "NotFound", f"no such path {path}")
        ns = parts[0]
        if method == "POST" and len(parts) == 2:
            name = body.get("metadata", {}).get("name", "")
            if body.get("metadata", {}).get("namespace", ns) != ns or not name:
                return 400, _status(400, "BadRequest", "metadata.namespace/name do not match")
            with self._mu:
                if f"{ns}/{name}" in self.events:
                    return 409, _status(409, "AlreadyExists", f'events "{name}" already exists')
                self.events[f"{ns}/{name}"] = body
            return 201, body
        if method == "PATCH" and len(parts) == 3:
            with self._mu:
                ev = self.events.get(f"{ns}/{parts[2]}")
                if ev is None:
                    return 404, _status(404, "NotFound", f'events "{parts[2]}" not found')
                ev.update(body)
                return 200, ev
        return 405, _status(405, "MethodNotAllowed", f"{method} {path}")

    def describe(self) -> str:
        """The events as `kubectl describe pvc` prints them (Type, Reason, Age, From, Message)."""
        now = datetime.now(timezone.utc)
        rows = [("Type", "Reason", "Age", "From", "Message"), ("----", "------", "----", "----", "-------")]
        for e in self.ordered():
            first = _parse(e["firstTimestamp"])
            last = _parse(e["lastTimestamp"])
            age = _age(now - last)
            if e.get("count", 1) > 1:
                age = f"{age} (x{e['count']} over {_age(last - first)})"
            src = e.get("source", {})
            frm = ", ".join(x for x in (src.get("component"), src.get("host")) if x)
            rows.append((e["type"], e["reason"], age, frm, e["message"]))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["Events:"] + ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4]
                               for r in rows]
        return "\n".join(line.rstrip() for line in lines)


def _parse(ts: str) -> datetime:
    return datetime.strptime(ts.replace("+00:00", "Z"), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def _age(delta: Any) -> str:
    s = max(0, int(delta.total_seconds()))
    return f"{s}s" if s < 120 else f"{s // 60}m"


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _handler(stub: StubKubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _serve(self) -> None:
            with stub._mu:
                stub.requests.append((self.command, self.path, self.headers.get("Authorization", "")))
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if stub.gate is not None:
                stub.gate.wait(60)              # stuck until the test opens the gate
                return
            if stub.hang_s:
                time.sleep(stub.hang_s)         # stuck: never answers, stores nothing
                return
            if stub.status_override is not None:
                code, body = stub.status_override, _status(stub.status_override, "InternalError", "stub says no")
            else:
                try:
                    code, body = stub.handle(self.command, self.path, json.loads(raw or b"{}"))
                except ValueError:
                    code, body = 400, _status(400, "BadRequest", "body is not JSON")
            data = json.dumps(body).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass              # the client gave up (hang_s longer than its timeout)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    return Handler


def write_kubeconfig(path: Path, server: str, token: str = TOKEN) -> Path:
    """A kubeconfig with one cluster (SERVER, plain HTTP on loopback) and a bearer token."""
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "stub",
           "clusters": [{"name": "stub", "cluster": {"server": server}}],
           "users": [{"name": "perssd-node", "user": {"token": token}}],
           "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "perssd-node"}}]}
    path.write_text(json.dumps(cfg))
    return path
