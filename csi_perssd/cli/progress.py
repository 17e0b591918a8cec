"""Progress of a long operator command (gc, takeover), for people at a terminal.

On a TTY it redraws one status line on stderr (`\\r`, cleared at the end), at most every
`min_interval` seconds; anywhere else (pipes, files, cron, CI) it writes nothing, so scripts
see only the command's own output on stdout. `--no-progress` turns it off on a terminal too.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ..remote.store import ObjectStore


class Progress:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None,
                 min_interval: float = 0.1):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            try:
                enabled = self.stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self.min_interval = min_interval
        self._last = 0.0
        self._width = 0
        self._mu = threading.Lock()

    def __call__(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        """Show `phase` (and done/total when known). Cheap when disabled or throttled; the
        last call of a phase (done == total) is always drawn."""
        if not self.enabled:
            return
        now = time.monotonic()
        final = done is not None and total is not None and done >= total
        if not final and now - self._last < self.min_interval:
            return
        self._last = now
        text = phase
        if done is not None and total:
            text += f" {done}/{total} ({100 * done // total}%)"
        elif done is not None:
            text += f" {done}"
        self._draw(text)

    def force(self, text: str) -> None:
        """Draw `text` now (no throttling); nothing when disabled."""
        if self.enabled:
            self._last = time.monotonic()
            self._draw(text)

    def _draw(self, text: str) -> None:
        with self._mu:
            self._draw_locked(text)

    def _draw_locked(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def finish(self) -> None:
        """Clear the status line (the command's own summary follows on stdout)."""
        with self._mu:
            if self.enabled and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
                self._width = 0


def store_activity(store: ObjectStore) -> str:
    """`N requests (get=.., list=.., ...)` the store made so far (its stats); '' before its
    first request (the caller then says what it is doing)."""
    reqs = store.stats.snapshot().get("requests", {})
    parts = " ".join(f"{op}={n}" for op, n in sorted(reqs.items()) if n)
    return f"{sum(reqs.values())} requests ({parts})" if parts else ""


class Ticker:
    """Redraws `progress(text())` every `every` seconds on a thread while a blocking call runs:
    for operations that report nothing themselves (one collection, one conditional update).

        with Ticker(progress, lambda: f"gc: {store_activity(store)}"):
            collect(...)
    """

    def __init__(self, progress: Progress, text: Callable[[], str], every: float = 0.2):
        self.progress, self.text, self.every = progress, text, every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _line(self) -> str:
        return f"{self.text()} [{time.monotonic() - self._t0:.1f}s]"

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.progress.force(self._line())

    def __enter__(self) -> Ticker:
        self._t0 = time.monotonic()
        if self.progress.enabled:
            self.progress.force(self._line())
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self.progress.finish()


def add_flag(p: object) -> None:
    """--no-progress on a long command's parser."""
    p.add_argument("--no-progress", dest="progress", action="store_false",  # type: ignore[attr-defined]
                   help="no progress line on the terminal (it is only ever drawn on a TTY)")


def from_args(args: object) -> Progress:
    return Progress(enabled=None if getattr(args, "progress", True) else False)
