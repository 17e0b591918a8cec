"""pool_from_node_label against a stub Kubernetes API server on 127.0.0.1.

No API server can run here, so a small http.server answers GET /api/v1/nodes/NAME like the
real one (Node JSON, or a 404 Status). The in-cluster test serves it over TLS with a fresh
self-signed certificate and a service-account token, the way a pod sees the API server.
"""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from kubernetes import client
from kubernetes.config import incluster_config

from csi_perssd.errors import CsiError
from csi_perssd.kube import pool_from_node_label

LABEL = "nvme.perssd.io/pool"
TOKEN = "stub-service-account-token"


@dataclass
class StubApi:
    nodes: dict[str, dict[str, str]]          # node name -> labels
    status_override: int | None = None        # answer every request with this status
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Authorization)


def _node_json(name: str, labels: dict[str, str]) -> dict:
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": name, "uid": "0b6f1c7e-1111-2222-3333-444455556666",
                         "resourceVersion": "42", "labels": labels},
            "spec": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}


def _status_json(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _handler(stub: StubApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            stub.requests.append((self.path, self.headers.get("Authorization", "")))
            if stub.status_override is not None:
                code = stub.status_override
                self._send(code, _status_json(code, "Forbidden" if code == 403 else "InternalError",
                                              "stub says no"))
                return
            prefix = "/api/v1/nodes/"
            name = self.path.split("?")[0][len(prefix):] if self.path.startswith(prefix) else None
            if name is None or name not in stub.nodes:
                self._send(404, _status_json(404, "NotFound", f'nodes "{name}" not found'))
                return
            self._send(200, _node_json(name, stub.nodes[name]))

    return Handler


def _serve(stub: StubApi, tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, int]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[0], server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


NODES = {
    "worker-1": {LABEL: "rack-a", "kubernetes.io/hostname": "worker-1"},
    "worker-2": {"kubernetes.io/hostname": "worker-2"},
    "worker-3": {LABEL: ""},
    "worker-4": {LABEL: "-bad/pool-"},
}


@pytest.fixture
def stub() -> StubApi:
    return StubApi(nodes={k: dict(v) for k, v in NODES.items()})


@pytest.fixture
def api(stub: StubApi) -> Iterator[client.ApiClient]:
    for host, port in _serve(stub):
        cfg = client.Configuration(host=f"http://{host}:{port}")
        cfg.api_key = {"authorization": TOKEN}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        api_client = client.ApiClient(cfg)
        try:
            yield api_client
        finally:
            api_client.close()


def test_label_present_returns_pool(api: client.ApiClient, stub: StubApi) -> None:
    assert pool_from_node_label("worker-1", LABEL, api_client=api) == "rack-a"
    assert stub.requests == [("/api/v1/nodes/worker-1", f"Bearer {TOKEN}")]


def test_other_label_key_is_honoured(api: client.ApiClient) -> None:
    assert pool_from_node_label("worker-2", "kubernetes.io/hostname", api_client=api) == "worker-2"


def test_label_missing_names_node_and_label(api: client.ApiClient) -> None:
    with pytest.raises(CsiError) as e:
        pool_from_node_label("worker-2", LABEL, api_client=api)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "worker-2" in e.value.message and LABEL in e.value.message
    assert "kubectl label node worker-2" in e.value.message


def test_label_empty_is_missing(api: client.ApiClient) -> None:
    with pytest.raises(CsiError) as e:
        pool_from_node_label("worker-3", LABEL, api_client=api)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_label_value_that_is_not_a_pool_name_is_rejected(api: client.ApiClient) -> None:
    with pytest.raises(CsiError) as e:
        pool_from_node_label("worker-4", LABEL, api_client=api)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "worker-4" in e.value.message and LABEL in e.value.message


def test_node_missing_is_not_found(api: client.ApiClient, stub: StubApi) -> None:
    with pytest.raises(CsiError) as e:
        pool_from_node_label("ghost", LABEL, api_client=api)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert "ghost" in e.value.message and LABEL in e.value.message
    assert stub.requests[-1][0] == "/api/v1/nodes/ghost"


def test_forbidden_points_at_rbac(api: client.ApiClient, stub: StubApi) -> None:
    stub.status_override = 403
    with pytest.raises(CsiError) as e:
        pool_from_node_label("worker-1", LABEL, api_client=api)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "get" in e.value.message and "nodes" in e.value.message


def test_server_error_is_unavailable(api: client.ApiClient, stub: StubApi) -> None:
    stub.status_override = 500
    api.configuration.retries = 0
    with pytest.raises(CsiError) as e:
        pool_from_node_label("worker-1", LABEL, api_client=api)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "worker-1" in e.value.message


def test_unreachable_api_is_unavailable() -> None:
    with socket.socket() as s:       # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = client.Configuration(host=f"http://127.0.0.1:{port}")
    cfg.retries = 0
    with client.ApiClient(cfg) as api:
        with pytest.raises(CsiError) as e:
            pool_from_node_label("worker-1", LABEL, api_client=api, timeout=2)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "worker-1" in e.value.message and LABEL in e.value.message
    assert f"127.0.0.1:{port}" in e.value.message


@pytest.mark.parametrize("node,label", [("", LABEL), ("../etc", LABEL), ("worker-1", ""),
                                        ("worker-1", "  ")])
def test_bad_arguments_are_rejected_before_any_request(node: str, label: str,
                                                       api: client.ApiClient,
                                                       stub: StubApi) -> None:
    with pytest.raises(CsiError) as e:
        pool_from_node_label(node, label, api_client=api)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.requests == []


def test_outside_a_pod_the_default_client_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    with pytest.raises(CsiError) as e:
        pool_from_node_label("worker-1", LABEL)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert "KUBERNETES_SERVICE_HOST" in e.value.message


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "apiserver.key", tmp / "apiserver.crt"
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make the stub API server's certificate: "
                    "apt-get install openssl", pytrace=False)
    res = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"openssl failed: {res.stderr}"
    return key, cert


def test_in_cluster_config_end_to_end(tmp_path: Path, stub: StubApi,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Default path: service-account token + CA file + KUBERNETES_SERVICE_* over HTTPS."""
    key, cert = _self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text(TOKEN)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    for host, port in _serve(stub, tls):
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
        assert pool_from_node_label("worker-1", LABEL) == "rack-a"
        with pytest.raises(CsiError) as e:
            pool_from_node_label("worker-2", LABEL)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert [r[1].lower() for r in stub.requests] == [f"bearer {TOKEN}"] * 2  # scheme: any case
