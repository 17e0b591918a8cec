"""Byte ranges of a volume: the one type the local side (allocated and changed ranges) and the
remote side (which chunks a flush reads) share, so neither imports the other."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Extent:
    """A byte range [offset, offset+length) of a volume."""
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length
