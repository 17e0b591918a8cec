"""The node's own state: one small JSON file per local volume under STATE_DIR/volumes/.

It survives a restart (SIGKILL included): which volumes are staged where, which targets are
published, which generation the local copy holds, whether it has unflushed writes, and the
flush job in progress. Writes are atomic (temp file + fsync + rename)."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .. import ids
from ..atomic import write_atomic

SCHEMA = 1


class FlushState(str, Enum):
    """Where a flush job stands. FENCED only when the catalog proved this node was fenced out
    (errors.Fenced); any other failure is FAILED: the local data is kept and the flush retried."""
    RUNNING = "running"
    UPLOADED = "uploaded"           # a pre-flush stored its chunks; the final pass commits
    COMMITTED = "committed"
    FAILED = "failed"
    FENCED = "fenced"


class Phase(str, Enum):
    """Where a local copy stands in its life (the state machine is in local/volumes.py)."""
    ABSENT = "absent"               # no local copy (never stored in a record)
    HYDRATING = "hydrating"         # created, the committed generation being written into it
    CLEAN = "clean"                 # unstaged, holds `generation` exactly: evictable cache
    STAGED = "staged"               # mounted at the staging path, no target
    PUBLISHED = "published"         # staged with at least one target
    RELEASED = "released"           # staged, the last target is gone (pre-flush may run)
    FLUSHING = "flushing"           # unstaged, the final flush pass runs (or is due)
    DIRTY = "dirty"                 # unstaged, unflushed writes kept; the flush is retried
    FENCED = "fenced"               # unstaged, the catalog proved another owner: discarded at next stage


@dataclass
class FlushJob:
    generation_base: int            # committed generation the job started from
    epoch: int
    state: FlushState = FlushState.RUNNING
    done_bytes: int = 0
    total_bytes: int = 0
    manifest_gen: int = 0           # generation number the manifest was stored under
    error: str = ""
    error_code: str = ""            # gRPC status code name of the failure (FAILED, FENCED)
    started_at: float = field(default_factory=time.time)
    final: bool = False             # started after unmount (no more writes possible)


@dataclass
class LocalVolume:
    id: str
    size: int = 0
    access_type: str = "mount"
    fs_type: str = ""
    mount_flags: list[str] = field(default_factory=list)
    staged_path: str = ""
    readonly: bool = False          # staged read-only
    device: str = ""
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)   # path -> {"readonly": bool}
    generation: int = 0             # generation the local copy was hydrated from / flushed as
    dirty: bool = False             # written since `generation` (staged read-write)
    persistence: str = "object"
    epoch: int = 0
    last_used: float = field(default_factory=time.time)
    flush: FlushJob | None = None
    phase: Phase = Phase.ABSENT
    schema: int = SCHEMA

    @property
    def staged(self) -> bool:
        return bool(self.staged_path)


def legacy_phase(lv: LocalVolume) -> Phase:
    """The phase of a record written before phases were recorded."""
    if lv.staged:
        return Phase.PUBLISHED if lv.targets else Phase.STAGED
    job = lv.flush
    if job is not None and job.state == FlushState.FENCED:
        return Phase.FENCED
    if job is not None and job.state == FlushState.RUNNING and job.final:
        return Phase.FLUSHING
    return Phase.DIRTY if lv.dirty and lv.persistence == "object" else Phase.CLEAN


class NodeState:
    """The records on disk. Written only by local.volumes.LocalVolumes."""

    def __init__(self, state_dir: str):
        self.dir = Path(state_dir) / "volumes"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir = Path(state_dir) / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._mu = threading.Lock()

    def _path(self, vid: str) -> Path:
        return self.dir / f"{ids.volume_id(vid)}.json"

    def journal_path(self, vid: str) -> str:
        return str(self.jobs_dir / f"{ids.volume_id(vid)}.journal")

    def get(self, vid: str) -> LocalVolume | None:
        try:
            d = json.loads(self._path(vid).read_text())
        except FileNotFoundError:
            return None
        job = d.pop("flush", None)
        known = {f.name for f in dataclasses.fields(LocalVolume)}
        lv = LocalVolume(**{k: v for k, v in d.items() if k in known})
        if job:
            lv.flush = FlushJob(**{k: v for k, v in job.items() if k in {f.name for f in dataclasses.fields(FlushJob)}})
            lv.flush.state = FlushState(lv.flush.state)
        lv.phase = Phase(d["phase"]) if d.get("phase") else legacy_phase(lv)
        return lv

    def put(self, lv: LocalVolume) -> None:
        data = json.dumps(dataclasses.asdict(lv), sort_keys=True, indent=1).encode()
        path = self._path(lv.id)
        with self._mu:
            write_atomic(path, data)

    def delete(self, vid: str) -> None:
        self._path(vid).unlink(missing_ok=True)
        Path(self.journal_path(vid)).unlink(missing_ok=True)

    def all(self) -> list[LocalVolume]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            lv = self.get(p.stem)
            if lv is not None:
                out.append(lv)
        return out
