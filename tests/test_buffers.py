"""buffers.BufferPool: the one pool of scratch buffers, used by crypto (sealing, opening) and by
local/fileio (O_DIRECT copy buffers) without either importing the other."""
from __future__ import annotations

import ast
import ctypes
import mmap
from pathlib import Path

from csi_perssd import buffers
from csi_perssd.buffers import BufferPool

PACKAGE = Path(buffers.__file__).parent


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def test_buffer_pool_reuses_the_smallest_fit_and_keeps_at_most_its_budget():
    pool = BufferPool(300, bytearray)
    a, b = pool.take(100), pool.take(200)
    assert len(a) == 100 and len(b) == 200 and a is not b
    pool.give(b)
    pool.give(a)
    assert pool.take(50) is a and pool.take(150) is b          # the smallest one that fits
    pool.give(a)
    pool.give(b)
    pool.give(bytearray(10))                                     # over the budget: dropped
    assert pool.kept == 2
    with pool.lease(10) as c:
        assert c is a
    assert len(pool.take(400)) == 400                            # none fits: a new one
    assert pool.take(1) is a and pool.take(1) is b and pool.take(1) not in (a, b)


def test_mapped_buffers_are_page_aligned_and_released_when_not_kept_or_closed():
    page = 4096
    pool = BufferPool(2 * page, buffers.mapped)                  # at most 2 of one page kept
    bufs = [pool.take(page) for _ in range(3)]
    assert all(_address(b) % page == 0 for b in bufs)            # what an O_DIRECT write needs
    for b in bufs:
        pool.give(b)
    assert pool.kept == 2 and not bufs[0].closed and not bufs[1].closed
    assert bufs[2].closed                                        # over the budget: unmapped now
    late = pool.take(page)                                       # one kept, one leased
    still = [b for b in bufs[:2] if b is not late]
    pool.close()
    assert pool.kept == 0 and still[0].closed                    # close() unmapped the kept one
    pool.give(late)                                              # given back after close: unmapped
    assert late.closed
    viewed = pool.take(page)
    view = memoryview(viewed)
    pool.give(viewed)                                            # a view still holds it: left to that view
    assert not viewed.closed and pool.kept == 0
    view.release()


def _imports(path: Path) -> set[str]:
    """The package modules `path` imports (absolute names)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(rel[:len(rel) - node.level]) if node.level else []
            out.add(".".join(base + ([node.module] if node.module else [])))
    return {m for m in out if m.startswith("csi_perssd")}


def test_one_buffer_pool_for_crypto_and_local_file_io():
    """No second pool beside BufferPool (ChunkWriter had its own _take/_give copy of it), and the
    neutral module joins crypto and local without an import between them."""
    pools = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
                if {"take", "give"} <= methods or {"_take", "_give"} <= methods:
                    pools.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert pools == ["buffers.py:BufferPool"]
    fileio, aead = _imports(PACKAGE / "local" / "fileio.py"), _imports(PACKAGE / "crypto" / "aead.py")
    assert "csi_perssd.buffers" in fileio and "csi_perssd.buffers" in aead
    assert not any(m.startswith("csi_perssd.crypto") for m in fileio), fileio
    assert not any(m.startswith("csi_perssd.local") for m in aead), aead
    assert _imports(PACKAGE / "buffers.py") == set()


def test_mapped_populate_makes_the_pages_at_once_not_a_fault_per_page():
    import resource

    from csi_perssd import buffers
    n = 4 << 20
    src = b"\x01" * n              # made (and faulted in) before anything is counted
    got = {}
    for populate in (False, True):
        m = buffers.mapped(n, populate=populate)
        try:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            m[:] = src
            got[populate] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        finally:
            m.close()
    assert got[False] >= n // 4096 and got[True] <= 16, got
