"""Lazy hydration on the device-mapper path (inside the VM: dm-mod and fuse exist there).

A thin LV is staged lazily from a generation in a local object store: the file system is mounted
on a dm-linear device over the FUSE-served loop device; once every chunk is local, the table is
reloaded onto the LV itself (suspend, reload, resume) while the file system stays mounted and a
file stays open; the serving process and its state go away. fio figures (printed) compare the
dm device after the switch with the LV itself."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from csi_perssd.lazy import dm
from csi_perssd.lazy.manager import LazyManager
from csi_perssd.local import loop
from csi_perssd.local.lvm import LvmBackend
from csi_perssd import volume_io
from csi_perssd.remote.filestore import FileStore

MiB = 1 << 20
SIZE = 64 * MiB


def sh(*argv: str) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{argv}: {res.stderr}"
    return res.stdout


def _generation(tmp: Path) -> tuple[FileStore, object, dict[str, str]]:
    """An ext4 image holding two files, flushed to a FileStore: (store, manifest, sha256s)."""
    img = tmp / "src.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", str(img))        # loop devices use 4 KiB sectors
    mnt = tmp / "src"
    mnt.mkdir()
    files = {"a.bin": os.urandom(20 * MiB), "b.bin": os.urandom(8 * MiB)}
    dev = loop.attach(str(img), direct_io=False)
    try:
        sh("mount", dev, str(mnt))
        try:
            for name, data in files.items():
                (mnt / name).write_bytes(data)
        finally:
            sh("umount", str(mnt))
    finally:
        loop.detach(dev)
    store = FileStore(str(tmp / "store"))
    manifest, _ = volume_io.flush_path(store, str(img), SIZE, 4 * MiB)
    return store, manifest, {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}


def _fio(dev: str, rw: str, bs: str) -> float:
    out = sh("fio", "--name=j", f"--filename={dev}", f"--rw={rw}", f"--bs={bs}", "--direct=1",
             "--ioengine=libaio", "--iodepth=16", "--size=32M", "--runtime=4", "--time_based",
             "--readonly", "--output-format=json")
    job = json.loads(out)["jobs"][0]["read"]
    return float(job["iops"]) if bs == "4k" else float(job["bw_bytes"]) / 1e6


def test_dm_linear_moves_from_fuse_to_the_lv_without_unmounting(backend: LvmBackend, vid: str,
                                                                 tmp_path: Path):
    assert dm.available(), "the VM kernel has device-mapper"
    _, manifest, sums = _generation(tmp_path)
    backend.create(vid, SIZE)
    lv = backend.device(vid)
    mgr = LazyManager(str(tmp_path / "state"), {"catalog": f"file://{tmp_path / 'store'}"},
                      fetch_timeout=10, workers=0)              # on demand only: the test decides
    mgr.begin(vid, lv, manifest)                                # type: ignore[arg-type]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mgr.ensure_server(vid, {})
        dev = mgr.device(vid)
        assert dev == dm.path(vid)
        sh("mount", dev, str(mnt))
        held = open(mnt / "a.bin", "rb")                        # open across the switch
        assert hashlib.sha256(held.read()).hexdigest() == sums["a.bin"]
        assert not mgr.switch_if_complete(vid, lv), "not complete yet: stays on FUSE"
        sh("dd", f"if={dev}", "of=/dev/null", "bs=4M", "iflag=direct", "status=none")  # the rest
        assert mgr.switch_if_complete(vid, lv)
        rdev = os.stat(lv).st_rdev
        assert f"{os.major(rdev)}:{os.minor(rdev)}" in dm.table(vid), dm.table(vid)
        assert not mgr.active(vid) and not mgr.attached(vid), "the server and its state are gone"
        held.seek(0)
        assert hashlib.sha256(held.read()).hexdigest() == sums["a.bin"]
        held.close()
        (mnt / "c.txt").write_text("written after the switch\n")
        assert hashlib.sha256((mnt / "b.bin").read_bytes()).hexdigest() == sums["b.bin"]
        assert shutil.which("fio"), "fio is missing (make test-lvm installs it: apt install fio)"
        figs = {f"{rw} {bs}": (_fio(dev, rw, bs), _fio(lv, rw, bs))
                for rw, bs in (("randread", "4k"), ("read", "1M"))}
        assert all(a > 0 and b > 0 for a, b in figs.values()), figs    # fio read both devices
        print("fio after the switch (dm-linear, LV itself, ratio):",
              {k: (round(a), round(b), round(a / b, 2)) for k, (a, b) in figs.items()})
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        mgr.release_all(vid)
        mgr.discard(vid)
    assert not dm.exists(vid)
    sh("mount", "-o", "ro,noload", lv, str(mnt))                # the LV alone holds everything
    try:
        assert (mnt / "c.txt").read_text() == "written after the switch\n"
        assert hashlib.sha256((mnt / "a.bin").read_bytes()).hexdigest() == sums["a.bin"]
    finally:
        sh("umount", str(mnt))
