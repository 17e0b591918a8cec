"""The node plugin's side of lazy hydration: one serving process per lazily staged volume.

    STATE_DIR/lazy/<vid>/          server.json, manifest, state.json, server.pid, server.log, mnt/
    STATE_DIR/lazy/<digest>.sock   its control socket (short: unix socket paths are limited)

`begin` records what to serve (before the server starts, so a crash in between resumes),
`ensure_server` adopts a running server (plugin restart) or starts one (node restart, restage),
`device` attaches the loop device on the served file, `release` detaches it and stops the server
(hydration state kept: a later stage on this node resumes), `discard` forgets the volume.
A volume whose state says complete no longer needs a server: `finish_if_complete` drops the
directory at release, and the next stage attaches the plain local file (native speed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .. import ids
from ..errors import Code, CsiError, internal
from ..local import fs, loop
from ..local.backend import Extent, Planned
from ..remote.manifest import Manifest
from . import dm
from .server import FILE
from .state import HydrationState, StateError

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0           # until the FUSE mount is up: a cold start under emulation (the VM rig) takes ~40 s
# until a new server has its object store open (the S3 client's set-up): ~0.3 s on a node, 60-100 s
# cold under the VM rig's emulation; it bounds a broken start only (the wait holds no shared lock)
STORE_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0
# the next spare is started this long after a lazy stage, not during it: its interpreter start,
# imports and S3 model load (~0.5 s of CPU) took a core from the new server's first second of
# hydration (256 MiB background-only, 4 pairs each, load 1.1-1.6: 0.42-1.01x of the full hydrate,
# median ~0.55, spawned at once; 0.64-0.76x, median ~0.72, spawned 3 s later)
SPARE_DELAY_S = 2.0


def proc_start_time(pid: int) -> int:
    """Start time of a process in clock ticks since boot (tells a reused pid apart); 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


class LazyManager:
    def __init__(self, state_dir: str, store_settings: dict[str, str], fetch_timeout: float = 60.0,
                 workers: int = 8, spare: bool = False, spare_delay: float = SPARE_DELAY_S):
        self.root = Path(state_dir) / "lazy"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store_settings = dict(store_settings)
        self.fetch_timeout = fetch_timeout
        self.workers = workers
        self._mu = threading.Lock()
        # a warm spare server process (imports and S3 model loaded: the cost of a server's start,
        # ~0.5 s on a node, minutes under emulation), kept from the first lazy stage on, or from
        # the start with spare=True (the node's default is lazy)
        self._spare: subprocess.Popen[bytes] | None = None
        self._spare_mu = threading.Lock()
        self.spare_delay = spare_delay
        self._spare_timer: threading.Timer | None = None
        if spare:
            self.keep_spare()

    def _popen(self, arg: str, logf: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "csi_perssd.lazy.server", arg],
                                stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, cwd="/")
        threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
        return proc

    def keep_spare(self) -> None:
        """Start a spare server unless one is there (it warms up in the background; it ends when
        this process closes its stdin: at exit, or by stop_spare)."""
        with self._spare_mu:
            if self._spare is not None and self._spare.poll() is None:
                return
            with open(self.root / "spare.log", "ab") as logf:
                proc = self._popen("--spare", logf)
            assert proc.stdin is not None
            try:        # the store it opens while it waits (a job with no secrets of its own takes it)
                store = {**self.store_settings, "fetch_timeout": self.fetch_timeout}
                proc.stdin.write(json.dumps({"store": store}).encode() + b"\n")
                proc.stdin.flush()
            except OSError as e:
                log.warning("the spare lazy server %d is gone at its start: %s", proc.pid, e)
                return
            self._spare = proc

    @property
    def spare_pid(self) -> int:
        """The warm spare's pid, 0 without one."""
        with self._spare_mu:
            proc = self._spare
        return proc.pid if proc is not None and proc.poll() is None else 0

    def _take_spare(self) -> subprocess.Popen[bytes] | None:
        with self._spare_mu:
            proc, self._spare = self._spare, None
        return proc if proc is not None and proc.poll() is None else None

    def _keep_spare_later(self) -> None:
        """keep_spare, SPARE_DELAY_S from now (one pending at a time; at once with no delay)."""
        if self.spare_delay <= 0:
            self.keep_spare()
            return
        with self._spare_mu:
            if self._spare_timer is not None and self._spare_timer.is_alive():
                return
            self._spare_timer = threading.Timer(self.spare_delay, self.keep_spare)
            self._spare_timer.daemon = True
            self._spare_timer.start()

    def stop_spare(self) -> None:
        with self._spare_mu:
            timer, self._spare_timer = self._spare_timer, None
        if timer is not None:
            timer.cancel()
        proc = self._take_spare()
        if proc is not None and proc.stdin is not None:
            proc.stdin.close()          # EOF: it ends unused
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()

    # -- paths ------------------------------------------------------------------------------
    def dir(self, vid: str) -> Path:
        return self.root / ids.volume_id(vid)

    def socket_path(self, vid: str) -> str:
        return str(self.root / f"{hashlib.sha256(vid.encode()).hexdigest()[:16]}.sock")

    def file(self, vid: str) -> str:
        return str(self.dir(vid) / "mnt" / FILE)

    def state_path(self, vid: str) -> str:
        return str(self.dir(vid) / "state.json")

    def active(self, vid: str) -> bool:
        """The volume is lazily staged here and not fully hydrated yet (or not known to be)."""
        return (self.dir(vid) / "state.json").is_file()

    def state(self, vid: str) -> HydrationState | None:
        try:
            return HydrationState.load(self.state_path(vid))
        except StateError:
            return None

    # -- lifecycle ----------------------------------------------------------------------------
    def begin(self, vid: str, disk: str, manifest: Manifest, planned: Planned | None = None) -> None:
        """Record a lazy stage of `manifest` into the local volume `disk` (fresh, sparse). With
        `planned` the local volume is still being made (disk is its planned path): the server
        serves the planned size and opens the disk at open_disk()."""
        d = self.dir(vid)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        from ..atomic import write_atomic
        write_atomic(d / "manifest", manifest.encode())
        settings: dict[str, Any] = {**self.store_settings, "disk": disk, "socket": self.socket_path(vid),
                                    "fetch_timeout": self.fetch_timeout, "workers": self.workers}
        if planned is not None:
            settings.update(size=planned.size, sector_size=planned.sector_size, disk_pending=True)
        self._write_settings(vid, settings)
        HydrationState.for_manifest(manifest).save(self.state_path(vid))

    def _settings(self, vid: str) -> dict[str, Any]:
        settings: dict[str, Any] = json.loads((self.dir(vid) / "server.json").read_text())
        return settings

    def _write_settings(self, vid: str, settings: dict[str, Any]) -> None:
        from ..atomic import write_atomic
        write_atomic(self.dir(vid) / "server.json", json.dumps(settings, sort_keys=True).encode())

    def start_early(self, vid: str, secrets: dict[str, str]) -> Future[None]:
        """Start the server of a volume begun with `planned` on another thread, until it serves
        its file with its object store open, while the caller makes the local volume; the future
        gives the outcome. The caller then calls open_disk(), or discard() when the volume was not
        made. The devices come after the open (device()): a block device on the file before it
        would be read by the volume's own lvcreate, which scans every block device, and such a
        read is answered by a fetch from the object store."""
        fut: Future[None] = Future()
        fut.set_running_or_notify_cancel()

        def run() -> None:
            try:
                self.ensure_server(vid, secrets)
                fut.set_result(None)
            except BaseException as e:      # handed to the caller
                fut.set_exception(e)
        threading.Thread(target=run, name=f"lazy-start-{vid}"[:60], daemon=True).start()
        return fut

    def open_disk(self, vid: str, disk: str) -> None:
        """The local volume of a stage begun with `planned` exists now at `disk`: the server opens
        it and starts hydrating; server.json names it from now on (a restarted server opens it at
        once). INTERNAL when the server refuses it (another size than planned) or does not answer."""
        reply = self.request(vid, "open_disk", timeout=30, disk=disk)
        if not reply or not reply.get("ok") or not reply.get("disk_open"):
            why = (reply or {}).get("error") or "no answer"
            raise internal(f"volume {vid}: the lazy hydration server did not open the local volume {disk}: {why}")
        settings = self._settings(vid)
        settings["disk"] = disk
        settings.pop("disk_pending", None)
        self._write_settings(vid, settings)

    def _pid(self, vid: str) -> int:
        """The pid of the volume's live server, 0 if there is none."""
        try:
            rec = json.loads((self.dir(vid) / "server.pid").read_text())
            pid, start = int(rec["pid"]), int(rec["start"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        return pid if start and proc_start_time(pid) == start else 0

    def request(self, vid: str, op: str = "status", timeout: float = 30.0, **args: Any) -> dict[str, Any] | None:
        """Ask the live server; None when it does not answer."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.socket_path(vid))
                s.sendall(json.dumps({**args, "op": op}).encode() + b"\n")
                line = s.makefile("rb").readline()
            reply: dict[str, Any] = json.loads(line)
            return reply
        except (OSError, ValueError):
            return None

    def serving(self, vid: str) -> bool:
        mnt = str(self.dir(vid) / "mnt")
        return self._pid(vid) != 0 and fs.mount_info(mnt) is not None and os.path.exists(self.file(vid))

    def _start(self, vid: str, secrets: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start the volume's server (the warm spare if there is one) and wait for its mount."""
        d = self.dir(vid)
        t0 = time.monotonic()
        proc = self._take_spare()
        if proc is not None:            # warm (or warming): it takes the job
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps({"dir": str(d), "secrets": secrets}).encode() + b"\n")
                proc.stdin.close()
                log.info("volume %s: the spare lazy server %d takes it", vid, proc.pid)
            except OSError as e:        # it died meanwhile: a cold start
                log.warning("volume %s: the spare lazy server %d is gone (%s): starting one", vid, proc.pid, e)
                proc = None
        if proc is None:
            with open(d / "server.log", "ab") as logf:
                proc = self._popen(str(d), logf)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(secrets).encode())
            proc.stdin.close()
        self._keep_spare_later()        # lazy stages happen here: the next one finds a warm spare
        deadline = t0 + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.serving(vid):
                log.info("volume %s: lazy server %d serving %s after %.2fs", vid, proc.pid, self.file(vid),
                         time.monotonic() - t0)
                return proc
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        raise internal(f"volume {vid}: the lazy hydration server did not come up: {self._log_tail(vid, 5)}")

    def _wait_store(self, vid: str, proc: subprocess.Popen[bytes] | None, t0: float) -> None:
        """Until the new server has opened its object store (it does that beside the mount): the
        first read of the device (the file system probe) needs it. Past STORE_TIMEOUT_S
        UNAVAILABLE (the server keeps starting: a retried NodeStage adopts it and waits again)."""
        deadline = time.monotonic() + STORE_TIMEOUT_S
        while True:
            st = self.request(vid, "status", timeout=10) or {}
            if st.get("store_ready"):
                log.info("volume %s: lazy server %s ready (object store open) after %.2fs", vid,
                         st.get("pid"), time.monotonic() - t0)
                return
            if st.get("store_error"):
                raise CsiError(Code.UNAVAILABLE, f"volume {vid}: the lazy hydration server cannot open "
                               f"the object store: {st['store_error']}")
            if (proc is not None and proc.poll() is not None) or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise CsiError(Code.UNAVAILABLE, f"volume {vid}: the lazy hydration server has not opened the object "
                       f"store within {time.monotonic() - t0:.0f}s: {self._log_tail(vid, 3)}")

    def _log_tail(self, vid: str, lines: int) -> str:
        """The last lines of the volume's server.log, joined for an error message ('' if none)."""
        try:
            text = (self.dir(vid) / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-lines:])

    def _clear_stale(self, vid: str) -> None:
        """What a dead server left: loop devices on its file, its (disconnected) FUSE mount."""
        for dev in self.attached(vid):
            loop.detach(dev, force=True)
        mnt = str(self.dir(vid) / "mnt")
        if fs.mount_info(mnt) is not None:
            fs.run(["umount", "-l", mnt], what="umount -l (stale lazy server mount)")

    def ensure_server(self, vid: str, secrets: dict[str, str],
                      meanwhile: Callable[[], None] | None = None) -> bool:
        """Adopt the volume's running server or start one; True when a new one was started
        (devices on a dead server's file were detached: mounts on them must be redone).
        `meanwhile` runs once the server serves its file, while it may still be opening its
        object store (the device set-up: a read of the file waits for the store meanwhile)."""
        t0 = time.monotonic()
        proc = None
        with self._mu:
            st = self.request(vid, "status", timeout=10) if self.serving(vid) else None
            if st is None:
                pid = self._pid(vid)
                if pid:
                    log.warning("volume %s: lazy server %d does not answer: replacing it", vid, pid)
                    _kill(pid)
                self._clear_stale(vid)
                proc = self._start(vid, secrets)
        if meanwhile is not None:
            meanwhile()
        if st is None or not st.get("store_ready"):     # new, or still starting (a retried NodeStage)
            self._wait_store(vid, proc, t0)
        return st is None

    def device(self, vid: str, read_only: bool = False) -> str:
        """The loop device on the served file (direct I/O: no second page cache in FUSE); with
        device-mapper, the dm-linear device over it (switched to the local volume at completion)."""
        if not self.serving(vid):
            raise CsiError(Code.UNAVAILABLE, f"volume {vid}: its lazy hydration server is not running")
        dev = loop.attach(self.file(vid), direct_io=True, read_only=read_only, sector_size=self._sector_size(vid))
        if read_only or not dm.available():
            return dev
        if not dm.exists(vid):
            return dm.create(vid, dev)
        rdev = os.stat(dev).st_rdev
        if f" {os.major(rdev)}:{os.minor(rdev)} " not in f" {dm.table(vid)} ":
            dm.retarget(vid, dev)               # a restarted server: a new loop device under it
        return dm.path(vid)

    def written_path(self, vid: str) -> Path:
        return self.root / f"{ids.volume_id(vid)}.written.json"

    def written_before_switch(self, vid: str) -> list[Extent] | None:
        """Device-mapper path, after the switch: the ranges written on this node while the volume
        was lazily hydrated (the server and its state are gone; the next flush needs them with
        what changed on the local volume since `before_switch`). None when there was no switch."""
        try:
            raw = json.loads(self.written_path(vid).read_text())
            return [Extent(int(o), int(n)) for o, n in raw["extents"]]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise internal(f"volume {vid}: {self.written_path(vid)} is unreadable: {e}") from e

    def forget_written(self, vid: str) -> None:
        """A generation holding those writes was committed."""
        self.written_path(vid).unlink(missing_ok=True)

    def _sector_size(self, vid: str) -> int:
        """The served device's sector size: the local volume's when it is a block device (an LV:
        512 B; a file system made on it may use 1 KiB blocks, which a 4 KiB-sector device cannot
        mount, and after the switch the dm device maps the LV itself), else the loop default."""
        try:
            settings = self._settings(vid)
            if settings.get("sector_size"):         # planned: the disk may not exist yet
                return int(settings["sector_size"])
            disk = settings["disk"]
            if stat.S_ISBLK(os.stat(disk).st_mode):
                return fs.logical_sector_size(disk)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("volume %s: the local volume's sector size is unknown (%s): %d B", vid, e, loop.SECTOR_SIZE)
        return loop.SECTOR_SIZE

    def switch_if_complete(self, vid: str, local_device: str,
                           before_switch: Callable[[], None] | None = None) -> bool:
        """Device-mapper path: once hydration is complete, point the dm device at the local volume
        (suspend: in-flight I/O reaches the server; sync: its writes reach the disk; reload,
        resume), then retire the server. The file system stays mounted throughout.

        `before_switch` runs first (the node takes a snapshot of the local volume there: what
        changes after it is found by the backend's change tracking); the chunks written through
        the server up to the suspend are kept in written_path(vid), so the next flush reads
        only what was written on this node."""
        if not dm.available() or not dm.exists(vid):
            return False
        st = self.request(vid, "sync", timeout=30)
        if not st or not st.get("complete"):
            return False
        if before_switch is not None:
            before_switch()
        dm.retarget(vid, local_device,      # what the suspend flushed, on disk before the reload
                    while_suspended=lambda: self.request(vid, "sync", timeout=30))
        state = self.state(vid)                     # its dirty set, final: no write reached it after the suspend
        if state is None:
            raise internal(f"volume {vid}: its hydration state is unreadable after the switch")
        from ..atomic import write_atomic
        write_atomic(self.written_path(vid), json.dumps(
            {"generation": state.generation, "extents": [[e.offset, e.length] for e in state.dirty_extents()]}).encode())
        self.release(vid)                           # complete: the server goes, the state too
        fs.run(["blockdev", "--flushbufs", local_device], what="blockdev --flushbufs")
        log.info("volume %s: hydration complete; %s now maps the local volume %s directly",
                 vid, dm.path(vid), local_device)
        return True

    def refresh_size(self, vid: str) -> None:
        """After the local volume grew: the loop devices on the served file see the new size."""
        for dev in self.attached(vid):
            loop.refresh_size(dev)

    def attached(self, vid: str) -> list[str]:
        """Loop devices on the served file, by the path the kernel reports (no stat: the file of
        a dead server cannot be stat'ed)."""
        f = os.path.join(os.path.realpath(self.dir(vid)), "mnt", FILE)
        return sorted(d.name for d in loop.devices() if d.back_file.removesuffix(" (deleted)") == f)

    def release_all(self, vid: str) -> None:
        """NodeUnstage (after unmount): the dm device, then the loop devices and the server."""
        if dm.available():
            dm.remove(vid)
        if self.dir(vid).exists():
            self.release(vid)

    def release(self, vid: str) -> None:
        """Detach the loop devices (refused while in use) and stop the server; state kept."""
        with self._mu:
            for dev in self.attached(vid):
                loop.detach(dev)
            pid = self._pid(vid)
            mnt = str(self.dir(vid) / "mnt")
            if fs.mount_info(mnt) is not None:
                fs.run(["umount", mnt], what="umount (lazy server mount)")
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while pid and proc_start_time(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid and proc_start_time(pid):
                _kill(pid)
            st = self.state(vid)
            if st is not None and st.complete:
                log.info("volume %s: fully hydrated; the next stage uses the local volume directly", vid)
                shutil.rmtree(self.dir(vid), ignore_errors=True)

    def discard(self, vid: str) -> None:
        """Forget the volume's lazy state (its local copy is being deleted)."""
        if not self.dir(vid).exists():
            self.forget_written(vid)
            return
        with self._mu:
            if dm.available():
                dm.remove(vid)
            for dev in self.attached(vid):
                loop.detach(dev, force=True)
            pid = self._pid(vid)
            if pid:
                _kill(pid)
            mnt = str(self.dir(vid) / "mnt")
            if fs.mount_info(mnt) is not None:
                fs.run(["umount", "-l", mnt], what="umount -l (lazy server mount)")
            shutil.rmtree(self.dir(vid), ignore_errors=True)
            Path(self.socket_path(vid)).unlink(missing_ok=True)
            self.forget_written(vid)

    def changed_extents(self, vid: str) -> list[Extent] | None:
        """For a flush or snapshot of a volume not fully hydrated: the ranges written on this node
        (everything else keeps the manifest's entries). None when the volume is not lazy."""
        if not self.active(vid):
            return None
        if self._pid(vid) and self.request(vid, "sync") is None:
            raise CsiError(Code.UNAVAILABLE, f"volume {vid}: the lazy server does not answer")
        st = self.state(vid)
        if st is None:
            raise internal(f"volume {vid}: its hydration state is unreadable")
        return st.dirty_extents()

    def status(self, vid: str) -> dict[str, Any] | None:
        if self._pid(vid):
            return self.request(vid, "status", timeout=5)
        st = self.state(vid)
        return None if st is None else {"missing": st.missing_count, "complete": st.complete,
                                        "on_demand": st.on_demand, "background": st.background}


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
