"""The node's copies of unwrapped lineage keys: one 0600 file per volume under STATE_DIR/keys/
(directory 0700), only while the volume is staged or holds unflushed writes.

Why on disk: NodeUnstage carries no secrets, yet a node restarted in the middle of an
encrypted volume's final flush must resume and commit it. The file holds the data key of that
volume's lineage only — not the KEK, which would unlock every lineage wrapped with it — and it
sits next to the volume's plaintext, which is on this disk anyway while the volume is here.
It is removed when the final flush has committed (NodeUnstage succeeds) and whenever the local
copy is removed. Key bytes never reach a log line or an error message.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from pathlib import Path

from .. import ids
from ..atomic import write_atomic
from ..crypto.errors import Tampered
from ..crypto.keys import LineageKeys


class NodeKeys:
    def __init__(self, state_dir: str):
        self.dir = Path(state_dir) / "keys"
        self._mu = threading.Lock()
        self._cache: dict[str, LineageKeys] = {}

    def path(self, vid: str) -> Path:
        return self.dir / f"{ids.volume_id(vid)}.key"

    def put(self, vid: str, keys: LineageKeys) -> None:
        doc = {"lineage": keys.lineage, "key": base64.b64encode(keys.data_key).decode()}
        with self._mu:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            write_atomic(self.path(vid), json.dumps(doc).encode())     # mkstemp: mode 0600
            self._cache[vid] = keys

    def get(self, vid: str) -> LineageKeys | None:
        """The volume's lineage keys (memory, else its file), None when this node has none."""
        with self._mu:
            got = self._cache.get(vid)
            if got is not None:
                return got
            try:
                doc = json.loads(self.path(vid).read_bytes())
                keys = LineageKeys.derive(doc["lineage"], base64.b64decode(doc["key"], validate=True))
            except FileNotFoundError:
                return None
            except (ValueError, KeyError, TypeError, binascii.Error, Tampered):
                return None                 # a damaged file: as if there were none
            self._cache[vid] = keys
            return keys

    def drop(self, vid: str) -> None:
        with self._mu:
            self._cache.pop(vid, None)
            self.path(vid).unlink(missing_ok=True)
