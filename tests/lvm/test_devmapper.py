"""libdevmapper in process (local/devmapper.py) against the VM's dm-mod, checked with dmsetup."""
from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_perssd.errors import Code, CsiError
from csi_perssd.local import devmapper, loop

MiB = 1 << 20


def dmsetup(*args: str) -> str:
    res = subprocess.run(["dmsetup", *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"dmsetup {args}: {res.stderr}"
    return res.stdout.strip()


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[list[str]]:
    devs = []
    for i, fill in enumerate((b"A", b"B")):
        f = tmp_path / f"d{i}"
        f.write_bytes(fill * (4 * MiB))
        devs.append(loop.attach(str(f), direct_io=False))
    try:
        yield devs
    finally:
        for d in devs:
            loop.detach(d, force=True)


def _rdev(dev: str) -> str:
    r = os.stat(dev).st_rdev
    return f"{os.major(r)}:{os.minor(r)}"


def test_create_reload_and_remove_agree_with_dmsetup(loops: list[str]) -> None:
    name = f"perssd-t-{uuid.uuid4().hex[:8]}"
    sectors = 4 * MiB // 512
    devmapper.create(name, [devmapper.Target(0, sectors, "linear", f"{loops[0]} 0")])
    try:
        want = f"0 {sectors} linear {_rdev(loops[0])} 0"
        assert dmsetup("table", name) == want
        assert [t.line() for t in devmapper.table(name)] == [want]
        assert [t.kind for t in devmapper.status(name)] == ["linear"]
        with pytest.raises(CsiError):                       # the name is taken
            devmapper.create(name, [devmapper.Target(0, sectors, "linear", f"{loops[1]} 0")])
        devmapper.suspend(name)
        assert "SUSPENDED" in dmsetup("info", name)
        devmapper.reload(name, [devmapper.Target(0, sectors, "linear", f"{loops[1]} 0")])
        devmapper.resume(name)
        assert dmsetup("table", name) == f"0 {sectors} linear {_rdev(loops[1])} 0"
        assert "ACTIVE" in dmsetup("info", name)
    finally:
        devmapper.remove(name)
    assert name not in dmsetup("ls")
    with pytest.raises(CsiError) as e:
        devmapper.table(name)
    assert e.value.code == Code.NOT_FOUND and name in e.value.message


def test_a_bad_table_is_refused_and_leaves_no_device(loops: list[str]) -> None:
    name = f"perssd-t-{uuid.uuid4().hex[:8]}"
    with pytest.raises(CsiError) as e:                      # no such device to map
        devmapper.create(name, [devmapper.Target(0, 16 * MiB // 512, "linear", "/dev/no-such-dev 0")])
    assert name in e.value.message
    assert name not in dmsetup("ls")
