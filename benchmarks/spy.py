"""Sampling profiles of the node process during one benchmark phase (py-spy, no restart, no
code change in the driver), and a plain-text summary of the folded stacks."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from pathlib import Path

from peers import find_tool


class PySpy:
    """with PySpy(pid, "flush-a.folded"): ...  -> folded stacks of every thread, 100 Hz."""

    def __init__(self, pid: int, out: str | os.PathLike[str], rate: int = 100, gil_only: bool = False,
                 native: bool = False):
        """native: C/Rust frames too (py-spy then stops the process for every sample, so the
        phase runs slower: for where the time goes, not for figures)."""
        self.pid, self.out, self.rate, self.gil_only, self.native = pid, str(out), rate, gil_only, native
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PySpy:
        argv = [find_tool("py-spy"), "record", "--pid", str(self.pid), "--rate", str(self.rate),
                "--format", "raw", "--output", self.out, "--threads"]
        argv.append("--native" if self.native else "--nonblocking")
        if self.gil_only:
            argv.append("--gil")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        time.sleep(0.5)                  # attach before the phase starts
        if self.proc.poll() is not None:
            raise RuntimeError(f"py-spy exited: {self.proc.stderr.read().decode()[-500:] if self.proc.stderr else ''}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not Path(self.out).exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.decode()[-500:]}")


def summarize(folded: str, top: int = 25) -> str:
    """Self and inclusive sample shares per function, and per thread name, from folded stacks."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(folded).read_text(errors="replace").splitlines():
        stack, _, n_s = line.rpartition(" ")
        if not stack or not n_s.isdigit():
            continue
        n = int(n_s)
        frames = stack.split(";")
        total += n
        threads[frames[0].split(" ")[0] if frames else "?"] += n
        funcs = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] if " (" in f else f for f in frames[1:]]
        if funcs:
            self_c[funcs[-1]] += n
        for f in set(funcs):
            incl[f] += n
    if not total:
        return "no samples\n"
    out = [f"{total} samples (100 Hz, all threads, idle excluded)", "", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in self_c.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    out += ["", "threads:"]
    out += [f"  {100 * n / total:5.1f}%  {t}" for t, n in threads.most_common(12)]
    return "\n".join(out) + "\n"
