"""Fails the run when a test module leaves a mount or a loop device behind (and cleans it up).

Only what lives under this pytest session's base temp directory counts, so concurrent runs
(or the driver's own volumes elsewhere on the machine) are never touched."""
from __future__ import annotations

import os

import pytest

from tests.harness.cleanup import cleanup_under, loops_under, mounts_under


@pytest.fixture(autouse=True, scope="module")
def no_leaks_after_module(tmp_path_factory: pytest.TempPathFactory):
    root = os.path.realpath(tmp_path_factory.getbasetemp())
    before = set(mounts_under(root)) | set(loops_under(root))
    yield
    leaked = [x for x in mounts_under(root) + loops_under(root) if x not in before]
    if leaked:
        try:
            cleanup_under(root)
        finally:
            pytest.fail(f"test module leaked mounts/loop devices {leaked}", pytrace=False)
