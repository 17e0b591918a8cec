"""The binary manifest encoding (schema 2): pure functions between a manifest's fields and bytes.

    MAGIC2                      b"PERSSD-MANIFEST2\\n"
    u32 H, H bytes of JSON      {"schema": 2, "volume_size", "chunk_size", "generation", "parent",
                                 "created_at", "stats", "runs": R, "data": D}
    u32 x R  runs               lengths of alternating runs, data first: data, holes, data, ...
    32 x D   digests            the raw BLAKE3 digest of each data chunk, in order
    u32 x D  stored sizes       of each data chunk's object (0: unknown)
    u32      CRC-32             of everything before it

Little-endian. 36 bytes per data chunk plus 4 per run: a fully written 16 TiB volume at 4 MiB
chunks (4 Mi chunks) is 144 MiB, a 1 TiB one 9 MiB; holes cost nothing but their run. The
digests are random, so nothing is compressed. Decoding checks every length, the runs against the
volume's chunk count, the sizes' bounds and the CRC before anything is built; hashes produced from
raw digests cannot be malformed. Schema 1 (zstd JSON with hex hashes, ~67 bytes per chunk) is
decoded by manifest.py.
"""
from __future__ import annotations

import json
import operator
import struct
import sys
import zlib
from array import array
from functools import partial
from itertools import groupby, repeat
from typing import Any

from .chunkmap import u32_all_le

MAGIC2 = b"PERSSD-MANIFEST2\n"
SCHEMA2 = 2
DIGEST = 32
MAX_HEADER = 1 << 20
_U32 = struct.Struct("<I")
_is_hole = partial(operator.is_, None)


class WireError(ValueError):
    """Malformed binary manifest."""


def _u32s(values: Any) -> bytes:
    a = array("I", values)
    if a.itemsize != 4:                 # pragma: no cover (every supported platform has 4)
        a = array("L", values)
    if sys.byteorder != "little":       # pragma: no cover
        a.byteswap()
    return a.tobytes()


def _read_u32s(buf: memoryview) -> array[int]:
    a = array("I")
    a.frombytes(buf)
    if sys.byteorder != "little":       # pragma: no cover
        a.byteswap()
    return a


def runs_of(entries: list[str | None]) -> list[int]:
    """Alternating run lengths (data first, possibly 0) of a dense entry list."""
    if None not in entries:
        return [len(entries)]
    runs = [len(list(g)) for _, g in groupby(entries, key=_is_hole)]
    return [0, *runs] if entries[0] is None else runs


def encode(header: dict[str, Any], entries: list[str | None], raw_digests: bytes, sizes: dict[str, int]) -> bytes:
    """`raw_digests`: the data entries' digests as bytes (Manifest.validate gives them)."""
    data = [h for h in entries if h is not None]
    stored = _u32s(map(sizes.get, data, repeat(0))) if sizes else bytes(4 * len(data))
    return encode_raw(header, runs_of(entries), raw_digests, stored)


def encode_raw(header: dict[str, Any], runs: Any, raw_digests: Any, stored: Any) -> bytes:
    """From the raw parts (runs, digests, stored sizes as u32 bytes or an array)."""
    ndata = len(raw_digests) // DIGEST
    head = json.dumps({**header, "schema": SCHEMA2, "runs": len(runs), "data": ndata},
                      separators=(",", ":")).encode()
    parts = [MAGIC2, _U32.pack(len(head)), head, _u32s(runs), raw_digests,
             stored if isinstance(stored, (bytes, bytearray, memoryview)) else _u32s(stored)]
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return b"".join([*parts, _U32.pack(crc)])        # one copy of the 144 MiB of a 16 TiB volume


def _header(view: memoryview) -> tuple[dict[str, Any], int]:
    if len(view) < len(MAGIC2) + 8:
        raise WireError("binary manifest is truncated")
    (hlen,) = _U32.unpack_from(view, len(MAGIC2))
    if hlen > MAX_HEADER or len(MAGIC2) + 4 + hlen > len(view):
        raise WireError(f"binary manifest header of {hlen} bytes")
    try:
        doc = json.loads(bytes(view[len(MAGIC2) + 4:len(MAGIC2) + 4 + hlen]))
    except ValueError as e:
        raise WireError(f"binary manifest header: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA2:
        raise WireError("binary manifest header is not a schema-2 object")
    for k in ("runs", "data"):
        if type(doc.get(k)) is not int or doc[k] < 0:
            raise WireError(f"binary manifest header: bad {k}")
    return doc, len(MAGIC2) + 4 + hlen


Wire = tuple[Any, bytes, Any]       # (runs, raw digests, stored sizes): a chunkmap.ChunkMap's parts


def decode(data: bytes, n_chunks_of: Any, max_stored: Any) -> tuple[dict[str, Any], Wire]:
    """(header, raw parts), every length, run and size checked. `n_chunks_of(header)` gives the
    chunk count the header's sizes imply (validating them); `max_stored(header)` the largest
    allowed stored size."""
    view = memoryview(data)
    doc, off = _header(view)
    nruns, ndata = doc["runs"], doc["data"]
    if len(view) != off + 4 * nruns + (DIGEST + 4) * ndata + 4:
        raise WireError(f"binary manifest is {len(view)} bytes, its header says otherwise")
    if _U32.unpack_from(view, len(view) - 4)[0] != zlib.crc32(view[:-4]):
        raise WireError("binary manifest fails its CRC-32 (damaged)")
    runs = _read_u32s(view[off:off + 4 * nruns])
    n = n_chunks_of(doc)
    if sum(runs) != n or sum(runs[0::2]) != ndata:
        raise WireError(f"binary manifest runs cover {sum(runs)} chunks ({sum(runs[0::2])} data), "
                        f"want {n} ({ndata} data)")
    off += 4 * nruns
    digests = bytes(view[off:off + DIGEST * ndata])
    off += DIGEST * ndata
    stored = _read_u32s(view[off:off + 4 * ndata])
    if not u32_all_le(stored, max_stored(doc)):
        raise WireError(f"binary manifest: stored size {max(stored)} exceeds the chunk size")
    return doc, (runs, digests, stored)
