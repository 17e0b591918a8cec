"""The lazy volume's serving process: `python -m csi_perssd.lazy.server DIR`.

It exposes the volume as one file, DIR/mnt/disk, through FUSE (mfusepy on libfuse3), which the
node plugin attaches as a loop device. It runs in its own session, started detached by the
plugin, and outlives the plugin: a restarted plugin finds it again by DIR/server.pid and its
control socket (manager.py). It ends when its FUSE mount is unmounted (the plugin does that on
NodeUnstage, after detaching the loop device) or on SIGTERM, persisting the hydration state.

DIR holds: server.json (settings), manifest (the staged generation), state.json (hydration
state), server.pid, server.log. The object store's secrets come on stdin, never on argv.

With `disk_pending` in server.json (a lazy stage on LVM: the plugin starts the server while
lvcreate makes the LV) the file is served at the planned size before the local volume exists;
the plugin's `open_disk` control request opens it (see _PendingVolume).
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import mmap
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mfusepy  # type: ignore[import-untyped]

from ..remote.manifest import Manifest
from ..remote.stages import LANDING_ALIGN, LANDING_SLACK
from ..remote.store import ObjectStore
from ..remote.transfer import ChunkCorrupted
from .fetch import FetchTimeout, fetch_chunk
from .state import HydrationState
from .volume import POOL, LazyVolume

log = logging.getLogger("csi_perssd.lazy.server")
FILE = "disk"

# libfuse3's struct fuse_buf / fuse_bufvec (fuse_common.h; mfusepy declares the vector's
# inline buf[1] as a pointer, so its own struct cannot be filled in)
FUSE_BUF_IS_FD, FUSE_BUF_FD_SEEK, FUSE_BUF_FD_RETRY = 1 << 1, 1 << 2, 1 << 3


class _FuseBuf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _FuseBufvec(ctypes.Structure):
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _FuseBuf * 1)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.calloc.restype = ctypes.c_void_p
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.restype = None
_libc.free.argtypes = [ctypes.c_void_p]
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12       # fuse_common.h (libfuse 3)
BUFVEC_BYTES = ctypes.sizeof(_FuseBufvec) + 64  # slack: later libfuse versions grew fuse_buf


class _PendingVolume:
    """The served volume, whose local volume may not exist yet: a lazy stage on LVM starts the
    server while lvcreate makes the LV (disk_pending in server.json). Until the plugin's
    open_disk the file has the planned size, a read is answered from the object store
    (read_unopened) and a write waits for the open (up to the fetch timeout, then EIO). Nothing
    touches the planned path before: lvcreate wipes the LV's start as it makes it, so a write
    there would be lost, and the path may name nothing yet."""

    def __init__(self, settings: dict[str, Any], make: Callable[[str], LazyVolume],
                 manifest: Manifest | None = None, fetch: Callable[[str], bytes | memoryview] | None = None):
        self.planned_size = int(settings.get("size") or 0)
        self.timeout = float(settings["fetch_timeout"])
        self._make = make
        self.manifest, self.fetch = manifest, fetch
        self._vol: LazyVolume | None = None
        self._mu = threading.Lock()
        self._opened = threading.Event()
        self.disk = ""

    def open(self, disk: str) -> None:
        """Open the local volume at `disk` and start hydrating it; OSError when it is not of
        the planned size (nothing written then). Again with the same disk: nothing to do."""
        with self._mu:
            if self._vol is not None:
                if disk != self.disk:
                    raise OSError(errno.EBUSY, f"the local volume {self.disk} is open, not {disk}")
                return
            vol = self._make(disk)
            size = vol.size
            if self.planned_size and size != self.planned_size:
                vol.close()
                raise OSError(errno.EINVAL, f"the local volume {disk} has {size} bytes, "
                                            f"not the planned {self.planned_size}")
            vol.start()
            self._vol, self.disk = vol, disk
            self._opened.set()
        log.info("local volume %s open", disk)

    @property
    def is_open(self) -> bool:
        return self._opened.is_set()

    def peek(self) -> LazyVolume | None:
        return self._vol

    def read_unopened(self, offset: int, size: int) -> bytes:
        """A read before the open, answered from the object store (the committed generation's
        chunks, verified; holes and the rest up to the planned size as zeros) without writing
        anything. Device scanners read a new block device at once (lvcreate's own scan of every
        device, udev's blkid): waiting for the open would stall lvcreate, which the open waits
        for, until the fetch timeout."""
        assert self.manifest is not None and self.fetch is not None
        cs = self.manifest.chunk_size
        end = min(offset + size, self.planned_size)
        out = bytearray()
        pos = offset
        while pos < end:
            i, within = divmod(pos, cs)
            n = min(end - pos, cs - within)
            h = self.manifest.hash_at(i) if pos < self.manifest.volume_size else None
            piece = bytes(self.fetch(h)[within:within + n]) if h is not None else b""
            out += piece + bytes(n - len(piece))
            pos += n
        return bytes(out)

    def get(self) -> LazyVolume:
        """The open volume; waits for the open, EIO past the fetch timeout."""
        if not self._opened.wait(self.timeout):
            log.error("I/O error: the local volume was not opened within %.0fs", self.timeout)
            raise mfusepy.FuseOSError(errno.EIO)
        assert self._vol is not None
        return self._vol

    @property
    def size(self) -> int:
        vol = self._vol
        return vol.size if vol is not None else self.planned_size


class _Ops(mfusepy.Operations):
    """One regular file, /disk, whose bytes are the volume's."""
    use_ns = True

    def __init__(self, pending: _PendingVolume):
        self.pending = pending
        self.t = time.time_ns()

    @property
    def vol(self) -> LazyVolume:
        return self.pending.get()

    def init_with_config(self, conn: Any, config: Any) -> None:
        """Only this server changes the file, so the kernel need not ask its attributes before
        each read to see whether someone else did (libfuse's default, auto_inval_data; profiled:
        its GETATTRs were 30% of the FUSE threads' callback time in a 2 GiB read right after
        stage). stat() still asks every time (attr_timeout 0)."""
        if conn is not None:
            conn.want &= ~FUSE_CAP_AUTO_INVAL_DATA

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        base = {"st_uid": 0, "st_gid": 0, "st_atime": self.t, "st_mtime": self.t, "st_ctime": self.t}
        if path == "/":
            return {**base, "st_mode": stat.S_IFDIR | 0o700, "st_nlink": 2}
        if path == "/" + FILE:
            size = self.pending.size
            return {**base, "st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": size,
                    "st_blocks": (size + 511) // 512, "st_blksize": 4096}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", FILE]

    def open(self, path: str, flags: int) -> int:
        if path != "/" + FILE:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return 0

    def _io(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ChunkCorrupted as e:
            log.error("I/O error: %s (this range only; the local volume is unchanged)", e)
        except FetchTimeout as e:
            log.error("I/O error: %s", e)
        except OSError as e:
            log.error("I/O error on the local volume: %s", e)
        raise mfusepy.FuseOSError(errno.EIO)

    def read_buf(self, path: str, bufpp: Any, size: int, offset: int, fh: Any) -> int:
        """A read: the chunks it covers are made local (fetched and verified first), then the
        reply is a copy of the chunks the volume keeps in memory (`_kept`) or else names the
        local volume's descriptor and range, and libfuse reads it from there into its reply
        itself (in C, without the GIL; no bytes object, no copy in Python).
        libfuse frees the vector with free(): it is calloc'd here."""
        if not self.pending.is_open:
            return self._unopened(bufpp, self._io(self.pending.read_unopened, offset, size))
        n = self._io(self.vol.prepare_read, offset, size)
        mem = self._kept(offset, n)
        addr = _libc.calloc(1, BUFVEC_BYTES)
        if not addr:
            _libc.free(mem)
            raise mfusepy.FuseOSError(errno.ENOMEM)
        vec = _FuseBufvec.from_address(addr)
        vec.count = 1
        buf = vec.buf[0]
        buf.size = n
        if mem:
            buf.mem, buf.flags = mem, 0
        else:
            buf.fd, buf.pos = self.vol.fd, offset
            buf.flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY
        bufpp[0] = ctypes.cast(addr, mfusepy.fuse_bufvec_p)
        return 0

    def _unopened(self, bufpp: Any, data: bytes) -> int:
        """Reply with `data` in malloc'd memory (read_buf's vector; libfuse frees both)."""
        n = len(data)
        mem = _libc.malloc(max(n, 1))
        addr = _libc.calloc(1, BUFVEC_BYTES) if mem else None
        if not addr:
            _libc.free(mem)
            raise mfusepy.FuseOSError(errno.ENOMEM)
        ctypes.memmove(mem, data, n)
        vec = _FuseBufvec.from_address(addr)
        vec.count = 1
        vec.buf[0].size, vec.buf[0].mem, vec.buf[0].flags = n, mem, 0
        bufpp[0] = ctypes.cast(addr, mfusepy.fuse_bufvec_p)
        return 0

    def _kept(self, offset: int, n: int) -> int | None:
        """The read's bytes copied from the chunks the volume keeps in memory (LazyVolume.read_kept)
        into malloc'd memory, which libfuse frees with the vector after its reply (fuse.c
        fuse_free_buf frees each buffer that is not a descriptor's); None: answer from the
        descriptor."""
        if not n or not self.vol.recent.active:
            return None
        mem = _libc.malloc(n)
        if not mem:
            return None
        try:
            if self.vol.read_kept(offset, n, mem):
                return int(mem)
        except OSError as e:
            log.warning("reading kept chunks: %s (answered from the local volume)", e)
        _libc.free(mem)
        return None

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        return self._io(self.vol.write, offset, data)

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        self._io(self.vol.fsync)
        return 0

    def flush(self, path: str, fh: Any) -> int:
        return 0

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        raise mfusepy.FuseOSError(errno.EPERM)      # the volume's size is the backend's business

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}


def _status(pending: _PendingVolume, state: HydrationState) -> dict[str, Any]:
    vol = pending.peek()
    if vol is not None:
        return {**vol.status(), "disk_open": True}
    return {"chunks": state.chunks, "missing": state.missing_count, "on_demand": state.on_demand,
            "background": state.background, "complete": state.complete, "failed": [],
            "generation": state.generation, "disk_open": False}


def _control(pending: _PendingVolume, state: HydrationState, fetcher: _Fetcher, sock_path: str,
             stop: threading.Event) -> None:
    """Control socket: one JSON request per connection: {"op": "status" | "sync" | "open_disk",
    "disk": path (open_disk)}."""
    Path(sock_path).unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    os.chmod(sock_path, 0o600)
    srv.listen(8)
    srv.settimeout(0.5)
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(5)
            try:
                req = json.loads(conn.makefile("rb").readline() or b"{}")
                vol = pending.peek()
                if req.get("op") == "sync" and vol is not None:
                    vol.persist()
                if req.get("op") == "open_disk":
                    pending.open(str(req["disk"]))
                reply: dict[str, Any] = {"ok": True, "pid": os.getpid(), **_status(pending, state),
                                         **fetcher.status()}
            except (OSError, ValueError, KeyError) as e:
                reply = {"ok": False, "error": str(e)}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass
    srv.close()
    Path(sock_path).unlink(missing_ok=True)


def _store(settings: dict[str, Any], secrets: dict[str, str]) -> ObjectStore:
    """The object store, as the plugin opens it; its own retry budget capped by the fetch timeout
    (fetch.py retries on top of it until the timeout)."""
    import dataclasses

    from ..config import Config
    from ..stores import Stores
    cfg = Config(catalog=settings["catalog"], s3_endpoint=settings.get("s3_endpoint", ""),
                 s3_region=settings.get("s3_region", ""), s3_ca_bundle=settings.get("s3_ca_bundle", ""))
    st = Stores(cfg).store(secrets)
    budget = max(1.0, float(settings["fetch_timeout"]) / 2)
    st.retry = dataclasses.replace(st.retry, deadline_s=min(st.retry.deadline_s, budget))
    return st


class _Fetcher:
    """fetch_chunk on a store opened once, in the background from the server's start (boto3's
    import and client set-up take ~0.3 s on a node, over a minute under emulation: the FUSE
    mount does not wait for it). `ready` is set when the store is open or its opening failed;
    the control socket reports it, and the plugin waits for it before the first read of the
    device, with its own timeout and a clear error, not a probe tool's."""

    def __init__(self, settings: dict[str, Any], secrets: dict[str, str], chunk_size: int,
                 opened: Callable[[], ObjectStore] | None = None):
        self.settings, self.secrets, self.chunk_size = settings, secrets, chunk_size
        self._opened = opened               # the spare's store, opened before the job came
        self.timeout = float(settings["fetch_timeout"])
        self._store: Any = None
        self.error = ""                     # why the store could not be opened
        self.ready = threading.Event()
        self.stopping = threading.Event()   # set at shutdown: fetches stop retrying
        self._mu = threading.Lock()
        self._local = threading.local()

    def open(self) -> None:
        with self._mu:
            if self._store is not None:
                return
            t0 = time.monotonic()
            try:
                if self._opened is not None:
                    self._store = self._opened()
                    log.info("object store: the one the spare opened before the job (%.2fs more)",
                             time.monotonic() - t0)
                else:
                    self._store = _store(self.settings, self.secrets)
                    log.info("object store opened in %.2fs", time.monotonic() - t0)
            except Exception as e:      # reported on the control socket; reads get EIO
                self.error = f"{type(e).__name__}: {e}"
                log.error("cannot open the object store (after %.2fs): %s", time.monotonic() - t0, self.error)
            finally:
                self.ready.set()

    def store(self) -> Any:
        self.open()
        if self._store is None:
            raise FetchTimeout(f"the object store could not be opened: {self.error}")
        return self._store

    def status(self) -> dict[str, Any]:
        return {"store_ready": self.ready.is_set() and self._store is not None, "store_error": self.error}

    def _landing(self) -> memoryview | None:
        """The background pool thread's reused GET buffer, placed as the hydrate's
        (stages.ChunkFetcher._landing: a raw chunk's payload starts on a page, so the O_DIRECT
        fill goes from it without a copy or a new 4 MiB object per chunk). The view it returns is
        written by the same thread before its next fetch (LazyVolume._fill). None on libfuse's
        threads: each FUSE callback comes with a fresh thread state, so a per-thread buffer
        would be a new one per on-demand fill."""
        if not threading.current_thread().name.startswith(POOL):
            return None
        mv: memoryview | None = getattr(self._local, "landing", None)
        if mv is None:           # goes with the thread (the pool's threads end with its round)
            m = mmap.mmap(-1, LANDING_ALIGN + self.chunk_size + LANDING_SLACK)
            mv = self._local.landing = memoryview(m)[LANDING_ALIGN - 1:]
        return mv

    def __call__(self, h: str) -> bytes | memoryview:
        return fetch_chunk(self.store(), h, self.chunk_size, self.timeout, stop=self.stopping,
                           landing=self._landing())


def _age() -> float:
    """Seconds since this process started (its start time in /proc, in clock ticks since boot)."""
    from .manager import proc_start_time
    with open("/proc/uptime", encoding="ascii") as f:
        up = float(f.read().split()[0])
    return up - proc_start_time(os.getpid()) / os.sysconf("SC_CLK_TCK")


def _pidfile(d: Path) -> None:
    from .manager import proc_start_time
    data = json.dumps({"pid": os.getpid(), "start": proc_start_time(os.getpid())}).encode()
    from ..atomic import write_atomic
    write_atomic(d / "server.pid", data)


def serve(d: Path, secrets: dict[str, str], early: _EarlyStore | None = None) -> int:
    settings = json.loads((d / "server.json").read_text())
    manifest = Manifest.decode((d / "manifest").read_bytes())
    state = HydrationState.load(str(d / "state.json"))
    opened = early.get if early is not None and early.fits(settings, secrets) else None
    fetcher = _Fetcher(settings, secrets, manifest.chunk_size, opened)
    # open the store while the mount comes up (the first fetches would wait for it otherwise)
    threading.Thread(target=fetcher.open, name="open-store", daemon=True).start()
    pending = _PendingVolume(settings, lambda disk: LazyVolume(
        disk, manifest, state, str(d / "state.json"), fetcher, int(settings.get("workers", 8))),
        manifest, fetcher)
    if not settings.get("disk_pending"):
        pending.open(settings["disk"])
    stop = threading.Event()
    ctl = threading.Thread(target=_control, args=(pending, state, fetcher, settings["socket"], stop),
                           daemon=True)
    ctl.start()
    mnt = d / "mnt"
    mnt.mkdir(exist_ok=True)
    _pidfile(d)
    log.info("serving %s (%d chunks, %d missing) at %s%s", settings["disk"], state.chunks,
             state.missing_count, mnt / FILE,
             "" if pending.is_open else f"; {pending.planned_size} bytes, the disk opens when the plugin asks")
    try:
        mfusepy.FUSE(_Ops(pending), str(mnt), foreground=True, nothreads=False, fsname="perssd-lazy",
                     subtype="perssd", default_permissions=True,
                     attr_timeout=0, entry_timeout=0)
    finally:
        stop.set()
        fetcher.stopping.set()
        vol = pending.peek()
        if vol is not None:
            vol.stop()
            vol.close()
        (d / "server.pid").unlink(missing_ok=True)
        log.info("stopped: %s", json.dumps(_status(pending, state)))
    return 0


EARLY_STORE_WAIT_S = 60.0


class _EarlyStore:
    """The object store a spare opens before its job comes, with the node's store settings and
    no secrets (credentials from the node's environment): a job with the same settings and no
    secrets of its own takes it, so its first read does not wait for the S3 client's set-up
    (~0.05 s on a node, ~0.9 s under emulation). Any other job opens its own."""

    KEYS = ("catalog", "s3_endpoint", "s3_region", "s3_ca_bundle", "fetch_timeout")

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self._store: ObjectStore | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        threading.Thread(target=self._open, name="early-store", daemon=True).start()

    def _open(self) -> None:
        try:
            self._store = _store(self.settings, {})
        except BaseException as e:       # the job opens its own (and reports its error)
            self._error = e
        finally:
            self._done.set()

    def fits(self, settings: dict[str, Any], secrets: dict[str, str]) -> bool:
        return not secrets and all(settings.get(k) == self.settings.get(k) for k in self.KEYS)

    def wait(self, timeout: float) -> None:
        self._done.wait(timeout)

    def get(self) -> ObjectStore:
        self._done.wait()
        if self._store is None:
            raise self._error or RuntimeError("the spare's object store did not open")
        return self._store


def _spare() -> int:
    """A warm spare (`--spare`): import and set up everything serving needs (the S3 client's
    model: ~0.3 s on a node, over a minute on the VM rig's 9p root), read the node's store
    settings (the first line on stdin, {"store": {...}}) and open that store, then wait for one
    job on stdin, {"dir": DIR, "secrets": {...}}, and serve it with its output in
    DIR/server.log. EOF (the plugin that started it is gone, or stops) ends it unused."""
    from ..remote import s3
    s3.warm()
    first = sys.stdin.readline()
    if not first.strip():
        return 0
    early = _EarlyStore(json.loads(first)["store"])
    early.wait(EARLY_STORE_WAIT_S)      # warm = its store open too (a job meanwhile waits in the pipe)
    log.info("spare warm, %.2fs after exec", _age())
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    job = json.loads(line)
    d = Path(job["dir"])
    fd = os.open(d / "server.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    log.info("spare %d (started %.2fs ago) serves %s", os.getpid(), _age(), d)
    return serve(d, job.get("secrets") or {}, early)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m csi_perssd.lazy.server DIR (secrets as JSON on stdin) | --spare",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("started, %.2fs after exec (interpreter and imports)", _age())
    if args[0] == "--spare":
        return _spare()
    raw = sys.stdin.read() if not sys.stdin.isatty() else ""
    secrets = json.loads(raw) if raw.strip() else {}
    return serve(Path(args[0]), secrets)


if __name__ == "__main__":
    sys.exit(main())
