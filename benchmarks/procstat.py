"""Resource use of processes: CPU seconds and peak RSS of a running process (the node), and of
a finished child (a peer tool, via wait4's rusage)."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process plus its waited-for children (subprocesses it ran)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after "pid (comm)": state=0 ... utime=11 stime=12 cutime=13 cstime=14
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Watch:
    """Measure one phase of a running process: CPU seconds and peak RSS (VmHWM after a reset,
    cross-checked by polling VmRSS)."""
    pid: int
    interval: float = 0.02
    cpu0: float = 0.0
    cpu: float = 0.0
    peak_rss_bytes: int = 0
    polled_peak_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _hwm_ok: bool = False

    def __enter__(self) -> Watch:
        self._hwm_ok = reset_peak(self.pid)
        self.cpu0 = cpu_seconds(self.pid)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.polled_peak_bytes = max(self.polled_peak_bytes, status_kib(self.pid, "VmRSS") * 1024)
            except OSError:
                return
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.cpu = cpu_seconds(self.pid) - self.cpu0
        hwm = status_kib(self.pid, "VmHWM") * 1024 if self._hwm_ok else 0
        self.peak_rss_bytes = max(hwm, self.polled_peak_bytes)


@dataclass
class ChildRun:
    argv: list[str]
    returncode: int
    seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    stdout: str
    stderr: str


def run_child(argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
              timeout: float = 3600.0) -> ChildRun:
    """Run argv, wait with wait4 to get its own CPU time and peak RSS; raises on failure."""
    out_r, err_r = os.pipe(), os.pipe()
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_r[1], stderr=err_r[1], env=env, cwd=cwd)
    os.close(out_r[1])
    os.close(err_r[1])
    chunks: dict[int, list[bytes]] = {out_r[0]: [], err_r[0]: []}

    def drain(fd: int) -> None:
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks[fd].append(b)
        os.close(fd)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in chunks]
    for r in readers:
        r.start()
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    # peak RSS: poll the child's VmHWM (rusage's ru_maxrss is no use here: Linux carries the
    # forking parent's high-water mark across exec, so a small tool reports the runner's size)
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], status_kib(p.pid, "VmHWM") * 1024)
            except (OSError, ValueError):
                pass
            done.wait(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        done.set()
        timer.cancel()
        poller.join()
    dt = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    res = ChildRun(argv=argv, returncode=p.returncode, seconds=dt, cpu_seconds=ru.ru_utime + ru.ru_stime,
                   peak_rss_bytes=peak[0],
                   stdout=b"".join(chunks[out_r[0]]).decode(errors="replace"),
                   stderr=b"".join(chunks[err_r[0]]).decode(errors="replace"))
    if res.returncode != 0:
        raise RuntimeError(f"{argv[0]} {' '.join(argv[1:3])}... exited {res.returncode}: "
                           f"{res.stderr.strip()[-2000:]}")
    return res


__all__ = ["ChildRun", "Watch", "cpu_seconds", "reset_peak", "run_child", "status_kib"]
