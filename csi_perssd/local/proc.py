"""The one way the node runs a system tool: an argv list (never a shell), stdin closed, always a
timeout, and the tool's stderr in the CsiError when it fails.

`run` raises on a return code outside `ok`; `status` hands back the return code and the
(cleaned) stderr for callers that decide themselves. A missing tool and a timeout raise in both.
"""
from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Mapping, Sequence

from ..errors import Code, CsiError

log = logging.getLogger(__name__)
TOOL_TIMEOUT_S = 120.0
Classify = Callable[[str], Code]


def _spawn(argv: list[str], timeout: float, env: Mapping[str, str] | None, what: str | None,
           missing: Code) -> subprocess.CompletedProcess[str]:
    log.debug("run %s", argv)
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env=dict(env) if env is not None else None)
    except FileNotFoundError:
        raise CsiError(missing, f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise CsiError(Code.INTERNAL, f"{what or argv[0]} did not finish within {timeout:.0f}s: "
                                      f"{' '.join(argv)}") from None


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
