"""The driver's external tools, derived from the package source (see toolscan)."""
from __future__ import annotations

from pathlib import Path

from csi_perssd.local import fs

from .toolscan import expand, scan_package

PACKAGE = Path(__file__).resolve().parents[2] / "csi_perssd"


def driver_tools() -> dict[str, set[str]]:
    """tool name -> the places (file:line) that call or declare it."""
    return expand(scan_package(PACKAGE), {"mkfs.{}": fs.MKFS_TYPES})
