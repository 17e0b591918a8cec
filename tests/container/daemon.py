"""A container daemon for the image tests: reuse one that answers, else start a private dockerd.

Order: $DOCKER_HOST, then the default socket; when neither answers, start Debian's dockerd with
its own socket, exec-root, pidfile and data-root (so it never clashes with a system daemon) and
`--iptables=false --ip6tables=false --bridge=none` (containers use the host network). The
data-root persists between runs: it is the cache of the test base and of the build layers.
A file lock serialises concurrent test sessions on one machine. stop() ends only a daemon this
process started, by its PID.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

RUN_DIR = Path(os.environ.get("PERSSD_DOCKER_RUN", "/run/csi-perssd-test"))
DATA_ROOT = Path(os.environ.get("PERSSD_DOCKER_ROOT", "/var/lib/csi-perssd-test/docker"))
START_TIMEOUT_S = 60.0
LOCK_TIMEOUT_S = 1800.0


class DaemonError(RuntimeError):
    pass


def docker_cli() -> str:
    """The docker client: $DOCKER, else the one shipped with Debian's dockerd, else PATH."""
    env = os.environ.get("DOCKER")
    if env:
        return env
    if Path("/usr/bin/docker").exists() and Path("/usr/sbin/dockerd").exists():
        return "/usr/bin/docker"
    found = shutil.which("docker")
    if not found:
        raise DaemonError("no docker client: apt-get install docker.io")
    return found


def answers(cli: str, host: str | None) -> bool:
    argv = [cli] + (["-H", host] if host else []) + ["info", "--format", "{{.ServerVersion}}"]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and bool(res.stdout.strip())


@dataclass
class Daemon:
    cli: str
    host: str                                  # -H value, e.g. unix:///run/.../docker.sock
    started_pid: int | None = None             # set when this process started dockerd
    log_path: Path | None = None
    _lock: IO[str] | None = field(default=None, repr=False)

    def argv(self, *args: str) -> list[str]:
        return [self.cli, "-H", self.host, *args]

    def run(self, *args: str, timeout: float = 120.0, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout,
                             input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise DaemonError(f"docker {' '.join(args[:3])} failed (exit {res.returncode}): "
                              f"{res.stderr.strip()[-3000:] or res.stdout.strip()[-3000:]}")
        return res

    def stop(self) -> None:
        if self.started_pid is not None:
            _terminate(self.started_pid)
            self.started_pid = None
            _unmount_exec_root()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _terminate(pid: int, timeout: float = 30.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid if not Path(f"/proc/{pid}").exists() else 0
        if done:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _unmount_exec_root() -> None:
    """dockerd leaves its default netns mount under the exec-root when it stops."""
    root = str(RUN_DIR / "exec")
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        mounts = [line.split()[4] for line in f if line.strip()]
    for m in sorted((m for m in mounts if m.startswith(root + "/")), key=len, reverse=True):
        subprocess.run(["umount", m], capture_output=True, timeout=30)


def _take_lock(path: Path) -> IO[str]:
    f = open(path, "a+")
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.close()
                raise DaemonError(f"another test session holds {path} for over {LOCK_TIMEOUT_S:.0f}s") from None
            time.sleep(2)


def connect() -> Daemon:
    """A daemon that answers: an existing one, or a private dockerd started here."""
    cli = docker_cli()
    for host in (os.environ.get("DOCKER_HOST"), "unix:///var/run/docker.sock"):
        if host and answers(cli, host):
            return Daemon(cli, host)
    return _start_private(cli)


def _start_private(cli: str) -> Daemon:
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists():
        raise DaemonError("no container daemon answers and dockerd is not installed "
                          "(apt-get install docker.io)")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    DATA_ROOT.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(RUN_DIR / "session.lock")
    sock = RUN_DIR / "docker.sock"
    host = f"unix://{sock}"
    if answers(cli, host):           # left running by a session that died: adopt (and stop) it
        pid = _read_pid(RUN_DIR / "docker.pid")
        return Daemon(cli, host, started_pid=pid, _lock=lock)
    log_path = RUN_DIR / "dockerd.log"
    argv = [dockerd, "--iptables=false", "--ip6tables=false", "--bridge=none",
            "-H", host, "--data-root", str(DATA_ROOT), "--exec-root", str(RUN_DIR / "exec"),
            "--pidfile", str(RUN_DIR / "docker.pid")]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    d = Daemon(cli, host, started_pid=proc.pid, log_path=log_path, _lock=lock)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            d.stop()
            raise DaemonError(f"dockerd exited with {proc.returncode}: {_tail(log_path)}")
        if answers(cli, host):
            return d
        time.sleep(0.5)
    d.stop()
    raise DaemonError(f"dockerd did not answer within {START_TIMEOUT_S:.0f}s: {_tail(log_path)}")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""
