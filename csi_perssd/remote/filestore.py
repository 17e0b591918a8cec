"""FileStore: the ObjectStore interface on a local directory (file:///DIR).

Used for single-machine setups and tests of the catalog. Writes are atomic (temp file + rename);
conditional writes hold an flock on DIR/.lock so two processes sharing the directory cannot both
win. The etag is the MD5 of the content, as S3 gives for single-part objects.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..atomic import write_atomic
from .store import NotFound, ObjectInfo, Page, PreconditionFailed, Retry, StoreError, StoreStats, check_key


def _etag(data: bytes | bytearray | memoryview) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _version(st: os.stat_result) -> str:
    """A listing's version tag without reading the file: every write is a rename of a new file
    (a new inode), so inode + mtime + size change whenever the content does."""
    return f"v{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


class FileStore:
    def __init__(self, root: str):
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self.stats = StoreStats()       # counted like S3Store's: one request per call
        self.retry = Retry(attempts=1)  # a local directory: a failure is not retried
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.root}: {e}") from e

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def get(self, key: str) -> tuple[bytes, str]:
        data, etag = self._read(key, None)
        assert isinstance(data, bytes)      # no buffer: the file's bytes
        return data, etag

    def get_into(self, key: str, buf: memoryview) -> tuple[bytes | memoryview, str]:
        return self._read(key, buf)

    def _read(self, key: str, buf: memoryview | None) -> tuple[bytes | memoryview, str]:
        """The object's content: read into `buf` when given and it fits, else as bytes."""
        path = self._path(key)
        self.stats.count("get")
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if buf is None or size > len(buf):
                    data: bytes | memoryview = f.read()
                else:
                    got = 0
                    while got < size and (n := f.readinto(buf[got:size])):
                        got += n
                    data = buf[:got]
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(key) from None
        except OSError as e:
            self.stats.add(errors=1, op="get")
            raise StoreError(f"read {key}: {e}") from e
        self.stats.add(down=len(data))
        return data, _etag(data)

    def head(self, key: str) -> ObjectInfo | None:
        p = self._path(key)
        self.stats.count("head")
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not p.is_file():
            return None
        return ObjectInfo(key=key, size=st.st_size, etag=_etag(p.read_bytes()), mtime=st.st_mtime)

    def _write(self, path: Path, data: bytes | bytearray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def put(self, key: str, data: bytes | bytearray, *, if_none_match: bool = False,
            if_match: str | None = None) -> str:
        path = self._path(key)
        self.stats.count("put", up=len(data))
        try:
            if not if_none_match and if_match is None:
                self._write(path, data)
                return _etag(data)
            with self._locked():
                exists = path.is_file()
                if if_none_match and exists:
                    raise PreconditionFailed(f"{key} already exists")
                if if_match is not None:
                    if not exists or _etag(path.read_bytes()) != if_match:
                        raise PreconditionFailed(f"{key} changed (etag mismatch)")
                self._write(path, data)
                return _etag(data)
        except PreconditionFailed:
            raise
        except OSError as e:
            self.stats.add(errors=1, op="put")
            raise StoreError(f"write {key}: {e}") from e

    def delete(self, key: str) -> None:
        path = self._path(key)
        self.stats.count("delete")
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            self.stats.add(errors=1, op="delete")
            raise StoreError(f"delete {key}: {e}") from e

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # walk only the directory that can hold the prefix
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base if base else self.root
        self.stats.count("list")
        if not start.is_dir():
            return
        keys: list[tuple[str, os.stat_result]] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if fn.startswith("."):
                    continue
                full = Path(dirpath) / fn
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    try:
                        keys.append((key, full.stat()))
                    except FileNotFoundError:
                        continue
        for key, st in sorted(keys):
            yield ObjectInfo(key=key, size=st.st_size, etag=_version(st), mtime=st.st_mtime)

    def scan_pages(self, prefix: str, start_after: str = "", token: str = "") -> Iterator[tuple[Page, str]]:
        """One page: every object under prefix after start_after (a directory walk is one read)."""
        yield list(self.scan(prefix, start_after)), ""

    def scan(self, prefix: str, start_after: str = "") -> Iterator[ObjectInfo]:
        """Objects under prefix with keys after start_after, in key order."""
        if start_after and not start_after.startswith(prefix):
            raise ValueError("start_after must lie under the scanned prefix")
        for info in self.list(prefix):
            if info.key > start_after:
                yield info
