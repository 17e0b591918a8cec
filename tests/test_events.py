"""Events on the volume's PVC, against a stub Kubernetes API server on 127.0.0.1.

In process: the recorder (queue, correlation by PATCH, per-claim rate limit, drops when the
API server is down or stuck, never blocking the caller) and the claim parameters. Then real
driver processes over gRPC: the events of one flush (node-a) and one hydrate (node-b), and a
flush and hydrate that succeed while the API server is down or hanging, posting nothing.
"""
from __future__ import annotations

import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kubernetes import client

from csi_perssd import events, params
from csi_perssd.errors import CsiError
from csi_perssd.events import ClaimRef, EventType, KubeRecorder, Reason, VolumeEvents
from csi_perssd.remote.catalog import VolumeRecord
from tests.harness.cluster import Cluster, block_cap
from tests.harness.kubeapi import TOKEN, StubKubeApi, write_kubeconfig
from tests.harness.seaweed import Seaweed

MiB = 1 << 20
UID = "0b6f1c7e-1111-2222-3333-444455556666"
CLAIM = ClaimRef("ml", "train-data", UID)


@pytest.fixture
def stub() -> Iterator[StubKubeApi]:
    s = StubKubeApi().start()
    try:
        yield s
    finally:
        s.stop()


def _api(url: str) -> client.ApiClient:
    cfg = client.Configuration(host=url)
    cfg.api_key = {"authorization": TOKEN}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    cfg.retries = 0
    return client.ApiClient(cfg)


def _dead_url() -> str:
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# -- the recorder, in process ---------------------------------------------------------------
def test_events_are_posted_on_the_claim_and_repeats_patch_the_count(stub: StubKubeApi) -> None:
    rec = KubeRecorder(_api(stub.url), "node-a")
    try:
        rec.emit(CLAIM, EventType.NORMAL, Reason.FLUSH_STARTED, "started")
        rec.emit(CLAIM, EventType.WARNING, Reason.FLUSH_FAILING, "s3 down")
        rec.emit(CLAIM, EventType.WARNING, Reason.FLUSH_FAILING, "s3 down")
        rec.emit(CLAIM, EventType.WARNING, Reason.FLUSH_FAILING, "s3 down")
        assert rec.drain()
    finally:
        rec.close()
    assert (rec.posted, rec.patched, rec.dropped) == (2, 2, 0)
    assert [(m, p.split("?")[0].rsplit("/", 1)[0]) for m, p, _ in stub.requests] == \
        [("POST", "/api/v1/namespaces/ml"), ("POST", "/api/v1/namespaces/ml"),
         ("PATCH", "/api/v1/namespaces/ml/events"), ("PATCH", "/api/v1/namespaces/ml/events")]
    assert {a for _, _, a in stub.requests} == {f"Bearer {TOKEN}"}
    started, failing = stub.ordered()
    assert started["involvedObject"] == {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                                         "namespace": "ml", "name": "train-data", "uid": UID}
    assert (started["type"], started["reason"], started["count"]) == ("Normal", "FlushStarted", 1)
    assert started["source"] == {"component": "nvme.perssd.io", "host": "node-a"}
    assert (failing["type"], failing["count"], failing["message"]) == ("Warning", 3, "s3 down")


def test_rate_limit_per_claim_drops_the_excess(stub: StubKubeApi) -> None:
    now = [100.0]
    rec = KubeRecorder(_api(stub.url), "node-a", burst=3, refill_s=10.0, clock=lambda: now[0])
    other = ClaimRef("ml", "other")
    try:
        for i in range(5):
            rec.emit(CLAIM, EventType.NORMAL, Reason.FLUSH_PROGRESS, f"p{i}")
        rec.emit(other, EventType.NORMAL, Reason.FLUSH_PROGRESS, "o")     # its own bucket
        assert rec.drain()
        now[0] += 10.0                                                     # one token back
        rec.emit(CLAIM, EventType.NORMAL, Reason.FLUSH_PROGRESS, "p5")
        rec.emit(CLAIM, EventType.NORMAL, Reason.FLUSH_PROGRESS, "p6")
        assert rec.drain()
    finally:
        rec.close()
    assert [e["message"] for e in stub.ordered()] == ["p0", "p1", "p2", "o", "p5"]
    assert rec.dropped == 3
    assert "uid" not in stub.ordered()[3]["involvedObject"]


def test_api_down_or_stuck_drops_and_never_blocks(stub: StubKubeApi) -> None:
    for url in (_dead_url(), stub.url):
        stub.gate = threading.Event()       # the stub holds every request until the gate opens
        rec = KubeRecorder(_api(url), "node-a", queue_size=4, timeout_s=60.0)
        try:
            for i in range(50):
                rec.emit(CLAIM, EventType.NORMAL, Reason.FLUSH_PROGRESS, f"p{i}")
            if url == stub.url:
                # 50 emits returned while the stub held at most one request unanswered: the
                # queue (4) filled and the rest were dropped at once; none waited on the server
                assert len(stub.requests) <= 1 and rec.dropped in (45, 46), \
                    (stub.requests, rec.dropped)
                stub.gate.set()
            assert rec.drain(timeout=30)
        finally:
            stub.gate.set()
            rec.close()
        assert rec.posted == 0 and rec.dropped == 50
    stub.gate = None
    assert stub.events == {}


def test_server_errors_are_dropped(stub: StubKubeApi) -> None:
    stub.status_override = 403
    rec = KubeRecorder(_api(stub.url), "node-a")
    try:
        rec.emit(CLAIM, EventType.NORMAL, Reason.HYDRATED, "x")
        assert rec.drain()
    finally:
        rec.close()
    assert (rec.posted, rec.dropped, len(stub.requests)) == (0, 1, 1)


def test_progress_posts_at_most_one_per_quarter() -> None:
    got: list[tuple[Reason, str]] = []

    class Sink:
        def emit(self, ref: ClaimRef, type_: EventType, reason: Reason, message: str) -> None:
            got.append((reason, message))

        def close(self) -> None:
            pass

    ev = VolumeEvents(Sink(), "node-a", progress_every_s=0.0)
    rec = VolumeRecord(id="v1", name="pvc-x", size=64 * MiB, capabilities=[],
                       claim={"namespace": "ml", "name": "train-data", "uid": UID})
    ev.flush_started("v1", 64 * MiB, final=True)        # not tracked yet: nothing
    ev.track(rec)
    ev.flush_started("v1", 64 * MiB, final=True)
    for done in range(0, 64 * MiB + 1, MiB):             # 65 progress calls
        ev.flush_progress("v1", done, 64 * MiB)
    ev.flush_committed("v1", 3, 64 * MiB, 10 * MiB, 2.0)
    assert [r for r, _ in got] == [Reason.FLUSH_STARTED] + [Reason.FLUSH_PROGRESS] * 3 + [Reason.FLUSH_COMMITTED]
    assert [m.rsplit("(", 1)[1] for r, m in got if r == Reason.FLUSH_PROGRESS] == ["25%)", "50%)", "75%)"]
    assert "33.6 MB/s" in got[-1][1] and "generation 3" in got[-1][1]
    slow = VolumeEvents(Sink(), "node-a", progress_every_s=3600.0)
    slow.track(rec)
    got.clear()
    slow.flush_started("v1", 64 * MiB, final=False)
    for done in range(0, 64 * MiB + 1, MiB):
        slow.flush_progress("v1", done, 64 * MiB)
    assert [r for r, _ in got] == [Reason.FLUSH_STARTED]


def test_warnings_name_the_error_and_that_data_is_kept() -> None:
    got: list[tuple[EventType, Reason, str]] = []

    class Sink:
        def emit(self, ref: ClaimRef, type_: EventType, reason: Reason, message: str) -> None:
            got.append((type_, reason, message))

        def close(self) -> None:
            pass

    ev = VolumeEvents(Sink(), "node-a")
    rec = VolumeRecord(id="v1", name="pvc-x", size=MiB, capabilities=[], generation=4,
                       claim={"namespace": "ml", "name": "train-data", "uid": UID})
    ev.track(rec)
    ev.flush_failed("v1", "object store unreachable: connect timeout", fenced=False)
    ev.flush_failed("v1", "node node-a (epoch 3) no longer owns it", fenced=True)
    ev.hydrate_done(rec, 0, 1.0, error="chunk ab12 is corrupt")
    ev.flush_failed("v2", "x", fenced=False)                 # no claim known: nothing
    assert [(t, r) for t, r, _ in got] == [(EventType.WARNING, Reason.FLUSH_FAILING),
                                           (EventType.WARNING, Reason.FENCED_OUT),
                                           (EventType.WARNING, Reason.HYDRATE_FAILED)]
    assert "local data kept" in got[0][2] and "connect timeout" in got[0][2]
    assert "kept and not committed" in got[1][2] and "epoch 3" in got[1][2]
    assert "generation 4" in got[2][2] and "corrupt" in got[2][2]


def test_recorder_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from csi_perssd.config import Config
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert isinstance(events.from_config(Config(node_id="n")).recorder, events.NullRecorder)
    assert isinstance(events.from_config(Config(node_id="n", pvc_events="on")).recorder,
                      events.NullRecorder)            # asked, but no way to reach an API server
    kc = write_kubeconfig(tmp_path / "kc", _dead_url())
    ev = events.from_config(Config(node_id="n", kubeconfig=str(kc)))
    assert isinstance(ev.recorder, KubeRecorder)
    ev.recorder.close()
    assert isinstance(events.from_config(Config(node_id="n", kubeconfig=str(kc), pvc_events="off")).recorder,
                      events.NullRecorder)
    with pytest.raises(ValueError):
        events.from_config(Config(node_id="n", pvc_events="maybe"))


# -- the claim parameters (--extra-create-metadata) -------------------------------------------
def test_claim_from_create_parameters() -> None:
    p = {params.PVC_NAME: "train-data", params.PVC_NAMESPACE: "ml", params.PV_NAME: f"pvc-{UID}"}
    assert params.claim(p, f"pvc-{UID}") == {"namespace": "ml", "name": "train-data", "uid": UID}
    assert params.claim({params.PVC_NAME: "a", params.PVC_NAMESPACE: "b"}, "my-volume")["uid"] == ""
    assert params.claim({}, "x") == {}
    bad = [{params.PVC_NAME: "a"}, {params.PVC_NAME: "../etc", params.PVC_NAMESPACE: "ml"},
           {params.PVC_NAME: "a", params.PVC_NAMESPACE: "Bad_NS"},
           {params.PVC_NAME: "a" * 254, params.PVC_NAMESPACE: "ml"}]
    for b in bad:
        with pytest.raises(CsiError) as e:
            params.claim(b, "x")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


# -- real driver processes ---------------------------------------------------------------------
def _claim_params(uid: str) -> dict[str, str]:
    return {"chunkSize": "1Mi", params.PVC_NAME: "train-data", params.PVC_NAMESPACE: "ml",
            params.PV_NAME: f"pvc-{uid}"}


@pytest.fixture
def two_nodes(seaweed: Seaweed, tmp_path: Path) -> Iterator[Cluster]:
    if not seaweed.running:
        seaweed.start()
    cl = Cluster(tmp_path / "cl", nodes=(), seaweed=seaweed, prefix=f"ev-{secrets.token_hex(5)}")
    try:
        cl.start()
        yield cl
    finally:
        cl.stop()


def _write_all(path: str, size: int) -> None:
    with open(path, "r+b", buffering=0) as f:
        for off in range(0, size, MiB):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())


@pytest.mark.root
@pytest.mark.s3
def test_one_flush_and_one_hydrate_post_their_sequence(two_nodes: Cluster, stub: StubKubeApi,
                                                       tmp_path: Path) -> None:
    cl = two_nodes
    kc = str(stub.kubeconfig(tmp_path / "kubeconfig"))
    for n in ("node-a", "node-b"):
        cl.add_node(n, extra=["--kubeconfig", kc, "--events-progress-seconds", "0"])
    uid = str(uuid.uuid4())
    size = 8 * MiB
    vid = cl.create(f"pvc-{uid}", size, block_cap(), params=_claim_params(uid))
    assert cl.catalog().volume(vid).claim == {"namespace": "ml", "name": "train-data", "uid": uid}
    _write_all(cl.attach("node-a", vid, block_cap()), size)
    cl.release("node-a", vid)
    stub.wait_for("FlushCommitted")
    cl.attach("node-b", vid, block_cap())
    evs = stub.wait_for("Hydrated")
    print("\n" + stub.describe())
    reasons = [e["reason"] for e in evs]
    assert reasons == ["FlushStarted"] + ["FlushProgress"] * 3 + [
        "FlushUploaded", "FlushStarted", "FlushCommitted", "HydrateStarted", "Hydrated"]
    # the final pass reads what the pre-flush left: all of it again (its progress repeats the
    # pre-flush's messages, so each PATCHes the count of the same event), or nothing where
    # reflinks track changes
    final_reads = "0.0 MiB to read" not in evs[5]["message"]
    assert [e["count"] for e in evs] == [1] + [1 + final_reads] * 3 + [1] * 5
    assert {m for m, _, _ in stub.requests} == ({"POST", "PATCH"} if final_reads else {"POST"})
    for e in evs:
        assert e["involvedObject"] == {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                                       "namespace": "ml", "name": "train-data", "uid": uid}
        assert e["type"] == "Normal" and vid in e["message"]
    hosts = [e["source"]["host"] for e in evs]
    assert hosts == ["node-a"] * (len(evs) - 2) + ["node-b"] * 2
    assert "8.0 MiB to read" in evs[0]["message"] and "background" in evs[0]["message"]
    committed = next(e["message"] for e in evs if e["reason"] == "FlushCommitted")
    assert "generation 1 committed by node node-a" in committed and "MB/s" in committed
    assert "uploaded 0.0 MiB" in committed          # the pre-flush had stored every chunk
    assert "generation 1 hydrated on node node-b: 8.0 MiB written" in evs[-1]["message"]


@pytest.mark.root
@pytest.mark.s3
def test_api_down_or_hanging_posts_nothing_and_csi_calls_succeed(two_nodes: Cluster, stub: StubKubeApi,
                                                                 tmp_path: Path) -> None:
    cl = two_nodes
    stub.hang_s = 30.0                  # accepts, never answers in time
    dead = str(write_kubeconfig(tmp_path / "dead", _dead_url()))
    cl.add_node("node-a", extra=["--kubeconfig", dead, "--events-progress-seconds", "0"])
    cl.add_node("node-b", extra=["--kubeconfig", str(stub.kubeconfig(tmp_path / "hang")),
                                 "--events-progress-seconds", "0"])
    uid = str(uuid.uuid4())
    vid = cl.create(f"pvc-{uid}", 8 * MiB, block_cap(), params=_claim_params(uid))
    _write_all(cl.attach("node-a", vid, block_cap()), 8 * MiB)
    assert cl.release("node-a", vid) == 1       # NodeUnstage committed in its first call
    assert cl.catalog().volume(vid).generation == 1
    cl.attach("node-b", vid, block_cap())       # hydrates while the API server hangs
    deadline = time.monotonic() + 10
    while not stub.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stub.requests, "node-b never tried to post"
    assert stub.events == {}                    # nothing answered, yet every CSI call succeeded
    assert "cannot post event" in cl.nodes["node-a"].tail(200)


@pytest.mark.root
@pytest.mark.s3
def test_flush_failing_names_the_s3_error_then_commits(seaweed: Seaweed, stub: StubKubeApi,
                                                      tmp_path: Path) -> None:
    from tests.plugins.s3 import seaweed_outage
    if not seaweed.running:
        seaweed.start()
    cl = Cluster(tmp_path / "cl", nodes=(), seaweed=seaweed, prefix=f"evo-{secrets.token_hex(5)}",
                 env={"PERSSD_UNSTAGE_WAIT_SECONDS": "1"})
    try:
        cl.start()
        cl.add_node("node-a", extra=["--kubeconfig", str(stub.kubeconfig(tmp_path / "kc")),
                                     "--events-progress-seconds", "3600"])
        uid = str(uuid.uuid4())
        vid = cl.create(f"pvc-{uid}", 4 * MiB, block_cap(), params=_claim_params(uid))
        _write_all(cl.attach("node-a", vid, block_cap()), 4 * MiB)
        with seaweed_outage(seaweed):
            cl.unpublish("node-a", vid)          # the background flush cannot reach the store
            evs = stub.wait_for("FlushFailing", timeout=90)
        failing = next(e for e in evs if e["reason"] == "FlushFailing")
        assert failing["type"] == "Warning" and failing["involvedObject"]["uid"] == uid
        assert "object store unreachable" in failing["message"] and "local data kept" in failing["message"]
        cl.unstage("node-a", vid, timeout=120)   # the store is back: the final pass commits
        evs = stub.wait_for("FlushCommitted")
        reasons = [e["reason"] for e in evs]
        assert reasons[0] == "FlushFailing" and reasons[-1] == "FlushCommitted"
        assert "FlushStarted" in reasons and "generation 1 committed" in evs[-1]["message"]
        assert cl.catalog().volume(vid).generation == 1
        print("\n" + stub.describe())
    finally:
        cl.stop()
