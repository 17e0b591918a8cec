"""Byte-exact writes for tests: the data at `offset` of a file or block device, fsynced."""
from __future__ import annotations

import os


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
