"""CPU priority of the warm spare lazy server: it warms up on idle CPU only, then serves at the
normal priority.

A spare's start (interpreter, imports, the S3 client's model: ~0.5 CPU-s on a node) is work done
ahead of a stage nobody has asked for yet. Started at the normal priority it took a core from
whatever ran then: profiled (perf, 2-core VM), a spare started 2 s after a lazy stage took 15% of
the machine during the reader's first seconds on the volume just staged. So the plugin starts it
under SCHED_IDLE (it runs only when nothing else wants the CPU) and puts every thread of it back
to SCHED_OTHER before handing it a volume (`to_normal`), so a spare still warming when its job
comes is not starved by the load and serves like a server started for the job.

Going back from SCHED_IDLE needs CAP_SYS_NICE (the node plugin runs privileged); without it the
spare is started at the normal priority as before (`to_idle` declines).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
CAP_SYS_NICE = 23
PASSES = 3          # to_normal looks at the threads again: one may have been made meanwhile


def can_renice() -> bool:
    """Does this process hold CAP_SYS_NICE (needed to take a process back out of SCHED_IDLE)?"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return False


def to_idle(pid: int) -> bool:
    """Put process `pid` (just started: its only thread) under SCHED_IDLE; threads it starts
    inherit it. False, with nothing changed, when it could not be taken back (no CAP_SYS_NICE)
    or the kernel refused."""
    if not can_renice():
        return False
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        return True
    except OSError as e:
        log.info("process %d stays at the normal priority: %s", pid, e)
        return False


def to_normal(pid: int) -> bool:
    """Every thread of process `pid` under SCHED_IDLE back to SCHED_OTHER. False when a thread
    could not be moved (it would be served at idle priority) or the process is gone."""
    for _ in range(PASSES):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            return False
        moved = 0
        for tid in tids:
            try:
                if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                    moved += 1
            except ProcessLookupError:
                continue            # that thread has ended
            except OSError as e:
                log.warning("thread %d of process %d stays at idle priority: %s", tid, pid, e)
                return False
        if not moved:
            return True
    return True
