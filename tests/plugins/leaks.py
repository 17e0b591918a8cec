"""Fails the run when a test module leaves a mount or a loop device behind (and cleans it up).

Only what lives under this pytest session's base temp directory counts, so concurrent runs
(or the driver's own volumes elsewhere on the machine) are never touched."""
from __future__ import annotations

import os
import subprocess

import pytest


def _mounts_under(root: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == root or mp.startswith(root + "/"):
                out.append(mp)
    return out


def _loops_under(root: str) -> list[tuple[str, str]]:
    res = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True)
    out = []
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        parts = line.split(None, 1)
        if len(parts) == 2:
            back = parts[1].strip().removesuffix(" (deleted)")
            if back.startswith(root + "/"):
                out.append((parts[0], back))
    return out


@pytest.fixture(autouse=True, scope="module")
def no_leaks_after_module(tmp_path_factory: pytest.TempPathFactory):
    root = os.path.realpath(tmp_path_factory.getbasetemp())
    before_m, before_l = set(_mounts_under(root)), set(_loops_under(root))
    yield
    leaked_m = [m for m in _mounts_under(root) if m not in before_m]
    leaked_l = [l for l in _loops_under(root) if l not in before_l]
    for m in sorted(leaked_m, key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)
    for dev, _ in leaked_l:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    if leaked_m or leaked_l:
        pytest.fail(f"test module leaked mounts {leaked_m} / loop devices {leaked_l}", pytrace=False)
