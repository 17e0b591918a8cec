"""Fails the run when a test leaves a mount or a loop device behind (and cleans it up)."""
from __future__ import annotations

import subprocess

import pytest


def _perssd_mounts() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if "perssd" in parts[4] or "pytest-of" in parts[4]:
                out.append(parts[4])
    return out


def _loops() -> list[str]:
    res = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True)
    return [l for l in res.stdout.splitlines() if l.strip()] if res.returncode == 0 else []


@pytest.fixture(autouse=True, scope="module")
def no_leaks_after_module():
    before_m, before_l = set(_perssd_mounts()), set(_loops())
    yield
    leaked_m = [m for m in _perssd_mounts() if m not in before_m]
    leaked_l = [l for l in _loops() if l not in before_l]
    for m in reversed(leaked_m):
        subprocess.run(["umount", "-l", m], capture_output=True)
    for l in leaked_l:
        subprocess.run(["losetup", "-d", l.split()[0]], capture_output=True)
    if leaked_m or leaked_l:
        pytest.fail(f"test module leaked mounts {leaked_m} / loop devices {leaked_l}", pytrace=False)
