"""Driver processes for tests, the demo and benchmarks: start `csi-perssd serve` on a unix
socket, talk to it through the generated stubs, stop it with SIGTERM (or kill it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from csi_perssd.csi import csi_pb2 as pb

from .stubs import CsiStubs


class DriverProcess(CsiStubs):
    def __init__(self, workdir: str | os.PathLike[str], *, mode: str = "all", node_id: str = "node-a",
                 pool: str = "pool-1", catalog: str = "", env: dict[str, str] | None = None,
                 extra: list[str] | None = None, name: str | None = None):
        self.name = name or (node_id if mode != "controller" else "controller")
        self.dir = Path(workdir) / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.dir / "csi.sock")
        self.mode, self.node_id, self.pool = mode, node_id, pool
        self.catalog = catalog or f"file://{Path(workdir) / 'catalog'}"
        self.env = dict(os.environ, **(env or {}))
        self.extra = list(extra or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "driver.log"
        self._channel: grpc.Channel | None = None

    @property
    def rawfile_dir(self) -> str:
        return str(self.dir / "volumes")

    @property
    def state_dir(self) -> str:
        return str(self.dir / "state")

    def argv(self) -> list[str]:
        a = [sys.executable, "-m", "csi_perssd.cli", "serve", "--mode", self.mode,
             "--endpoint", f"unix://{self.socket}", "--catalog", self.catalog, "--log-level", "debug",
             "--heartbeat-seconds", "2", "--grace-seconds", "10"]
        if self.mode != "controller":
            a += ["--node-id", self.node_id, "--pool", self.pool, "--state-dir", self.state_dir,
                  "--backend", "rawfile", "--rawfile-dir", self.rawfile_dir]
        return a + self.extra

    def start(self, timeout: float = 30.0) -> DriverProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"driver {self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if os.path.exists(self.socket):
                try:
                    self.identity.Probe(pb.ProbeRequest(), timeout=max(2.0, min(30.0, deadline - time.monotonic())))
                    return self
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"driver {self.name} did not come up in {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        self._close()
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self._close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> DriverProcess:
        self.stop()
        return self.start()
