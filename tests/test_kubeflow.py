"""deploy/examples/kubeflow: the KFP v2 pipelines compile offline with the real kfp and
kfp-kubernetes SDKs, and the compiled specs share one perssd-nvme claim across steps pinned to
different nodes. kfp pins kubernetes and protobuf below the driver's, so it runs from its own
venv (.venv-kfp, made by `make deps`; PERSSD_KFP_PYTHON overrides)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "examples" / "kubeflow"
STEPS = ("produce", "verify")


def _kfp_python() -> str:
    py = os.environ.get("PERSSD_KFP_PYTHON") or str(ROOT / ".venv-kfp" / "bin" / "python")
    if not os.access(py, os.X_OK):
        pytest.fail(f"{py} is missing: `make deps` builds .venv-kfp with "
                    f"deploy/examples/kubeflow/requirements.txt", pytrace=False)
    return py


def _compile(tmp_path: Path, *flags: str) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path / "pipeline.yaml"
    res = subprocess.run([_kfp_python(), str(EXAMPLE / "pipeline.py"), "--output", str(out), *flags],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["root"]["dag"]["tasks"]


def _executor(spec: dict[str, Any], task: str) -> str:
    comp = _tasks(spec)[task]["componentRef"]["name"]
    return str(spec["components"][comp]["executorLabel"])


def _check_steps(spec: dict[str, Any], executors: dict[str, Any], claim: dict[str, Any]) -> None:
    """Both steps mount CLAIM at /data, on different nodes, verify after produce."""
    tasks = _tasks(spec)
    assert set(STEPS) <= set(tasks)
    params = spec["root"]["inputDefinitions"]["parameters"]
    selectors = []
    for step in STEPS:
        ex = executors[_executor(spec, step)]
        (mount,) = ex["pvcMount"]
        assert mount["mountPath"] == "/data"
        assert mount["pvcNameParameter"] == claim
        sel = ex["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"]
        selectors.append(params[sel]["defaultValue"])
        assert tasks[step]["inputs"]["parameters"]["data_dir"]["runtimeValue"]["constant"] == "/data"
    assert selectors[0] != selectors[1], f"both steps may land on one node: {selectors}"
    assert all(set(s) == {"kubernetes.io/hostname"} for s in selectors)
    assert "produce" in tasks["verify"]["dependentTasks"]
    arg = tasks["verify"]["inputs"]["parameters"]["sha256"]["taskOutputParameter"]
    assert arg["producerTask"] == "produce"


def test_pipeline_creates_a_perssd_claim_shared_by_every_step(tmp_path: Path) -> None:
    spec, executors = _compile(tmp_path)
    assert spec["pipelineInfo"]["name"] == "perssd-shared-volume"
    create = _tasks(spec)["createpvc"]["inputs"]["parameters"]
    assert create["storage_class_name"]["runtimeValue"]["constant"] == "perssd-nvme"
    assert create["access_modes"]["runtimeValue"]["constant"] == ["ReadWriteOnce"]
    claim = {"taskOutputParameter": {"outputParameterKey": "name", "producerTask": "createpvc"}}
    _check_steps(spec, executors, claim)
    # every container step (not the PVC create/delete drivers) mounts the claim
    steps = {t for t in _tasks(spec) if t not in ("createpvc", "deletepvc")}
    assert steps == set(STEPS)
    delete = _tasks(spec)["deletepvc"]
    assert "verify" in delete["dependentTasks"]
    assert delete["inputs"]["parameters"]["pvc_name"] == claim


def test_named_pipeline_mounts_the_claim_it_is_given(tmp_path: Path) -> None:
    spec, executors = _compile(tmp_path, "--named")
    assert spec["pipelineInfo"]["name"] == "perssd-named-volume"
    assert "createpvc" not in _tasks(spec)
    assert spec["root"]["inputDefinitions"]["parameters"]["pvc_name"]["parameterType"] == "STRING"
    _check_steps(spec, executors, {"componentInputParameter": "pvc_name"})


def test_the_steps_hand_data_over_through_the_directory(tmp_path: Path) -> None:
    """The components' own functions, run in the kfp venv on one directory: what produce
    writes, verify accepts; a changed byte fails it."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import pipeline as p\n"
        "d = sys.argv[2]; h = p.produce.python_func(d, 3); p.verify.python_func(d, h)\n"
        "f = open(d + '/dataset.bin', 'r+b'); f.seek(12345); b = f.read(1); f.seek(12345)\n"
        "f.write(bytes([b[0] ^ 1])); f.close()\n"
        "try:\n    p.verify.python_func(d, h)\nexcept SystemExit as e:\n    print('rejected:', e)\n")
    res = subprocess.run([_kfp_python(), "-c", code, str(EXAMPLE), str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "produced 3 MiB" in res.stdout and "verified on" in res.stdout
    assert "rejected: dataset.bin differs" in res.stdout
    assert (tmp_path / "dataset.bin").stat().st_size == 3 << 20
