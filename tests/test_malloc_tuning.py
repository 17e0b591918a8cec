"""malloc_tuning: glibc's mmap threshold fixed at `serve` start, so freed 4 MiB buffers of
worker threads do not stay resident in their malloc arenas."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from csi_perssd import cli, malloc_tuning

needs_glibc = pytest.mark.skipif(malloc_tuning.glibc() is None, reason="not glibc")

# Frees one mmapped 4 MiB block (glibc then raises its threshold above 4 MiB), then 4 threads
# at once each allocate a 4 MiB block, a small one, and free the big one; prints the RSS that
# stays (MiB), after `tune()` when argv[1] == "1".
PROBE = r"""
import sys, threading
from csi_perssd import malloc_tuning
if sys.argv[1] == "1":
    assert malloc_tuning.tune()
N = 4 << 20
def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
x = b"\1" * N
del x
keep, bar = [], threading.Barrier(4)
def work():
    for _ in range(2):
        a = b"\1" * N
        bar.wait()
        keep.append(b"k" * 200)
        del a
        bar.wait()
base = rss()
ts = [threading.Thread(target=work) for _ in range(4)]
for t in ts: t.start()
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
    assert retained_mib(False) >= 12          # the default: ~16 MiB (4 threads x 4 MiB) stay
    assert retained_mib(True) < 4             # tuned: ~0.1 MiB


def test_left_alone_when_the_environment_sets_it(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "262144")
    assert malloc_tuning.tune() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=262144")
    assert malloc_tuning.tune() is False


def test_not_glibc_is_a_no_op(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
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
