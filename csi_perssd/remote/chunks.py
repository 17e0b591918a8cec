"""Content-addressed chunks: fixed-size split, zero detection, BLAKE3 hashes, zstd blobs.

Pure functions, no I/O. A chunk is stored under `chunks/<h0h1>/<hash>` where hash is the BLAKE3
hex digest of its *plaintext*. The stored object ("blob") starts with a one-byte format tag:

    0x00  raw plaintext follows (compression off, or it did not shrink the chunk)
    0x01  one zstd frame follows (with the content size in its header)

so decoding never has to guess, and a blob whose plaintext happens to look like a zstd frame is
still read correctly. `decompress` bounds the output size, so a hostile blob cannot balloon.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import zstandard
from blake3 import blake3

from .layout import chunk_key  # noqa: F401  (re-exported: the bucket layout owns the key)

DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 64 << 20

FORMAT_RAW = 0x00
FORMAT_ZSTD = 0x01
_RAW_TAG, _ZSTD_TAG = bytes((FORMAT_RAW,)), bytes((FORMAT_ZSTD,))

_HASH_RE = re.compile(r"[0-9a-f]{64}")
# zstd level of chunks unless a volume's `compression` parameter says otherwise. Level 1:
# measured on the benchmark's file mix 387 MB/s per core at 0.48 of the size, level 3 238 MB/s at
# 0.45: 7% more bytes for 60% more speed (flush time is the point)
DEFAULT_COMPRESSION = 1
_local = threading.local()
_zero_lock = threading.Lock()
_zeros: dict[int, bytes] = {}


class CorruptBlob(ValueError):
    """A stored blob cannot be decoded (unknown tag, broken zstd frame, too large)."""


def check_chunk_size(chunk_size: int) -> int:
    """Chunk sizes are powers of two between 64 KiB and 64 MiB (a StorageClass parameter)."""
    if (not isinstance(chunk_size, int) or chunk_size < MIN_CHUNK_SIZE
            or chunk_size > MAX_CHUNK_SIZE or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk size {chunk_size!r} must be a power of two between "
                         f"{MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes")
    return chunk_size


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_span(index: int, size: int, chunk_size: int) -> tuple[int, int]:
    """(offset, length) of chunk `index` of a volume of `size` bytes (the last one may be short)."""
    offset = index * chunk_size
    if index < 0 or offset >= size:
        raise IndexError(f"chunk {index} outside a volume of {size} bytes")
    return offset, min(chunk_size, size - offset)


def split(size: int, chunk_size: int) -> Iterator[tuple[int, int, int]]:
    """(index, offset, length) of every chunk of a volume of `size` bytes."""
    for index in range(chunk_count(size, chunk_size)):
        offset, length = chunk_span(index, size, chunk_size)
        yield index, offset, length


def _zero(n: int) -> bytes:
    z = _zeros.get(n)
    if z is None:
        with _zero_lock:
            z = _zeros.setdefault(n, bytes(n))
            if len(_zeros) > 8:             # odd sizes (short last chunks): keep the cache small
                for k in [k for k in _zeros if k != n][:4]:
                    del _zeros[k]
    return z


def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    """True when every byte is 0 (memcmp against a preallocated zero buffer)."""
    n = len(buf)
    if n == 0:
        return True
    if isinstance(buf, memoryview):
        buf = buf.cast("B") if buf.format != "B" else buf
        if buf[0] != 0 or buf[n - 1] != 0:
            return False
        return buf.tobytes() == _zero(n)
    if buf[0] != 0 or buf[n - 1] != 0:      # cheap early exit for most data chunks
        return False
    return buf == _zero(n)


def chunk_hash(buf: bytes | bytearray | memoryview) -> str:
    """BLAKE3 hex digest (64 lowercase hex chars); releases the GIL on large buffers."""
    return blake3(buf).hexdigest()


def check_hash(h: object) -> str:
    if not isinstance(h, str) or _HASH_RE.fullmatch(h) is None:
        raise ValueError(f"not a chunk hash: {str(h)[:80]!r}")
    return h


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


PROBE_MIN = 1 << 20             # chunks at least this big are probed before compressing
PROBE_PIECE = 16 << 10


def _incompressible(buf: bytes | bytearray | memoryview, level: int) -> bool:
    """Cheap guess: compress four 16 KiB samples spread over the chunk; if they do not shrink
    by 2%, the whole chunk (random, encrypted, already compressed data) would not either."""
    mv = memoryview(buf)
    n = len(mv)
    step = (n - PROBE_PIECE) // 3
    sample = b"".join(mv[i * step:i * step + PROBE_PIECE] for i in range(4))
    return len(_compressor(level).compress(sample)) > len(sample) * 0.98


def compress(buf: bytes | bytearray | memoryview, level: int = DEFAULT_COMPRESSION,
             probe: bool = True) -> tuple[bytes, bool]:
    """Encode a chunk as a blob. Returns (blob, compressed). level 0 turns compression off;
    negative levels are zstd's fast modes. The raw form is kept when zstd does not shrink it
    (with probe, large chunks whose samples do not compress are not even tried)."""
    if level != 0 and not (probe and len(buf) >= PROBE_MIN and _incompressible(buf, level)):
        z = _compressor(level).compress(buf)
        if len(z) < len(buf):
            return _ZSTD_TAG + z, True
    return _RAW_TAG + buf, False           # one copy (buf may be a reused read buffer)


def compress_parts(buf: bytes | bytearray | memoryview, level: int = 3,
                   probe: bool = True) -> tuple[list[bytes | bytearray | memoryview], bool]:
    """compress() without joining: the blob as pieces ([tag, payload]), so a raw chunk is not
    copied before it is encrypted (crypto seals the pieces into one object)."""
    if level != 0 and not (probe and len(buf) >= PROBE_MIN and _incompressible(buf, level)):
        z = _compressor(level).compress(buf)
        if len(z) < len(buf):
            return [_ZSTD_TAG, z], True
    return [_RAW_TAG, buf], False


def decompress(blob: bytes | bytearray | memoryview, max_size: int = MAX_CHUNK_SIZE) -> bytes | memoryview:
    """Decode a blob back to the chunk plaintext; CorruptBlob if malformed or over max_size.
    A raw blob's plaintext is returned as a view into `blob` (no copy of the chunk)."""
    if not blob:
        raise CorruptBlob("empty chunk object")
    tag = blob[0]
    if tag == FORMAT_RAW:
        if len(blob) - 1 > max_size:
            raise CorruptBlob(f"chunk of {len(blob) - 1} bytes exceeds {max_size}")
        return memoryview(blob)[1:]
    if tag == FORMAT_ZSTD:
        body = memoryview(blob)[1:]
        try:
            params = zstandard.get_frame_parameters(body)
            if params.content_size <= 0 or params.content_size > max_size:
                raise CorruptBlob(f"zstd frame declares {params.content_size} bytes "
                                  f"(limit {max_size})")
            out = _decompressor().decompress(body, max_output_size=max_size)
        except zstandard.ZstdError as e:
            raise CorruptBlob(f"broken zstd frame: {e}") from None
        if len(out) != params.content_size:
            raise CorruptBlob("zstd frame size mismatch")
        return out
    raise CorruptBlob(f"unknown chunk format tag {tag:#x}")
