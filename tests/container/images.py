"""Images for the container tests: a base when no registry answers, and the real Dockerfile.

The shipped Dockerfile's base is a build argument (PYTHON_IMAGE, default the official
python:3.11.N-slim-bookworm that users pull). When the daemon can pull it, the tests use it.
When no registry is reachable, they build a stand-in from Debian packages: debootstrap
--variant=minbase bookworm with python3 + pip (the Debian "externally managed" marker removed,
`python` on PATH), imported with `docker import`. This network intercepts TLS, so pip inside
`docker build` only works when it trusts the host's CA bundle: the stand-in (and only it)
carries that bundle and points PIP_CERT / REQUESTS_CA_BUNDLE / SSL_CERT_FILE at it. The shipped
Dockerfile never copies or trusts it.

The stand-in is tagged with a hash of everything it is made from (recipe, mirror, packages,
the CA bundle's bytes), so it is built once per machine and reused while nothing changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .daemon import DATA_ROOT, Daemon, DaemonError

ROOT = Path(__file__).resolve().parents[2]
RECIPE_VERSION = 1
SUITE = "bookworm"
PACKAGES = ("python3", "python3-pip", "ca-certificates")
MIRROR = os.environ.get("PERSSD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
HOST_CA = Path(os.environ.get("PERSSD_HOST_CA", "/etc/ssl/certs/ca-certificates.crt"))
BASE_CA_PATH = "/etc/ssl/perssd-test-host-ca.crt"        # inside the stand-in base only
CA_ENV = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
BASE_REPO = "perssd-test-base"
IMAGE_TAG = os.environ.get("PERSSD_TEST_IMAGE_TAG", "csi-perssd:test")


@dataclass(frozen=True)
class Base:
    image: str           # what PYTHON_IMAGE is set to
    official: bool       # pulled from a registry (False: the Debian stand-in)
    seconds: float       # time spent getting it now (0 when cached)


def dockerfile_default_base(dockerfile: Path = ROOT / "Dockerfile") -> str:
    m = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile.read_text(), re.M)
    if not m:
        raise DaemonError("the Dockerfile has no `ARG PYTHON_IMAGE=...` default")
    return m.group(1)


def stand_in_recipe() -> dict[str, object]:
    ca = HOST_CA.read_bytes() if HOST_CA.exists() else b""
    return {"version": RECIPE_VERSION, "suite": SUITE, "variant": "minbase", "mirror": MIRROR,
            "packages": sorted(PACKAGES), "ca_sha256": hashlib.sha256(ca).hexdigest(),
            "ca_path": BASE_CA_PATH}


def stand_in_tag(recipe: dict[str, object]) -> str:
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return f"{BASE_REPO}:{digest}"


def image_exists(d: Daemon, ref: str) -> bool:
    return d.run("image", "inspect", ref, check=False, timeout=30).returncode == 0


def ensure_base(d: Daemon) -> Base:
    """The official base when present or pullable, else the cached or freshly built stand-in."""
    forced = os.environ.get("PERSSD_TEST_BASE")
    if forced:
        return Base(forced, official=False, seconds=0.0)
    official = dockerfile_default_base()
    if image_exists(d, official):
        return Base(official, official=True, seconds=0.0)
    t0 = time.monotonic()
    if d.run("pull", official, check=False, timeout=300).returncode == 0:
        return Base(official, official=True, seconds=time.monotonic() - t0)
    tag = stand_in_tag(stand_in_recipe())
    if image_exists(d, tag):
        return Base(tag, official=False, seconds=0.0)
    build_stand_in(d, tag)
    return Base(tag, official=False, seconds=time.monotonic() - t0)


def build_stand_in(d: Daemon, tag: str) -> None:
    if not shutil.which("debootstrap"):
        raise DaemonError("no registry answers and debootstrap is not installed (apt-get install debootstrap)")
    DATA_ROOT.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=DATA_ROOT.parent))
    try:
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
              str(root), MIRROR], "debootstrap", timeout=900)
        (root / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
        (root / "usr/bin/python").unlink(missing_ok=True)
        (root / "usr/bin/python").symlink_to("python3")
        if HOST_CA.exists():
            shutil.copyfile(HOST_CA, root / BASE_CA_PATH.lstrip("/"))
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        changes = ["--change", 'CMD ["python3"]', "--change", "ENV LANG=C.UTF-8"]
        if HOST_CA.exists():
            for var in CA_ENV:
                changes += ["--change", f"ENV {var}={BASE_CA_PATH}"]
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."],
                               stdout=subprocess.PIPE)
        imp = subprocess.run(d.argv("import", *changes, "-", tag), stdin=tar.stdout,
                             capture_output=True, text=True, timeout=600)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imp.returncode != 0:
            raise DaemonError(f"docker import of the stand-in base failed: {imp.stderr.strip()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(argv: list[str], what: str, timeout: float) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise DaemonError(f"{what} failed (exit {res.returncode}): {(res.stderr or res.stdout)[-3000:]}")


def build_driver_image(d: Daemon, base: str, tag: str, *, context: Path = ROOT,
                       dockerfile: Path | None = None) -> float:
    """`docker build` of the project's Dockerfile on `base`; returns the seconds it took."""
    t0 = time.monotonic()
    argv = ["build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base}", "-t", tag,
            "-f", str(dockerfile or context / "Dockerfile"), str(context)]
    res = d.run(*argv, timeout=1500, check=False)
    if res.returncode != 0:
        raise DaemonError(f"docker build of {dockerfile or 'the Dockerfile'} failed (exit "
                          f"{res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")
    return time.monotonic() - t0


def image_size(d: Daemon, ref: str) -> int:
    return int(d.run("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip())


def image_config(d: Daemon, ref: str) -> dict[str, object]:
    out = d.run("image", "inspect", "--format", "{{json .Config}}", ref).stdout
    cfg: dict[str, object] = json.loads(out)
    return cfg
