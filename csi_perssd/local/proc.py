"""The one way the node runs a system tool: an argv list (never a shell), stdin closed, always a
timeout, and the tool's stderr in the CsiError when it fails.

`run` raises on a return code outside `ok`; `status` hands back the return code and the
(cleaned) stderr for callers that decide themselves. A missing tool and a timeout raise in both.
`tally()` counts and times the runs of the calling thread inside a block (the node logs it per
NodeStage: under emulation each tool run costs 0.3-1 s, and the tests hold the count).
"""
from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import Code, CsiError

log = logging.getLogger(__name__)
TOOL_TIMEOUT_S = 120.0
Classify = Callable[[str], Code]


@dataclass
class Tally:
    """The tool runs of one thread inside a `tally()` block: (name, seconds) in order."""
    runs: list[tuple[str, float]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.runs)

    @property
    def seconds(self) -> float:
        return sum(s for _, s in self.runs)

    def names(self) -> list[str]:
        return [n for n, _ in self.runs]

    def summary(self) -> str:
        """`4 tool runs in 2.10s: lvm lvs 0.61, lvm lvcreate 0.90, ...`"""
        return (f"{self.count} tool runs in {self.seconds:.2f}s"
                + (": " + ", ".join(f"{n} {s:.2f}" for n, s in self.runs) if self.runs else ""))


_local = threading.local()


@contextmanager
def tally() -> Iterator[Tally]:
    """Count the tool runs this thread makes inside the block (nested blocks all count them)."""
    t = Tally()
    stack: list[Tally] = getattr(_local, "tallies", None) or []
    _local.tallies = [*stack, t]
    try:
        yield t
    finally:
        _local.tallies = stack


def _name(argv: list[str]) -> str:
    tool = os.path.basename(argv[0])
    sub = next((a for a in argv[1:] if not a.startswith("-")), "") if tool in ("lvm", "dmsetup") else ""
    return f"{tool} {sub}" if sub else tool


def _spawn(argv: list[str], timeout: float, env: Mapping[str, str] | None, what: str | None,
           missing: Code) -> subprocess.CompletedProcess[str]:
    log.debug("run %s", argv)
    t0 = time.monotonic()
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None)
    except FileNotFoundError:
        raise CsiError(missing, f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise CsiError(Code.INTERNAL, f"{what or argv[0]} did not finish within {timeout:.0f}s: "
                                      f"{' '.join(argv)}") from None
    finally:
        for t in getattr(_local, "tallies", ()):
            t.runs.append((_name(argv), time.monotonic() - t0))


def run(argv: Sequence[str | int], *, ok: Sequence[int] = (0,), timeout: float = TOOL_TIMEOUT_S,
        what: str | None = None, env: Mapping[str, str] | None = None,
        classify: Classify | None = None, clean: Callable[[str], str] | None = None,
        missing: Code = Code.INTERNAL) -> subprocess.CompletedProcess[str]:
    """Run the tool; raise CsiError (INTERNAL, or `classify(stderr)`) with its stderr unless
    the return code is in `ok`. `clean` trims noise off stderr before it goes into the error."""
    args = [str(a) for a in argv]
    res = _spawn(args, timeout, env, what, missing)
    if res.returncode not in ok:
        err = clean(res.stderr) if clean is not None else res.stderr.strip()
        detail = err or res.stdout.strip()[-500:] or "no output"
        code = classify(detail) if classify is not None else Code.INTERNAL
        raise CsiError(code, f"{what or args[0]} failed (exit {res.returncode}): {' '.join(args)}: {detail}")
    return res


def status(argv: Sequence[str | int], *, timeout: float = TOOL_TIMEOUT_S, env: Mapping[str, str] | None = None,
           what: str | None = None) -> tuple[int, str, str]:
    """Run the tool and return (return code, stdout, stderr) whatever the code."""
    args = [str(a) for a in argv]
    res = _spawn(args, timeout, env, what, Code.INTERNAL)
    return res.returncode, res.stdout, res.stderr.strip()
