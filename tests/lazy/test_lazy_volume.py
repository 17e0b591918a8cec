"""LazyVolume without FUSE: the read/write/hydration logic on a local object store directory."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from csi_perssd import volume_io
from csi_perssd.lazy.fetch import FetchTimeout, fetch_chunk
from csi_perssd.lazy.recent import SLOTS
from csi_perssd.lazy.state import HydrationState, StateError
from csi_perssd.lazy.volume import LazyVolume
from csi_perssd.remote import transfer
from csi_perssd.remote.filestore import FileStore
from csi_perssd.remote.store import StoreError

MiB = 1 << 20
CS = 64 << 10            # small chunks: many of them, fast
SIZE = 4 * MiB


@pytest.fixture
def setup(tmp_path: Path):
    src = tmp_path / "src.img"
    data = bytearray(os.urandom(SIZE))
    data[10 * CS:12 * CS] = bytes(2 * CS)             # chunks 10 and 11 are holes
    src.write_bytes(bytes(data))
    store = FileStore(str(tmp_path / "store"))
    manifest, _ = volume_io.flush_path(store, str(src), SIZE, CS)
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    return store, manifest, str(disk), str(tmp_path / "state.json"), bytes(data)


def _volume(setup, workers: int = 0, fetcher=None, keep_slots: int = SLOTS) -> LazyVolume:  # type: ignore[no-untyped-def]
    store, manifest, disk, state_path, _ = setup
    st = HydrationState.for_manifest(manifest)
    fetch = fetcher or (lambda h: fetch_chunk(store, h, CS, timeout=2))
    return LazyVolume(disk, manifest, st, state_path, fetch, workers=workers, keep_slots=keep_slots)


def test_reads_fetch_exactly_the_chunks_they_touch_and_writes_fill_first(setup):
    data = setup[4]
    vol = _volume(setup)
    assert vol.state.missing_count == 62                   # 64 chunks, 2 holes
    assert vol.read(3 * CS + 100, 2 * CS) == data[3 * CS + 100:5 * CS + 100]
    assert vol.state.on_demand == 3                        # chunks 3, 4, 5
    vol.write(20 * CS + 7, b"x" * 10)                      # partial write: chunk 20 is fetched first
    assert vol.state.on_demand == 4 and vol.state.is_dirty(20)
    want = bytearray(data[20 * CS:21 * CS])
    want[7:17] = b"x" * 10
    assert vol.read(20 * CS, CS) == bytes(want)
    saved = HydrationState.load(setup[3])                  # the dirty bit was persisted first
    assert saved.is_dirty(20) and saved.is_present(20)
    assert [(e.offset, e.length) for e in saved.dirty_extents()] == [(20 * CS, CS)]
    vol.close()


def test_background_hydration_completes_hot_chunks_first_and_resumes(setup):
    data = setup[4]
    order: list[str] = []
    store = setup[0]
    gate = threading.Event()

    def fetcher(h):  # type: ignore[no-untyped-def]
        gate.wait(5)
        order.append(h)
        return fetch_chunk(store, h, CS, timeout=2)
    vol = _volume(setup, workers=2, fetcher=fetcher)
    vol._heat(40)                                          # as after a demand read of chunk 40
    vol.start()
    gate.set()
    assert vol.wait_complete(30)
    vol.stop()
    entries = setup[1].entries
    assert order[:2] and set(order[:4]) <= {entries[i] for i in range(41, 45)}, "hot chunks first"
    assert vol.state.background == 62 and vol.state.on_demand == 0
    assert Path(setup[2]).read_bytes() == data
    vol.close()
    again = HydrationState.load(setup[3])
    assert again.complete and again.background == 62       # a restart finds it complete


def test_a_corrupt_chunk_fails_its_reads_only_and_writes_nothing(setup):
    good = setup[0]

    def fetcher(h):  # type: ignore[no-untyped-def]
        if h == setup[1].entries[7]:
            raise transfer.ChunkCorrupted("chunks/x", "content does not match its BLAKE3 hash")
        return fetch_chunk(good, h, CS, timeout=2)
    vol = _volume(setup, fetcher=fetcher)
    with pytest.raises(transfer.ChunkCorrupted):
        vol.read(7 * CS, 10)
    with pytest.raises(transfer.ChunkCorrupted):
        vol.write(7 * CS, b"y")                           # a write cannot fill it either
    assert not vol.state.is_present(7) and not vol.state.is_dirty(7)
    assert os.pread(vol.fd, CS, 7 * CS) == bytes(CS), "nothing was written to the chunk"
    assert vol.read(8 * CS, CS) == setup[4][8 * CS:9 * CS]
    vol.close()


def test_fetch_retries_until_the_timeout(setup):
    calls = []

    class Down:
        def get(self, key):  # type: ignore[no-untyped-def]
            calls.append(key)
            raise StoreError("connection refused")
    with pytest.raises(FetchTimeout, match="unreachable for 1s"):
        fetch_chunk(Down(), setup[1].entries[0], CS, timeout=1.0, pause=0.05)  # type: ignore[arg-type]
    assert len(calls) >= 3


def test_state_file_is_validated(tmp_path: Path):
    p = tmp_path / "s.json"
    p.write_text('{"v": 1, "size": 100, "chunk_size": 10, "present": "AA==", "dirty": "AA=="}')
    with pytest.raises(StateError, match="bitmaps"):
        HydrationState.load(str(p))
    p.write_text("not json")
    with pytest.raises(StateError):
        HydrationState.load(str(p))


def test_a_read_that_finds_its_chunk_missing_queues_the_next_chunks_for_the_background_pool(setup):
    """Read-ahead: the chunks after a missing one go to the front of the background queue (the
    pool fetches them in parallel ahead of a sequential reader); never with workers=0."""
    from csi_perssd.lazy.volume import READ_AHEAD
    data = setup[4]
    vol = _volume(setup, workers=2)                       # not started: the queue stays as it is
    assert vol.read(3 * CS, CS) == data[3 * CS:4 * CS]
    assert list(vol._hot) == [j for j in range(4, 4 + READ_AHEAD) if j not in (10, 11)]   # holes: present
    vol._hot.clear()
    assert vol.read(13 * CS, CS) == data[13 * CS:14 * CS]
    assert list(vol._hot) == list(range(14, 14 + READ_AHEAD))
    assert vol.read(13 * CS, 10) == data[13 * CS:13 * CS + 10]  # present: no new hints
    assert list(vol._hot) == list(range(14, 14 + READ_AHEAD))
    assert vol.state.on_demand == 2
    vol.close()
    ondemand = _volume(setup, workers=0)
    ondemand.read(30 * CS, CS)
    assert not ondemand._hot and ondemand.state.on_demand == 1
    ondemand.close()


def test_fills_are_written_with_o_direct_and_read_back_near_readers(setup, monkeypatch):
    """A fetched chunk is written as a full hydrate writes it (ChunkWriter, O_DIRECT from the
    thread's aligned buffer: no page-cache copy); it is then read back into the page cache
    (WILLNEED) when a read waits for it, or when it is at or up to NEAR_READ chunks after the
    latest read, while fewer than NEAR_READ read-back chunks are unread. Before any read no
    fill is read back; a read asks for the local chunks after it in its window that were not
    (one WILLNEED per run, once). The bytes are the manifest's either way. (Without kept
    chunks: with them, the page cache is the path once hydration completes.)"""
    import csi_perssd.lazy.volume as volume
    monkeypatch.setattr(volume, "NEAR_READ", 4)
    data = setup[4]
    vol = _volume(setup, keep_slots=0)
    if not vol.sink.direct:
        vol.close()
        pytest.skip("the temporary file system refuses O_DIRECT: fills are written buffered there")
    direct, advised = [], []
    real_direct, real_advise = vol.sink._write_direct, vol.readahead.advise

    def spy(offset, buf):  # type: ignore[no-untyped-def]
        ok = real_direct(offset, buf)
        direct.append((offset // CS, len(buf), ok))
        return ok

    def advise(fd, offset, length):  # type: ignore[no-untyped-def]
        real_advise(fd, offset, length)
        advised.append((offset // CS, length // CS))
    vol.sink._write_direct = spy  # type: ignore[method-assign]
    vol.readahead.advise = advise
    for i in (30, 31, 32, 33, 34, 6):                     # before any read: none read back
        assert vol.ensure(i, demand=False)
    assert advised == []
    vol.write(9 * CS + 3, b"z")                           # a fill the write waits for: read back
    assert vol.read(5 * CS, CS) == data[5 * CS:6 * CS]    # demand: 5; its window asks for 6 (local)
    assert advised == [(9, 1), (6, 1), (5, 1)]
    assert vol.read(5 * CS + 100, 10) == data[5 * CS + 100:5 * CS + 110]    # same window: nothing more
    for i in (8, 20, 4):                                  # 8: near chunk 5; 20: too far; 4: before it
        assert vol.ensure(i, demand=False)
    assert advised == [(9, 1), (6, 1), (5, 1), (8, 1)]
    assert vol.read(29 * CS, CS) == data[29 * CS:30 * CS]     # a jump: 30-32, local since before, in one call
    assert advised[4:] == [(30, 3), (29, 1)]
    assert [i for i, _, _ in direct] == [30, 31, 32, 33, 34, 6, 9, 5, 8, 20, 4, 29]
    assert all(n == CS and ok for _, n, ok in direct), "every fill O_DIRECT"
    assert vol._unread == {30, 31, 32}
    assert os.pread(vol.fd, 4, 9 * CS + 2) == data[9 * CS + 2:9 * CS + 3] + b"z" + data[9 * CS + 4:9 * CS + 6]
    for i in (4, 5, 6, 8, 20, 29, 30, 34):
        assert os.pread(vol.fd, CS, i * CS) == data[i * CS:(i + 1) * CS]
    vol.close()


def test_background_hydration_retries_a_chunk_that_timed_out_in_a_later_round(setup, monkeypatch):
    import csi_perssd.lazy.volume as volume
    monkeypatch.setattr(volume, "RETRY_PAUSE_S", 0.01)
    store, entries = setup[0], setup[1].entries
    calls: list[str] = []

    def fetcher(h):  # type: ignore[no-untyped-def]
        calls.append(h)
        if h == entries[5] and calls.count(h) == 1:
            raise FetchTimeout("object store unreachable for 2s")
        return fetch_chunk(store, h, CS, timeout=2)
    vol = _volume(setup, workers=3, fetcher=fetcher)
    vol.start()
    assert vol.wait_complete(30)
    vol.stop()
    assert calls.count(entries[5]) == 2 and len(calls) == 63       # 62 chunks, one of them twice
    assert vol.state.background == 62 and not vol.status()["failed"]
    assert Path(setup[2]).read_bytes() == setup[4]
    vol.close()


def test_a_plain_volume_refuses_an_encrypted_chunk_object(setup):
    """The lazy fetch decodes with the hydrate's codec: a sealed object under a plain volume's
    chunk name is corrupt, never data."""
    from csi_perssd.crypto.keys import LineageKeys
    from csi_perssd.remote.chunks import chunk_key
    from csi_perssd.remote.codec import Codec
    store, entries = setup[0], setup[1].entries
    h = entries[2]
    sealed = Codec(LineageKeys.generate()).encode(h, setup[4][2 * CS:3 * CS], 3)
    store.put(chunk_key(h), bytes(sealed))
    with pytest.raises(transfer.ChunkCorrupted, match="encrypted"):
        fetch_chunk(store, h, CS, timeout=2)


def test_background_fetches_land_in_the_pool_threads_reused_buffer(setup):
    """The server's fetcher GETs into one reused page-aligned buffer per background pool thread
    (as the hydrate's ChunkFetcher): a raw chunk's plaintext is a page-aligned view of it, the
    same buffer for the thread's next chunk; on other threads (libfuse's) a plain GET."""
    import ctypes
    import mmap

    from csi_perssd.lazy.server import _Fetcher
    from csi_perssd.lazy.volume import POOL
    store, entries, data = setup[0], setup[1].entries, setup[4]
    f = _Fetcher({"fetch_timeout": 2}, {}, CS)
    f._store = store
    seen: list[tuple[object, int, bool]] = []

    def pool_thread() -> None:
        for i in (0, 1):
            raw = f(entries[i])
            assert isinstance(raw, memoryview)
            seen.append((raw.obj, ctypes.addressof(ctypes.c_char.from_buffer(raw)),
                         bytes(raw) == data[i * CS:(i + 1) * CS]))
    t = threading.Thread(target=pool_thread, name=f"{POOL}_0")
    t.start()
    t.join()
    assert [ok for _, _, ok in seen] == [True, True]
    assert seen[0][0] is seen[1][0] and isinstance(seen[0][0], mmap.mmap), "one reused buffer"
    assert seen[0][1] % 4096 == 0, "page-aligned: the O_DIRECT fill writes it as it is"
    other = f(entries[2])                                   # not a pool thread: no landing buffer
    assert bytes(other) == data[2 * CS:3 * CS] and not isinstance(getattr(other, "obj", None), mmap.mmap)


def test_stop_during_an_outage_ends_the_hydrator_and_saves_the_state(setup):
    """The store is unreachable and every background fetch is retrying (timeout 60 s): stop()
    must end the hydrator (the fetches stop retrying on the server's stop event) and save the
    state, within the plugin's kill deadline, and close() may then close the descriptors. Before,
    stop() joined for 30 s while the fetches retried for 60 s, and the plugin's kill at 20 s came
    first: the final save never ran and the pool's threads outlived close()."""
    data, state_path = setup[4], setup[3]
    attempts: list[str] = []
    stopping = threading.Event()

    class Down:
        def get(self, key):  # type: ignore[no-untyped-def]
            attempts.append(key)
            raise StoreError("connection refused")

    store, first = setup[0], setup[1].hash_at(0)

    def fetcher(h):  # type: ignore[no-untyped-def]
        if h == first:
            return fetch_chunk(store, h, CS, timeout=2)
        return fetch_chunk(Down(), h, CS, timeout=60, pause=0.01, stop=stopping)  # type: ignore[arg-type]
    vol = _volume(setup, workers=2, fetcher=fetcher)
    assert vol.read(0, CS) == data[:CS]                    # chunk 0 is reachable: on demand
    vol.start()
    deadline = time.monotonic() + 20
    while len(attempts) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(attempts) >= 4                              # both workers are retrying
    stopping.set()
    vol.stop()
    assert [t.name for t in vol._threads if t.is_alive()] == []
    saved = HydrationState.load(state_path)
    assert saved.is_present(0) and saved.on_demand == 1 and saved.missing_count == 61
    vol.close()
    with pytest.raises(OSError):
        os.fstat(vol.sink.fd)                              # closed: nothing was still running


def test_reads_near_the_fills_are_answered_from_kept_chunks_and_a_write_drops_them(setup):
    """A chunk a read waits for is kept in memory (RecentChunks) and the read is answered from
    there; a chunk that is local but not kept is loaded into a slot (O_DIRECT) for the reads
    of it; a write drops the chunk's copy, so the next read loads what the write left."""
    data = setup[4]
    vol = _volume(setup)
    if not vol.sink.direct:
        vol.close()
        pytest.skip("the temporary file system refuses O_DIRECT")
    assert vol.read(3 * CS + 100, CS) == data[3 * CS + 100:4 * CS + 100]     # chunks 3 and 4
    st = vol.status()
    assert (st["kept_chunks"], st["loaded_chunks"], st["kept_read_bytes"]) == (2, 0, CS)
    assert vol.recent.held() == [3, 4]
    vol.write(3 * CS + 10, b"new")
    assert vol.recent.held() == [4]
    want = bytearray(data[3 * CS:4 * CS])
    want[10:13] = b"new"
    assert vol.read(3 * CS, CS) == bytes(want)                               # loaded, with the write
    st = vol.status()
    assert (st["kept_chunks"], st["loaded_chunks"], st["kept_read_bytes"]) == (3, 1, 2 * CS)
    assert vol.read(10 * CS, CS) == bytes(CS), "a hole: the local volume's zeros, not a slot"
    assert vol.status()["loaded_chunks"] == 1
    assert vol.ensure(5, demand=False)                   # filled behind the reader (at 10): not kept
    assert not vol.recent.holds(5)
    assert vol.read(5 * CS, 100) == data[5 * CS:5 * CS + 100]
    assert vol.status()["loaded_chunks"] == 2 and vol.recent.holds(5)
    vol.close()


def test_once_hydrated_reads_go_to_the_local_volume_and_the_slots_are_let_go(setup, monkeypatch):
    import csi_perssd.lazy.volume as volume
    monkeypatch.setattr(volume, "IDLE_RELEASE_S", 0.0)
    monkeypatch.setattr(volume, "PERSIST_EVERY_S", 0.05)
    data = setup[4]
    vol = _volume(setup)
    assert vol.read(0, CS) == data[:CS] and vol.recent.held() == [0]
    for i in range(vol.state.chunks):
        vol.ensure(i, demand=False)
    assert vol.state.complete
    before = vol.status()
    assert vol.read(40 * CS, CS) == data[40 * CS:41 * CS]       # not kept, hydrated: from the fd
    assert vol.read(0, CS) == data[:CS]                         # still kept: from the slot
    after = vol.status()
    assert after["loaded_chunks"] == before["loaded_chunks"]
    assert after["kept_read_bytes"] == before["kept_read_bytes"] + CS
    vol.start()                                                 # the supervisor lets the slots go
    deadline = time.monotonic() + 10
    while vol.recent.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not vol.recent.active
    assert vol.read(0, CS) == data[:CS] and vol.status()["kept_read_bytes"] == after["kept_read_bytes"]
    vol.stop()
    vol.close()


def test_with_a_reader_the_hydrator_fetches_its_window_then_holds_then_works_from_the_end(setup, monkeypatch):
    import csi_perssd.lazy.volume as volume
    data = setup[4]
    vol = _volume(setup, workers=2, keep_slots=4)              # not started: _next() is asked here
    assert vol._next() == 0, "no reader: in order"
    vol._cursor = 0
    vol._handed.clear()
    assert vol.read(20 * CS, 10) == data[20 * CS:20 * CS + 10]  # waited for chunk 20
    vol._hot.clear()
    window = [vol._next() for _ in range(volume.READ_AHEAD - 1)]
    assert window == list(range(21, 20 + volume.READ_AHEAD)), "the reader's window first, each once"
    assert vol._next() == volume.HOLD, "a read has just waited, its window is coming: nothing far starts"
    vol._waited_t -= volume.HOLD_S
    assert vol._next() == 63 and vol._next() == 62, "then from the end, away from the reader"
    vol._read_t -= volume.READER_ACTIVE_S
    assert vol._next() == 0, "the reader has gone: in order again"
    vol._handed.clear()                                         # the window's fetches ended
    vol._read_at, vol._read_t, vol._waited_t = 60, time.monotonic(), time.monotonic()
    assert vol._next() == 60, "a read that waited for the last chunks"
    vol._handed.clear()
    for j in range(60, 64):
        vol.state.mark_present(j)
    assert vol._next() == 59, "its window is local, nothing of it coming: no hold (the end cursor goes on)"
    vol._read_at, vol._read_t = 20, time.monotonic()            # the reader is back
    vol._handed.discard(21)                                     # a fetch of 21 that failed: asked again
    assert vol._next() == 21
    vol.close()
