"""The image built from the project's Dockerfile: every tool the driver calls is there and runs,
the CLI runs as the image's non-root user, no compiler or test harness ships, and the host CA
bundle the test base trusts did not leak into what the Dockerfile adds."""
from __future__ import annotations

import json
import re
from pathlib import Path

from . import images
from .conftest import FIGURES
from .daemon import Daemon
from .tools import driver_tools

ROOT = Path(__file__).resolve().parents[2]

# Runs inside the image (its own python): for each tool, where it is and whether it executes.
PROBE = r"""
import json, shutil, subprocess, sys
out = {}
for tool in sys.argv[1:]:
    path = shutil.which(tool)
    if path is None:
        out[tool] = {"path": None}
        continue
    tries = []
    for flag in ("--version", "-V", "version", "--help"):
        try:
            r = subprocess.run([path, flag], capture_output=True, text=True, timeout=20)
        except OSError as e:
            tries.append({"flag": flag, "error": str(e)})
            break
        text = (r.stdout + r.stderr).strip()
        tries.append({"flag": flag, "rc": r.returncode, "out": text[:200]})
        if r.returncode == 0 and text:
            break
    out[tool] = {"path": path, "tries": tries}
print(json.dumps(out))
"""


def _runs(result: dict) -> bool:
    """It executed: some invocation exited 0 with output, or printed its usage (a real binary
    whose flags differ) without a loader or exec failure."""
    for t in result.get("tries", []):
        if "error" in t or t["rc"] in (126, 127) or "error while loading shared libraries" in t["out"]:
            return False
    return any(t["out"] and (t["rc"] == 0 or re.search(r"usage|version", t["out"], re.I))
               for t in result.get("tries", []))


def test_every_tool_the_driver_calls_is_present_and_runs(docker: Daemon, image: str) -> None:
    tools = sorted(driver_tools())
    res = docker.run("run", "--rm", "--user", "0", "--entrypoint", "python", image, "-c", PROBE, *tools,
                     timeout=180)
    found = json.loads(res.stdout)
    missing = {t: sorted(src)[:2] for t, src in driver_tools().items() if found[t]["path"] is None}
    assert not missing, f"tools the driver calls are missing from the image (tool: called at): {missing}"
    broken = {t: found[t]["tries"] for t in tools if not _runs(found[t])}
    assert not broken, f"tools in the image that do not run: {broken}"
    FIGURES["tools"] = f"{len(tools)} derived from the code, all present and running: {' '.join(tools)}"


def test_cli_runs_as_the_images_non_root_user(docker: Daemon, image: str) -> None:
    cfg = images.image_config(docker, image)
    user = str(cfg.get("User") or "")
    assert re.fullmatch(r"[1-9]\d*:\d+", user), f"image USER {user!r} is not a numeric non-root uid:gid"
    version = docker.run("run", "--rm", image, "--version").stdout.strip()
    from csi_perssd import __version__
    assert version == f"csi-perssd {__version__}"
    ident = docker.run("run", "--rm", "--entrypoint", "id", image).stdout
    uid, gid = user.split(":")
    assert re.search(rf"uid={uid}\b.*gid={gid}\b", ident), ident
    assert cfg.get("Entrypoint") == ["csi-perssd"]


NO_HARNESS = r"""
import importlib.util, json, pathlib, shutil
import csi_perssd
def has(m):
    try:
        return importlib.util.find_spec(m) is not None
    except ModuleNotFoundError:
        return False
pkg = pathlib.Path(csi_perssd.__file__).parent
print(json.dumps({
  "compilers": {c: shutil.which(c) for c in ("gcc", "cc", "c++", "g++", "clang", "make", "ld", "as", "go")
                if shutil.which(c)},
  "modules": [m for m in ("tests", "tests.harness", "pytest", "grpc_tools", "mypy", "ruff", "csi_perssd.tools")
              if has(m)],
  "harness_files": sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                          if p.stem in ("cluster", "seaweed", "procs", "sanity", "cleanup", "demo", "genproto")),
}))
"""


def test_no_compiler_and_no_test_harness_in_the_image(docker: Daemon, image: str) -> None:
    found = json.loads(docker.run("run", "--rm", "--entrypoint", "python", image, "-c", NO_HARNESS).stdout)
    assert found["compilers"] == {}, f"build tools in the image: {found['compilers']}"
    assert found["modules"] == [], f"test or build modules in the image: {found['modules']}"
    assert found["harness_files"] == [], f"test harness shipped in the package: {found['harness_files']}"


def test_host_ca_bundle_is_trusted_only_by_the_test_base(docker: Daemon, base: images.Base, image: str) -> None:
    text = (ROOT / "Dockerfile").read_text()
    for needle in ("ca-certificates.crt", images.BASE_CA_PATH, *images.CA_ENV):
        assert needle not in text, f"the shipped Dockerfile refers to {needle}"
    env_of = lambda ref: set(images.image_config(docker, ref).get("Env") or [])  # noqa: E731
    added = env_of(image) - env_of(base.image)
    assert not [e for e in added if e.split("=", 1)[0] in images.CA_ENV], added
    if not base.official:
        assert {f"{v}={images.BASE_CA_PATH}" for v in images.CA_ENV} <= env_of(base.image)


def test_image_size_is_reported(docker: Daemon, image: str) -> None:
    size = images.image_size(docker, image)
    assert size > 50e6, f"{size} bytes is too small for python + the driver + its tools"
    assert "image" in FIGURES


IMPORT_ALL = r"""
import importlib, json, pkgutil
import csi_perssd
failed = {}
for m in pkgutil.walk_packages(csi_perssd.__path__, "csi_perssd."):
    if m.name.endswith(".__main__"):
        continue
    try:
        importlib.import_module(m.name)
    except Exception as e:
        failed[m.name] = f"{type(e).__name__}: {e}"
print(json.dumps(failed))
"""


def test_every_module_of_the_package_imports_in_the_image(docker: Daemon, image: str) -> None:
    """Shared libraries the Python dependencies load (libfuse for the FUSE server, ...)."""
    failed = json.loads(docker.run("run", "--rm", "--entrypoint", "python", image, "-c", IMPORT_ALL).stdout)
    assert failed == {}, f"modules that do not import in the image: {failed}"
