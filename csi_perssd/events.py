"""Kubernetes Events on a volume's PersistentVolumeClaim: what a long flush or hydrate is doing,
shown where users look (`kubectl describe pvc`, `kubectl get events`).

The controller records the claim of a volume from CreateVolume's parameters (the
external-provisioner's `--extra-create-metadata`: `csi.storage.k8s.io/pvc/name`, `pvc/namespace`;
the claim's UID from the PV name `pvc-<uid>`), see `params.claim`. The node plugin posts, per
flush pass and hydrate, a handful of events:

    FlushStarted    Normal   a pass begins: bytes to read
    FlushProgress   Normal   at most one per quarter, at least `progress_every_s` apart
    FlushUploaded   Normal   a background pre-flush stored its chunks (NodeUnstage commits)
    FlushCommitted  Normal   generation committed: bytes read, uploaded, MB/s
    FlushFailing    Warning  the object store error; local data kept, retried by NodeUnstage
    FencedOut       Warning  another node owns the volume now; local data kept, not committed
    HydrateStarted / Hydrated / HydrateFailed

`Recorder` is the sink. `NullRecorder` drops everything (outside a cluster); `KubeRecorder`
posts from a bounded queue on its own thread, so `emit` never blocks and never raises: when
the queue is full, the per-claim rate limit is spent, or the API server fails, the event is
dropped and counted. A repeat of the same event on the same claim PATCHes the first one's
count (as client-go's correlator does) instead of creating another. RBAC: `events` create, patch.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .remote.catalog import VolumeRecord

log = logging.getLogger(__name__)

COMPONENT = "nvme.perssd.io"


class EventType(str, Enum):
    NORMAL = "Normal"
    WARNING = "Warning"


class Reason(str, Enum):
    FLUSH_STARTED = "FlushStarted"
    FLUSH_PROGRESS = "FlushProgress"
    FLUSH_UPLOADED = "FlushUploaded"
    FLUSH_COMMITTED = "FlushCommitted"
    FLUSH_FAILING = "FlushFailing"
    FENCED_OUT = "FencedOut"
    HYDRATE_STARTED = "HydrateStarted"
    HYDRATED = "Hydrated"
    HYDRATE_FAILED = "HydrateFailed"


@dataclass(frozen=True)
class ClaimRef:
    """The PersistentVolumeClaim an event is about (validated by params.claim)."""
    namespace: str
    name: str
    uid: str = ""

    @classmethod
    def from_record(cls, claim: dict[str, str] | None) -> ClaimRef | None:
        if not claim or not claim.get("name") or not claim.get("namespace"):
            return None
        return cls(claim["namespace"], claim["name"], claim.get("uid", ""))


class Recorder(Protocol):
    def emit(self, ref: ClaimRef, type_: EventType, reason: Reason, message: str) -> None: ...

    def close(self) -> None: ...


class NullRecorder:
    """Drops every event: the driver outside a cluster, or with --pvc-events=off."""

    def emit(self, ref: ClaimRef, type_: EventType, reason: Reason, message: str) -> None:
        return None

    def close(self) -> None:
        return None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class _Seen:
    name: str
    count: int
    first: str


@dataclass
class _Item:
    ref: ClaimRef
    type_: EventType
    reason: Reason
    message: str
    at: str = field(default_factory=_now)


class KubeRecorder:
    """Posts events through a kubernetes ApiClient from one background thread.

    `burst` events per claim at once, then one every `refill_s` seconds; `queue_size` events
    waiting at most. Counters: `posted`, `patched`, `dropped` (for tests and the log)."""

    def __init__(self, api_client: Any, host: str, *, queue_size: int = 100, burst: int = 25,
                 refill_s: float = 60.0, timeout_s: float = 5.0, correlate: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        from kubernetes import client
        self._api = client.CoreV1Api(api_client)
        self._api_client = api_client
        self.host = host
        self._q: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._burst, self._refill_s, self._timeout = burst, refill_s, timeout_s
        self._clock = clock
        self._buckets: dict[ClaimRef, _Bucket] = {}
        self._seen: OrderedDict[tuple[ClaimRef, str, str], _Seen] = OrderedDict()
        self._correlate = correlate
        self._serial = 0
        self.posted = self.patched = self.dropped = 0
        self._count_mu = threading.Lock()       # emit() drops from callers' threads too
        self._failing = False
        self._thread = threading.Thread(target=self._worker, name="pvc-events", daemon=True)
        self._thread.start()

    def emit(self, ref: ClaimRef, type_: EventType, reason: Reason, message: str) -> None:
        try:
            self._q.put_nowait(_Item(ref, type_, reason, message[:1024]))
        except queue.Full:
            self._drop()

    def _drop(self) -> None:
        with self._count_mu:
            self.dropped += 1

    def close(self, timeout: float = 2.0) -> None:
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued event was posted or dropped (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._q.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False

    def _allow(self, ref: ClaimRef) -> bool:
        now = self._clock()
        b = self._buckets.setdefault(ref, _Bucket(float(self._burst), now))
        b.tokens = min(float(self._burst), b.tokens + (now - b.at) / self._refill_s)
        b.at = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    def _worker(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if not self._allow(item.ref):
                    self._drop()
                    continue
                self._post(item)
            finally:
                self._q.task_done()

    def _post(self, item: _Item) -> None:
        key = (item.ref, item.reason.value, item.message)
        try:
            seen = self._seen.get(key)
            if seen is not None and self._patch(item, seen):
                self.patched += 1
            else:
                self._create(item, key)
                self.posted += 1
            if self._failing:
                log.info("posting events to the Kubernetes API works again")
            self._failing = False
        except Exception as e:        # never let the API server's trouble reach the CSI calls
            self._drop()
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "cannot post event %s on PVC %s/%s (dropped; %d so far): %s",
                    item.reason.value, item.ref.namespace, item.ref.name, self.dropped,
                    str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
            self._failing = True

    def _create(self, item: _Item, key: tuple[ClaimRef, str, str]) -> None:
        from kubernetes.client import CoreV1Event
        self._serial += 1
        name = f"{item.ref.name}.{time.time_ns():x}{self._serial % 4096:03x}"[:253]
        involved = {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                    "namespace": item.ref.namespace, "name": item.ref.name}
        if item.ref.uid:
            involved["uid"] = item.ref.uid
        body = CoreV1Event.from_dict({
            "metadata": {"name": name, "namespace": item.ref.namespace},
            "involvedObject": involved, "reason": item.reason.value, "message": item.message,
            "type": item.type_.value, "count": 1, "firstTimestamp": item.at, "lastTimestamp": item.at,
            "source": {"component": COMPONENT, "host": self.host},
            "reportingComponent": COMPONENT, "reportingInstance": self.host})
        assert body is not None
        self._api.create_namespaced_event(item.ref.namespace, body, _request_timeout=self._timeout)
        self._seen[key] = _Seen(name, 1, item.at)
        while len(self._seen) > self._correlate:
            self._seen.popitem(last=False)

    def _patch(self, item: _Item, seen: _Seen) -> bool:
        """Count a repeat on the first event; False when that event is gone (expired: create)."""
        from kubernetes.client.rest import ApiException
        try:
            self._api.patch_namespaced_event(
                seen.name, item.ref.namespace, {"count": seen.count + 1, "lastTimestamp": item.at},
                _content_type="application/merge-patch+json", _request_timeout=self._timeout)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        seen.count += 1
        return True


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _rate(n: int, seconds: float) -> str:
    return f"{n / max(seconds, 1e-3) / 1e6:.1f} MB/s"


class VolumeEvents:
    """The node's milestones, one call each, turned into events on the volume's claim.

    The claim of a volume is learnt from its catalog record (`track`); a volume without one (no
    --extra-create-metadata, or created outside Kubernetes) gets no events."""

    def __init__(self, recorder: Recorder | None = None, node_id: str = "",
                 progress_every_s: float = 15.0):
        self.recorder: Recorder = recorder if recorder is not None else NullRecorder()
        self.node_id = node_id
        self.progress_every_s = progress_every_s
        self._mu = threading.Lock()
        self._claims: dict[str, ClaimRef] = {}
        self._progress: dict[str, tuple[int, float]] = {}    # vid -> (quarters posted, last post)

    def track(self, rec: VolumeRecord) -> None:
        ref = ClaimRef.from_record(rec.claim)
        if ref is not None:
            with self._mu:
                self._claims[rec.id] = ref

    def _emit(self, vid: str, type_: EventType, reason: Reason, message: str) -> None:
        with self._mu:
            ref = self._claims.get(vid)
        if ref is not None:
            self.recorder.emit(ref, type_, reason, message)

    def flush_started(self, vid: str, total: int, final: bool) -> None:
        with self._mu:
            self._progress[vid] = (0, time.monotonic())
        what = "final flush" if final else "background flush (volume still staged)"
        self._emit(vid, EventType.NORMAL, Reason.FLUSH_STARTED,
                   f"volume {vid}: {what} started on node {self.node_id}: {_mib(total)} to read")

    def flush_progress(self, vid: str, done: int, total: int) -> None:
        if total <= 0:
            return
        quarter = min(3, 4 * done // total)
        now = time.monotonic()
        with self._mu:
            posted, last = self._progress.get(vid, (0, 0.0))
            if quarter <= posted or now - last < self.progress_every_s:
                return
            self._progress[vid] = (quarter, now)
        self._emit(vid, EventType.NORMAL, Reason.FLUSH_PROGRESS,
                   f"volume {vid}: flushed {_mib(done)} of {_mib(total)} ({100 * done // total}%)")

    def flush_uploaded(self, vid: str, uploaded: int, seconds: float) -> None:
        self._emit(vid, EventType.NORMAL, Reason.FLUSH_UPLOADED,
                   f"volume {vid}: background flush stored {_mib(uploaded)} in {seconds:.1f}s "
                   f"({_rate(uploaded, seconds)}); NodeUnstage commits")

    def flush_committed(self, vid: str, generation: int, read: int, uploaded: int,
                        seconds: float) -> None:
        self._emit(vid, EventType.NORMAL, Reason.FLUSH_COMMITTED,
                   f"volume {vid}: generation {generation} committed by node {self.node_id}: read "
                   f"{_mib(read)}, uploaded {_mib(uploaded)} in {seconds:.1f}s ({_rate(read, seconds)})")

    def flush_failed(self, vid: str, error: str, fenced: bool) -> None:
        if fenced:
            self._emit(vid, EventType.WARNING, Reason.FENCED_OUT,
                       f"volume {vid}: node {self.node_id} was fenced out, its local data is kept "
                       f"and not committed: {error}")
            return
        self._emit(vid, EventType.WARNING, Reason.FLUSH_FAILING,
                   f"volume {vid}: flush failing on node {self.node_id} (local data kept, "
                   f"NodeUnstage retries): {error}")

    def hydrate_started(self, rec: Any) -> None:
        self.track(rec)
        self._emit(rec.id, EventType.NORMAL, Reason.HYDRATE_STARTED,
                   f"volume {rec.id}: hydrating generation {rec.generation} ({_mib(rec.size)}) "
                   f"on node {self.node_id}")

    def hydrate_done(self, rec: Any, written: int, seconds: float, error: str = "") -> None:
        if error:
            self._emit(rec.id, EventType.WARNING, Reason.HYDRATE_FAILED,
                       f"volume {rec.id}: hydrating generation {rec.generation} on node "
                       f"{self.node_id} failed: {error}")
            return
        self._emit(rec.id, EventType.NORMAL, Reason.HYDRATED,
                   f"volume {rec.id}: generation {rec.generation} hydrated on node {self.node_id}: "
                   f"{_mib(written)} written in {seconds:.1f}s ({_rate(rec.size, seconds)} of volume)")


def from_config(cfg: Any) -> VolumeEvents:
    """The node's VolumeEvents: posting to the API server when `cfg.pvc_events` is "on", or
    "auto" inside a pod (KUBERNETES_SERVICE_HOST) or with a kubeconfig; else a NullRecorder.
    A client that cannot be configured is logged and leaves events off (never fatal)."""
    import os
    mode = cfg.pvc_events
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--pvc-events must be auto, on or off, not {mode!r}")
    wanted = mode == "on" or (mode == "auto" and bool(cfg.kubeconfig
                                                      or os.environ.get("KUBERNETES_SERVICE_HOST")))
    recorder: Recorder = NullRecorder()
    if wanted:
        from . import kube
        from .errors import CsiError
        try:
            api = kube.api_client(cfg.kubeconfig)
            api.configuration.retries = 0     # the queue's next event is the retry
            recorder = KubeRecorder(api, cfg.node_id)
            log.info("posting events on PVCs to %s", api.configuration.host)
        except CsiError as e:
            log.warning("events on PVCs are off: %s", e.message)
    return VolumeEvents(recorder, cfg.node_id, cfg.events_progress_seconds)
