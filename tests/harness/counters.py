"""A writer for crash-consistency tests of group snapshots: it writes n = 1, 2, ... (12 digits)
at the start of the file `counter` in each directory in turn, each write fsync'd before the
next one starts, so in any point-in-time copy of them all an earlier directory's counter is the
later one's or one more."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _write(dirs: list[str], stop: threading.Event, written: list[int]) -> None:
    fds = [os.open(os.path.join(d, "counter"), os.O_RDWR | os.O_CREAT, 0o644) for d in dirs]
    try:
        while not stop.is_set():
            n = written[0] + 1
            for fd in fds:
                os.pwrite(fd, f"{n:012d}".encode(), 0)
                os.fsync(fd)
            written[0] = n
    finally:
        for fd in fds:
            os.close(fd)


@contextmanager
def counting(dirs: list[str], at_least: int) -> Iterator[list[int]]:
    """Run the writer over `dirs`; enter once it has written `at_least` rounds, stop it on exit.
    Yields [rounds written so far] (still updated while the writer runs)."""
    stop, written = threading.Event(), [0]
    t = threading.Thread(target=_write, args=(dirs, stop, written), daemon=True)
    t.start()
    try:
        while written[0] < at_least:
            time.sleep(0.01)
        yield written
    finally:
        stop.set()
        t.join(10)


def read_counter(directory: str) -> int:
    with open(os.path.join(directory, "counter"), "rb") as f:
        return int(f.read(12))
