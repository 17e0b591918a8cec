"""The flush journal: an append-only record of the finished chunks of one flush, so a
restarted flush resumes where it stopped.

One line per finished chunk "<index> <hash|-> <stored size>" after its upload succeeded,
fsync'd about once a second, under a JSON header of the flush's parameters (size, chunk size,
base). A journal written for other parameters is discarded; a torn last line is dropped.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from .chunks import check_hash, chunk_count

log = logging.getLogger(__name__)
JOURNAL_VERSION = 1
JOURNAL_SYNC_S = 1.0


class Journal:
    """Append-only record of finished chunks of one flush (see the module docstring)."""

    def __init__(self, path: str, header: dict[str, Any]):
        self.path = path
        self.header = {"v": JOURNAL_VERSION, **header}
        self.entries: dict[int, tuple[str | None, int]] = {}
        self._load()
        fresh = not os.path.exists(path) or not self._loaded_ok
        self._f = open(path, "w" if fresh else "a", encoding="ascii")
        if fresh:
            self.entries.clear()
            self._f.write(json.dumps(self.header, sort_keys=True) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        self._last_sync = time.monotonic()

    def _load(self) -> None:
        self._loaded_ok = False
        try:
            with open(self.path, encoding="ascii", errors="replace") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return
        try:
            if json.loads(lines[0]) != json.loads(json.dumps(self.header, sort_keys=True)):
                log.info("flush journal %s is for other parameters: starting over", self.path)
                return
        except ValueError:
            return
        n = chunk_count(self.header["size"], self.header["chunk_size"])
        for line in lines[1:-1]:        # the last piece is "" or a torn line
            try:
                i_s, h, sz_s = line.split(" ")
                i, sz = int(i_s), int(sz_s)
                if not 0 <= i < n or sz < 0:
                    raise ValueError(line)
                self.entries[i] = (None if h == "-" else check_hash(h), sz)
            except ValueError:
                log.warning("flush journal %s: ignoring malformed line %r", self.path, line[:100])
        self._loaded_ok = True
        if lines[-1]:                   # torn last line: rewrite the file cleanly
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(json.dumps(self.header, sort_keys=True) + "\n")
            for i, (h, sz) in sorted(self.entries.items()):
                f.write(f"{i} {h or '-'} {sz}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, index: int, h: str | None, stored: int) -> None:
        self.entries[index] = (h, stored)
        self._f.write(f"{index} {h or '-'} {stored}\n")
        if time.monotonic() - self._last_sync >= JOURNAL_SYNC_S:
            self.sync()

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()
