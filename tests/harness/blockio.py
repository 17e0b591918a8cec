"""Byte-exact writes for tests, fsynced: the data at `offset` of a file or block device, or a whole file."""
from __future__ import annotations

import os
from pathlib import Path


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, data: bytes) -> None:
    """Create or truncate `path` and write `data` into it, fsynced."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
