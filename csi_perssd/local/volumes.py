"""The local-volume manager: the ONLY writer of the node's state records (LocalVolume).

Every change goes through `update` (read-modify-write under one lock, so the Node RPCs, the
flush threads, the snapshot worker and eviction never write back a stale copy of each other's
fields) and names the phase the volume moves to; a move the state machine does not allow raises
`IllegalTransition` before anything is written.

The phases of a local copy (`Phase`):

    ABSENT ──create──▶ HYDRATING ──hydrated / nothing to hydrate──▶ CLEAN
    CLEAN | DIRTY ──NodeStage (mount)──▶ STAGED ──NodePublish──▶ PUBLISHED
    PUBLISHED ──last NodeUnpublish──▶ RELEASED (pre-flush in the background) ──NodePublish──▶ PUBLISHED
    STAGED | RELEASED ──NodeUnstage──▶ FLUSHING (object, written) | CLEAN (nothing to flush)
    FLUSHING ──committed──▶ CLEAN      ──failed (kept, retried)──▶ DIRTY
             ──the catalog proved this node fenced out──▶ FENCED
    DIRTY ──NodeUnstage again / resume──▶ FLUSHING
    HYDRATING | CLEAN | DIRTY | FLUSHING | FENCED ──discard (evicted, stale, fenced, deleted)──▶ ABSENT

A flush job that no thread runs any more (the process restarted) leaves FLUSHING for DIRTY when
the volume is staged again. Only FENCED copies, copies of an older generation than the
committed one, clean copies (eviction) and copies of deleted volumes are ever discarded.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import Code, CsiError
from ..locks import IdLocks
from .state import LocalVolume, NodeState, Phase

ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.ABSENT: frozenset({Phase.HYDRATING}),
    Phase.HYDRATING: frozenset({Phase.CLEAN, Phase.ABSENT}),
    Phase.CLEAN: frozenset({Phase.STAGED, Phase.ABSENT}),
    Phase.STAGED: frozenset({Phase.PUBLISHED, Phase.FLUSHING, Phase.CLEAN}),
    Phase.PUBLISHED: frozenset({Phase.RELEASED}),
    Phase.RELEASED: frozenset({Phase.PUBLISHED, Phase.FLUSHING, Phase.CLEAN}),
    Phase.FLUSHING: frozenset({Phase.CLEAN, Phase.DIRTY, Phase.FENCED, Phase.ABSENT}),
    Phase.DIRTY: frozenset({Phase.FLUSHING, Phase.STAGED, Phase.FENCED, Phase.ABSENT}),
    Phase.FENCED: frozenset({Phase.ABSENT}),
}
STAGED_PHASES = frozenset({Phase.STAGED, Phase.PUBLISHED, Phase.RELEASED})


class IllegalTransition(CsiError):
    """A state change the machine does not allow: a bug in the caller, nothing was written."""

    def __init__(self, vid: str, src: Phase, dst: Phase):
        super().__init__(Code.INTERNAL, f"volume {vid}: illegal local state change {src.value} -> {dst.value}")
        self.src, self.dst = src, dst


def check_transition(vid: str, src: Phase, dst: Phase) -> None:
    if src != dst and dst not in ALLOWED[src]:
        raise IllegalTransition(vid, src, dst)


class LocalVolumes:
    """Owner of the node state directory: reads hand out copies, writes are transitions."""

    def __init__(self, state: NodeState):
        self._state = state
        self._mu = threading.RLock()
        self.locks = IdLocks()          # per-volume: one RPC (or snapshot cut) at a time

    @contextmanager
    def hold(self, *vids: str) -> Iterator[None]:
        """The volumes' operation locks (ABORTED when another operation holds one)."""
        with self.locks.hold(*vids):
            yield

    def get(self, vid: str) -> LocalVolume | None:
        return self._state.get(vid)

    def phase(self, vid: str) -> Phase:
        lv = self._state.get(vid)
        return Phase.ABSENT if lv is None else lv.phase

    def all(self) -> list[LocalVolume]:
        return self._state.all()

    def journal_path(self, vid: str) -> str:
        return self._state.journal_path(vid)

    def create(self, lv: LocalVolume) -> LocalVolume:
        """ABSENT -> HYDRATING: the local volume is being made; a crash leaves generation 0,
        never a copy that counts as current."""
        with self._mu:
            cur = self._state.get(lv.id)
            check_transition(lv.id, Phase.ABSENT if cur is None else cur.phase, Phase.HYDRATING)
            lv.phase = Phase.HYDRATING
            self._state.put(lv)
            return lv

    def update(self, vid: str, fn: Callable[[LocalVolume], None] | None = None,
               to: Phase | None = None) -> LocalVolume:
        """Apply `fn` to the current record and move it to phase `to` (unchanged when None);
        NOT_FOUND when there is no record, IllegalTransition when the move is not allowed."""
        with self._mu:
            lv = self._state.get(vid)
            if lv is None:
                raise CsiError(Code.NOT_FOUND, f"volume {vid} has no local state")
            src = lv.phase
            if to is not None:
                check_transition(vid, src, to)
            if fn is not None:
                fn(lv)
            lv.id = vid
            lv.phase = to if to is not None else src
            self._state.put(lv)
            return lv

    def update_if(self, vid: str, fn: Callable[[LocalVolume], None] | None = None,
                  to: Phase | None = None) -> LocalVolume | None:
        """`update` for a record that may be gone meanwhile (a background job): None then."""
        with self._mu:
            if self._state.get(vid) is None:
                return None
            return self.update(vid, fn, to)

    def remove(self, vid: str) -> None:
        """-> ABSENT: forget the record and its journal (the caller deleted the local data)."""
        with self._mu:
            cur = self._state.get(vid)
            if cur is not None:
                check_transition(vid, cur.phase, Phase.ABSENT)
            self._state.delete(vid)
