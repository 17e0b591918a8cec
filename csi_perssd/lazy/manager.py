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
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .. import ids
from ..errors import Code, CsiError, internal
from ..local import fs, loop
from ..local.backend import Extent
from ..remote.manifest import Manifest
from . import dm
from .server import FILE
from .state import HydrationState, StateError

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0           # a cold start under emulation (the VM rig) takes ~20 s
STOP_TIMEOUT_S = 20.0


def proc_start_time(pid: int) -> int:
    """Start time of a process in clock ticks since boot (tells a reused pid apart); 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


class LazyManager:
    def __init__(self, state_dir: str, store_settings: dict[str, str], fetch_timeout: float = 60.0,
                 workers: int = 16):
        self.root = Path(state_dir) / "lazy"
        self.root.mkdir(parents=True, exist_ok=True)
        self.store_settings = dict(store_settings)
        self.fetch_timeout = fetch_timeout
        self.workers = workers
        self._mu = threading.Lock()

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
    def begin(self, vid: str, disk: str, manifest: Manifest) -> None:
        """Record a lazy stage of `manifest` into the local volume `disk` (fresh, sparse)."""
        d = self.dir(vid)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        from ..atomic import write_atomic
        write_atomic(d / "manifest", manifest.encode())
        settings = {**self.store_settings, "disk": disk, "socket": self.socket_path(vid),
                    "fetch_timeout": self.fetch_timeout, "workers": self.workers}
        write_atomic(d / "server.json", json.dumps(settings, sort_keys=True).encode())
        HydrationState.for_manifest(manifest).save(self.state_path(vid))

    def _pid(self, vid: str) -> int:
        """The pid of the volume's live server, 0 if there is none."""
        try:
            rec = json.loads((self.dir(vid) / "server.pid").read_text())
            pid, start = int(rec["pid"]), int(rec["start"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        return pid if start and proc_start_time(pid) == start else 0

    def request(self, vid: str, op: str = "status", timeout: float = 30.0) -> dict[str, Any] | None:
        """Ask the live server; None when it does not answer."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.socket_path(vid))
                s.sendall(json.dumps({"op": op}).encode() + b"\n")
                line = s.makefile("rb").readline()
            reply: dict[str, Any] = json.loads(line)
            return reply
        except (OSError, ValueError):
            return None

    def serving(self, vid: str) -> bool:
        mnt = str(self.dir(vid) / "mnt")
        return self._pid(vid) != 0 and fs.mount_info(mnt) is not None and os.path.exists(self.file(vid))

    def _start(self, vid: str, secrets: dict[str, str]) -> None:
        d = self.dir(vid)
        with open(d / "server.log", "ab") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "csi_perssd.lazy.server", str(d)],
                                    stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, cwd="/")
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(secrets).encode())
        proc.stdin.close()
        threading.Thread(target=proc.wait, name=f"reap-{vid}", daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.serving(vid):
                log.info("volume %s: lazy server %d serving %s", vid, proc.pid, self.file(vid))
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = (d / "server.log").read_text(errors="replace").splitlines()[-5:]
        if proc.poll() is None:
            proc.kill()
        raise internal(f"volume {vid}: the lazy hydration server did not come up: {' | '.join(tail)}")

    def _clear_stale(self, vid: str) -> None:
        """What a dead server left: loop devices on its file, its (disconnected) FUSE mount."""
        for dev in self.attached(vid):
            loop.detach(dev, force=True)
        mnt = str(self.dir(vid) / "mnt")
        if fs.mount_info(mnt) is not None:
            fs.run(["umount", "-l", mnt], what="umount -l (stale lazy server mount)")

    def ensure_server(self, vid: str, secrets: dict[str, str]) -> bool:
        """Adopt the volume's running server or start one; True when a new one was started
        (devices on a dead server's file were detached: mounts on them must be redone)."""
        with self._mu:
            if self.serving(vid) and self.request(vid, "status", timeout=10) is not None:
                return False
            pid = self._pid(vid)
            if pid:
                log.warning("volume %s: lazy server %d does not answer: replacing it", vid, pid)
                _kill(pid)
            self._clear_stale(vid)
            self._start(vid, secrets)
            return True

    def device(self, vid: str, read_only: bool = False) -> str:
        """The loop device on the served file (direct I/O: no second page cache in FUSE); with
        device-mapper, the dm-linear device over it (switched to the local volume at completion)."""
        if not self.serving(vid):
            raise CsiError(Code.UNAVAILABLE, f"volume {vid}: its lazy hydration server is not running")
        dev = loop.attach(self.file(vid), direct_io=True, read_only=read_only)
        if read_only or not dm.available():
            return dev
        if not dm.exists(vid):
            return dm.create(vid, dev)
        rdev = os.stat(dev).st_rdev
        if f" {os.major(rdev)}:{os.minor(rdev)} " not in f" {dm.table(vid)} ":
            dm.retarget(vid, dev)               # a restarted server: a new loop device under it
        return dm.path(vid)

    def switch_if_complete(self, vid: str, local_device: str) -> bool:
        """Device-mapper path: once hydration is complete, point the dm device at the local volume
        (suspend: in-flight I/O reaches the server; sync: its writes reach the disk; reload,
        resume), then retire the server. The file system stays mounted throughout."""
        if not dm.available() or not dm.exists(vid):
            return False
        st = self.request(vid, "sync", timeout=30)
        if not st or not st.get("complete"):
            return False
        n = dm.name(vid)
        fs.run(["dmsetup", "suspend", "--noudevsync", n], what="dmsetup suspend")
        try:
            self.request(vid, "sync", timeout=30)       # what the suspend flushed, now on disk
            fs.run(["dmsetup", "reload", n, "--table", dm.linear(local_device)], what="dmsetup reload")
        finally:
            fs.run(["dmsetup", "resume", "--noudevsync", n], what="dmsetup resume")
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
