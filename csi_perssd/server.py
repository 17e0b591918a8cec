"""The gRPC edge: one server per process, an interceptor that maps CsiError to a status, logs
one line per RPC (secrets redacted) and records metrics; graceful shutdown on SIGTERM."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures
from typing import Any

import grpc

from . import metrics
from .csi import csi_pb2_grpc as rpc
from .errors import CsiError
from .remote.store import StoreError, unreachable

log = logging.getLogger("csi_perssd.rpc")

_ID_FIELDS = ("volume_id", "snapshot_id", "source_volume_id", "name", "node_id", "group_snapshot_id",
              "base_snapshot_id", "target_snapshot_id")


def _subject(request: Any) -> str:
    parts = []
    for f in _ID_FIELDS:
        try:
            v = getattr(request, f)
        except AttributeError:
            continue
        if v:
            parts.append(f"{f}={str(v)[:80]!r}")
    return " ".join(parts)


def _wrap(method: str, fn: Any) -> Any:
    short = method.rsplit("/", 1)[-1]

    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.monotonic()
        code = grpc.StatusCode.OK
        msg = ""
        try:
            return fn(request, context)
        except CsiError as e:
            code, msg = e.code, e.message
        except StoreError as e:         # a raw store call the logic did not wrap: the store is unreachable
            err = unreachable(e, "object store")
            code, msg = err.code, err.message
        except NotImplementedError:     # the generated servicer's default: an RPC this driver lacks
            code, msg = grpc.StatusCode.UNIMPLEMENTED, f"{short} is not implemented by this driver"
        except Exception as e:  # a bug: never leak a traceback to the CO, log it here
            log.exception("%s failed unexpectedly", short)
            code, msg = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
        finally:
            dt = time.monotonic() - t0
            metrics.RPC_LATENCY.labels(short, code.name).observe(dt)
            # request fields are logged by name only; secrets never appear in _ID_FIELDS
            level = logging.INFO if code in (grpc.StatusCode.OK,) else logging.WARNING
            if short in ("Probe", "NodeGetCapabilities", "GetPluginInfo", "GetPluginCapabilities",
                         "ControllerGetCapabilities", "NodeGetVolumeStats", "GetCapacity") and code == grpc.StatusCode.OK:
                level = logging.DEBUG
            log.log(level, "%s %s -> %s in %.3fs%s", short, _subject(request), code.name, dt,
                    f": {msg}" if msg else "")
        context.abort(code, msg)

    return handler


def _wrap_stream(method: str, fn: Any) -> Any:
    """A server-streaming RPC (SnapshotMetadata): the request is validated and the stream set up
    through `_wrap` (status mapping, log line, metrics); an error while streaming aborts it."""
    start = _wrap(method, fn)

    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        stream = start(request, context)
        try:
            yield from stream
        except CsiError as e:
            log.warning("%s %s: stream aborted: %s", method.rsplit("/", 1)[-1], _subject(request), e)
            context.abort(e.code, e.message)

    return handler


class _Interceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        h = continuation(details)
        if h is not None and h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(details.method, h.unary_stream),
                request_deserializer=h.request_deserializer,
                response_serializer=h.response_serializer)
        if h is None or h.unary_unary is None:
            return h
        return grpc.unary_unary_rpc_method_handler(
            _wrap(details.method, h.unary_unary),
            request_deserializer=h.request_deserializer,
            response_serializer=h.response_serializer)


class Server:
    def __init__(self, socket_path: str, identity: Any, controller: Any | None, node: Any | None,
                 workers: int = 16, group: Any | None = None, metadata: Any | None = None):
        self.socket_path = socket_path
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                                interceptors=[_Interceptor()])
        rpc.add_IdentityServicer_to_server(identity, self.grpc)
        if controller is not None:
            rpc.add_ControllerServicer_to_server(controller, self.grpc)
        if node is not None:
            rpc.add_NodeServicer_to_server(node, self.grpc)
        if group is not None:
            rpc.add_GroupControllerServicer_to_server(group, self.grpc)
        if metadata is not None:
            rpc.add_SnapshotMetadataServicer_to_server(metadata, self.grpc)
        self._stopped = threading.Event()

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path) or ".", exist_ok=True)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)      # stale socket from a killed process
        self.grpc.add_insecure_port(f"unix://{self.socket_path}")
        self.grpc.start()
        log.info("listening on unix://%s", self.socket_path)

    def stop(self, grace: float) -> None:
        log.info("shutting down: waiting up to %.0fs for in-flight RPCs", grace)
        self.grpc.stop(grace).wait()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self._stopped.set()

    def run_until_signal(self, grace: float, on_stop: Any = None) -> None:
        def handle(signum: int, _frame: Any) -> None:
            log.info("received %s", signal.Signals(signum).name)
            threading.Thread(target=self._shutdown, args=(grace, on_stop), daemon=True).start()
        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        self._stopped.wait()

    def _shutdown(self, grace: float, on_stop: Any) -> None:
        self.stop(grace)
        if on_stop is not None:
            on_stop()
