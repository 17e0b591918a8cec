"""RecentChunks: which chunks stay in the slots, what is copied out, and what a write drops."""
from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import pytest

from csi_perssd.lazy.recent import RecentChunks

CS = 64 << 10


def chunk(i: int) -> bytes:
    return bytes([i % 251]) * 100 + os.urandom(CS - 100)


def copy(rc: RecentChunks, i: int, at: int, n: int) -> bytes | None:
    buf = ctypes.create_string_buffer(n)
    if not rc.copy_out(i, at, n, ctypes.addressof(buf)):
        return None
    return buf.raw


def test_put_and_copy_out_return_the_content_and_count_it():
    rc = RecentChunks(4, CS)
    data = chunk(3)
    assert rc.put(3, data, reader=-1)
    assert copy(rc, 3, 0, CS) == data
    assert copy(rc, 3, 1000, 5000) == data[1000:6000]
    assert copy(rc, 3, CS - 10, 20) is None, "past the slot's content: not answered from it"
    assert copy(rc, 4, 0, 10) is None
    assert (rc.kept, rc.loaded, rc.read_bytes) == (1, 0, CS + 5000)
    assert not rc.put(3, data, reader=-1), "kept once"
    rc.close()
    assert not rc.active and copy(rc, 3, 0, 10) is None and not rc.put(5, data, reader=-1)


def test_put_from_a_writable_landing_view_copies_its_bytes_and_leaves_no_export():
    """The background pool's fill is a view of its reused mmap landing buffer (copied with
    memmove, without the GIL): the slot holds the bytes as they were, a later reuse of the
    buffer does not change them, and the buffer can still be closed (no export left)."""
    import mmap
    rc = RecentChunks(2, CS)
    m = mmap.mmap(-1, 4096 + CS)
    data = chunk(7)
    m[4096 - 1:4096 - 1 + CS] = data
    view = memoryview(m)[4096 - 1:4096 - 1 + CS]
    assert rc.put(7, view, reader=-1)
    m[4096 - 1:4096 - 1 + CS] = bytes(CS)           # the buffer reused for the next fetch
    assert copy(rc, 7, 0, CS) == data
    assert copy(rc, 7, CS - 100, 100) == data[-100:]
    view.release()
    m.close()                                       # BufferError if an export were left
    rc.close()


def test_a_short_chunk_answers_only_its_bytes():
    rc = RecentChunks(2, CS)
    assert rc.put(0, b"abc" * 100, reader=0)
    assert copy(rc, 0, 0, 300) == b"abc" * 100
    assert copy(rc, 0, 0, 301) is None
    assert not rc.put(1, bytes(CS + 1), reader=0), "larger than a slot"
    assert not rc.put(1, memoryview(bytearray(0)), reader=0), "nothing to keep"
    rc.close()


def test_victim_is_a_free_slot_then_the_lowest_passed_then_the_farthest_ahead():
    rc = RecentChunks(3, CS)
    for i in (10, 11, 12):
        assert rc.put(i, chunk(i), reader=10)
    assert rc.held() == [10, 11, 12]
    assert rc.put(13, chunk(13), reader=12)            # 10 and 11 are behind the reader: 10 goes
    assert rc.held() == [11, 12, 13]
    assert rc.put(14, chunk(14), reader=13)            # then 11, then 12
    assert rc.put(15, chunk(15), reader=13)
    assert rc.held() == [13, 14, 15]
    assert not rc.put(20, chunk(20), reader=13), "all ahead and nearer than 20: not kept"
    assert rc.put(14, b"", reader=13) is False         # held already
    # reader moved back (a jump): everything is ahead; the farthest goes for a nearer chunk
    assert rc.put(6, chunk(6), reader=5)
    assert rc.held() == [6, 13, 14]
    assert copy(rc, 15, 0, 10) is None and copy(rc, 6, 0, 100) == bytes([6]) * 100
    rc.close()


def test_a_pinned_slot_is_never_a_victim_and_a_drop_while_pinned_frees_it_after(monkeypatch):
    rc = RecentChunks(1, CS)
    assert rc.put(1, chunk(1), reader=5)               # behind the reader: a victim
    inside, release = threading.Event(), threading.Event()
    real = ctypes.memmove

    def slow(dst, src, n):  # type: ignore[no-untyped-def]
        inside.set()
        release.wait(5)
        return real(dst, src, n)

    monkeypatch.setattr(ctypes, "memmove", slow)
    got: list[bytes | None] = []
    t = threading.Thread(target=lambda: got.append(copy(rc, 1, 0, 100)))
    t.start()
    assert inside.wait(5)
    assert not rc.put(6, chunk(6), reader=5), "the only slot is being copied out of"
    rc.drop(1)
    assert not rc.holds(1)
    assert not rc.put(7, chunk(7), reader=5), "dropped, but still pinned: not reusable yet"
    release.set()
    t.join(5)
    monkeypatch.setattr(ctypes, "memmove", real)
    assert got == [bytes([1]) * 100]                   # the copy that started before the drop
    assert rc.put(7, chunk(7), reader=5) and rc.held() == [7]
    rc.close()


def test_load_reads_the_local_volume_with_o_direct_and_a_write_meanwhile_is_not_kept(tmp_path: Path):
    img = tmp_path / "vol.img"
    data = os.urandom(4 * CS)
    img.write_bytes(data)
    try:
        fd = os.open(img, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        pytest.skip("the temporary file system refuses O_DIRECT")
    rc = RecentChunks(2, CS)
    try:
        assert rc.load(2, fd, 2 * CS, CS, reader=2)
        assert copy(rc, 2, 0, CS) == data[2 * CS:3 * CS] and rc.loaded == 1
        assert not rc.load(1, fd, CS + 512, CS, reader=2), "not aligned for O_DIRECT"
        assert not rc.load(1, -1, CS, CS, reader=2), "no O_DIRECT descriptor"
        # a write to chunk 3 lands while its load reads the disk: the load is not kept
        real = os.preadv

        def racing(fd_, bufs, off):  # type: ignore[no-untyped-def]
            n = real(fd_, bufs, off)
            rc.drop(3)
            return n

        os.preadv = racing  # type: ignore[assignment]
        try:
            assert not rc.load(3, fd, 3 * CS, CS, reader=2)
        finally:
            os.preadv = real  # type: ignore[assignment]
        assert not rc.holds(3) and rc.loaded == 1
        assert rc.load(3, fd, 3 * CS, CS, reader=2), "the slot was freed for the next load"
        assert rc.held() == [2, 3]
        rc.drop(2)
        assert rc.held() == [3] and copy(rc, 2, 0, 10) is None
    finally:
        rc.close()
        os.close(fd)


def test_zero_slots_keep_nothing():
    rc = RecentChunks(0, CS)
    assert not rc.active and not rc.put(0, b"x", reader=-1) and copy(rc, 0, 0, 1) is None
    rc.close()
