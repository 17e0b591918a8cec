"""malloc_tuning: glibc limited to two malloc arenas at `serve` start, so freed 4 MiB buffers of
worker threads are reused across threads instead of staying resident in one arena each."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from csi_perssd import cli, malloc_tuning

needs_glibc = pytest.mark.skipif(malloc_tuning.glibc() is None, reason="not glibc")

# Frees one mmapped 4 MiB block (glibc then raises its threshold above 4 MiB), then 8 threads,
# all alive, in turn each allocate a 4 MiB block and a small one (kept) and free the big one
# (one at a time: a thread whose arena is free takes it, so the big one is reused only when the
# arenas are shared); prints the RSS that stays (MiB), after `tune()` when argv[1] == "1".
PROBE = r"""
import sys, threading
from csi_perssd import malloc_tuning
if sys.argv[1] == "1":
    assert malloc_tuning.tune()
N, T = 4 << 20, 8
def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
x = b"\1" * N
del x
keep, turn, end = [], [threading.Event() for _ in range(T + 1)], threading.Barrier(T)
def work(k):
    keep.append(b"s" * 100)             # each thread has its arena (or shares one) from here
    turn[k].wait()
    a = b"\1" * N
    keep.append(b"k" * 200)
    del a
    turn[k + 1].set()
    end.wait()
base = rss()
ts = [threading.Thread(target=work, args=(k,)) for k in range(T)]
for t in ts: t.start()
turn[0].set()
for t in ts: t.join()
print((rss() - base) / (1 << 20))
"""


def retained_mib(tuned: bool) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if tuned else "0"], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@needs_glibc
def test_freed_thread_buffers_do_not_stay_resident():
    untuned, tuned = retained_mib(False), retained_mib(True)
    assert untuned >= 20, untuned             # the default: an arena per thread, ~4 MiB each stays
    assert tuned <= 12, tuned                 # two arenas: the big block reused


def test_left_alone_when_the_environment_sets_it(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert malloc_tuning.tune() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    assert malloc_tuning.tune() is False


def test_not_glibc_is_a_no_op(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(malloc_tuning, "glibc", lambda: None)
    assert malloc_tuning.tune() is False


def test_serve_tunes_before_the_runtime_starts(monkeypatch):
    import csi_perssd.runtime
    calls = []
    monkeypatch.setattr(malloc_tuning, "tune", lambda: calls.append("tune") or True)

    def runtime(cfg):
        calls.append("runtime")
        raise ValueError("stop here")
    monkeypatch.setattr(csi_perssd.runtime, "Runtime", runtime)
    assert cli.main(["serve", "--mode", "node", "--node-id", "n1"]) == 2
    assert calls == ["tune", "runtime"]
