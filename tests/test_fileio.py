"""local/fileio.ChunkReader / ChunkWriter: aligned chunks go through O_DIRECT where the file system takes it
(/var/tmp: the host's disk file system; /dev/shm: tmpfs, which older kernels refuse O_DIRECT on),
everything else buffered; the content is the same either way."""
from __future__ import annotations

import ctypes
import os

import pytest

from csi_perssd.local.fileio import DIRECT_ALIGN, ChunkReader, ChunkWriter

CS = 64 << 10


def _write_pattern(path: str, size: int, writeback: bool) -> tuple[bytes, ChunkWriter]:
    with open(path, "wb") as f:
        f.truncate(size)
    want = bytearray(size)
    w = ChunkWriter(path, writeback=writeback, chunk_size=CS)
    pieces = [(0, CS), (CS, CS), (3 * CS, CS // 2 + 1), (5 * CS + 512, 4096), (size - 100, 100)]
    for off, n in pieces:
        data = os.urandom(n)
        w.write(off, memoryview(b"x" + data)[1:])       # a view at an odd address, like a raw blob
        want[off:off + n] = data
    w.sync()
    return bytes(want), w


@pytest.mark.parametrize("where", ["/var/tmp", "/dev/shm"])
def test_chunk_writer_content_is_exact_with_or_without_o_direct(tmp_path, where):
    if not os.path.isdir(where):
        pytest.skip(f"no {where}")
    path = os.path.join(where, f"perssd-fileio-{os.getpid()}-{tmp_path.name}.img")
    try:
        want, w = _write_pattern(path, 8 * CS, writeback=True)
        direct = w.direct
        w.close()
        with open(path, "rb") as f:
            assert f.read() == want
        if where == "/var/tmp":
            assert direct                       # ext4/XFS take O_DIRECT: the aligned chunks used it
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_chunk_writer_without_writeback_never_opens_o_direct(tmp_path):
    path = str(tmp_path / "v.img")
    want, w = _write_pattern(path, 8 * CS, writeback=False)
    assert w.direct_fd == -1
    w.close()
    assert open(path, "rb").read() == want
    assert DIRECT_ALIGN == 4096


def test_chunk_reader_reads_exact_content_direct_and_sees_unflushed_writes():
    path = os.path.join("/var/tmp", f"perssd-fileio-r-{os.getpid()}.img")
    size = 5 * CS + 1000                                # a short, unaligned last chunk
    try:
        data = bytearray(os.urandom(size))
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            f.seek(CS + 10)
            f.write(b"new bytes not yet written back")   # dirty in the page cache only
            f.flush()
        data[CS + 10:CS + 40] = b"new bytes not yet written back"
        with ChunkReader(path, CS) as r:
            assert r.direct                             # the host's disk file system takes O_DIRECT
            got = b""
            for off in range(0, size, CS):
                n = min(CS, size - off)
                r.prefetch(off, n)
                got += bytes(r.read(off, n))
        assert got == bytes(data)
        with ChunkReader(path, CS, direct=False) as r:
            assert not r.direct and bytes(r.read(CS, CS)) == bytes(data[CS:2 * CS])
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_chunk_writer_writes_page_aligned_views_without_a_copy(tmp_path):
    import mmap
    path = os.path.join("/var/tmp", f"perssd-fileio-a-{os.getpid()}.img")
    try:
        with open(path, "wb") as f:
            f.truncate(4 * CS)
        m = mmap.mmap(-1, DIRECT_ALIGN + CS)
        landing = memoryview(m)[DIRECT_ALIGN - 1:]      # a 1-byte tag, then an aligned payload
        payload = os.urandom(CS)
        landing[1:CS + 1] = payload
        with ChunkWriter(path, writeback=True, chunk_size=CS) as w:
            w.write(CS, landing[1:CS + 1])              # aligned: straight from it
            assert w.direct and w._copies.kept == 0     # its own buffer was never needed
            w.write(2 * CS, landing[:CS])               # unaligned view: copied, as before
            assert w._copies.kept == 1
            w.sync()
        with open(path, "rb") as f:
            got = f.read()
        assert got[CS:2 * CS] == payload and got[2 * CS:3 * CS] == bytes(landing[:CS])
        del landing
        m.close()
    finally:
        if os.path.exists(path):
            os.unlink(path)


def test_chunk_writer_copy_buffers_are_reused_across_short_lived_threads():
    """The lazy server's fills arrive on libfuse's threads through ctypes, each callback with a
    fresh Python thread state: a buffer kept per thread was a new 4 MiB mmap per fill, kept until
    close (20 fills from 20 threads left 20 buffers). Leased buffers: one, reused."""
    import threading
    path = os.path.join("/var/tmp", f"perssd-fileio-t-{os.getpid()}.img")
    try:
        with open(path, "wb") as f:
            f.truncate(20 * CS)
        chunks = [os.urandom(CS) for _ in range(20)]
        with ChunkWriter(path, writeback=True, chunk_size=CS) as w:
            if not w.direct:
                pytest.skip("/var/tmp refuses O_DIRECT: no copy buffer is ever needed")
            for i, data in enumerate(chunks):       # bytes: never page-aligned, always copied
                t = threading.Thread(target=w.write, args=(i * CS, data))
                t.start()
                t.join()
            assert w._bufs == [] and w._copies.kept == 1
            kept = list(w._copies._free)
            assert all(ctypes.addressof(ctypes.c_char.from_buffer(b)) % 4096 == 0 for b in kept)   # O_DIRECT
            w.sync()
        assert w._copies.kept == 0 and all(b.closed for b in kept)      # close() unmapped them
        with open(path, "rb") as f:
            assert f.read() == b"".join(chunks)
    finally:
        if os.path.exists(path):
            os.unlink(path)
