"""A Kubernetes container spec (as rendered from deploy/kubernetes) -> `docker run` arguments.

Pure: no daemon, no file system. The test renders the manifests with kustomize and runs the
containers from what this returns, so the containers the tests run cannot drift from the ones
the manifests declare: args (with $(VAR) expansion), env / envFrom (ConfigMap, Secret,
fieldRef), the pod and container securityContext, volumes and volumeMounts (hostPath with its
type, emptyDir, readOnly, subPath, mountPropagation), resource limits and the projected
service-account token.

What kubelet would do and `docker run` cannot, mapped to the closest equivalent (each one is
listed in RunSpec.notes, so a test can print it):
- privileged: true -> --privileged fails in this sandbox ("unable to apply caps"); the node
  plugin gets --cap-add SYS_ADMIN --cap-add MKNOD, unconfined seccomp and AppArmor and
  device-cgroup rules `b *:* rwm`, `c *:* rwm` (access to every block and char device);
- the pod network namespace -> --network host; each containerPort the container declares gets
  a free host port, and an argument that listens on it (`--x=:9808`, `--x=0.0.0.0:9808`) is
  rewritten to 127.0.0.1:<that port>;
- hostPath paths are host directories the caller chooses (two "nodes" share one machine);
- mountPropagation Bidirectional -> bind-propagation=rshared (the caller makes the host source
  a shared mount, as a kubelet host is), HostToContainer -> rslave, None -> rprivate;
- fsGroup -> --group-add plus emptyDirs the caller makes group-owned (kubelet's chown);
- liveness probes and the sidecars are not run (the tests call the CSI socket themselves).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

PRIVILEGED_EQUIVALENT = (
    "--cap-add", "SYS_ADMIN", "--cap-add", "MKNOD",
    "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
    "--device-cgroup-rule", "b *:* rwm", "--device-cgroup-rule", "c *:* rwm",
)
PROPAGATION = {"Bidirectional": "rshared", "HostToContainer": "rslave", "None": "rprivate"}
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
HOSTPATH_TYPES = ("", "DirectoryOrCreate", "Directory")


class TranslateError(ValueError):
    """What kubelet would refuse (CreateContainerConfigError and friends)."""


@dataclass(frozen=True)
class Mount:
    source: str                # host path
    target: str                # path in the container
    read_only: bool = False
    propagation: str = "rprivate"

    def option(self) -> str:
        opt = f"type=bind,source={self.source},target={self.target},bind-propagation={self.propagation}"
        return opt + (",readonly" if self.read_only else "")


@dataclass(frozen=True)
class Kubelet:
    """What the node's kubelet and API server would supply, chosen by the caller."""
    node_name: str
    pod_name: str
    namespace: str
    host_path: Callable[[str, str], str]            # (volume name, manifest path) -> host dir
    empty_dir: Callable[[str], str]                 # volume name -> host dir
    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    secrets: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    ports: Mapping[int, int] = field(default_factory=dict)   # containerPort -> host port
    service_account: str | None = None              # host dir with token, ca.crt, namespace
    api_env: Mapping[str, str] = field(default_factory=dict)  # KUBERNETES_SERVICE_HOST/PORT


@dataclass
class RunSpec:
    image: str
    args: list[str]
    entrypoint: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    options: list[str] = field(default_factory=list)     # security, caps, limits, groups
    mounts: list[Mount] = field(default_factory=list)
    create_dirs: list[str] = field(default_factory=list)   # hostPath DirectoryOrCreate
    require_dirs: list[str] = field(default_factory=list)  # hostPath Directory (must exist)
    empty_dirs: dict[str, int | None] = field(default_factory=dict)  # host dir -> fsGroup
    notes: list[str] = field(default_factory=list)

    def argv(self, name: str, docker: str = "docker") -> list[str]:
        """`docker run -d` for this container (the environment is passed with -e NAME=VALUE)."""
        out = [docker, "run", "-d", "--name", name, "--network", "host", *self.options]
        if self.user is not None:
            out += ["--user", self.user]
        for k, v in self.env.items():
            out += ["-e", f"{k}={v}"]
        for m in self.mounts:
            out += ["--mount", m.option()]
        if self.entrypoint:
            out += ["--entrypoint", self.entrypoint[0]]
        return out + [self.image, *self.entrypoint[1:], *self.args]


# ---------------------------------------------------------------------------- lookups

def workload(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The pod template spec of the named DaemonSet/Deployment in a rendering."""
    found = [o for o in objects if o.get("kind") == kind and o["metadata"]["name"] == name]
    if len(found) != 1:
        raise TranslateError(f"{kind}/{name}: {len(found)} objects in the rendering")
    spec: dict[str, Any] = found[0]["spec"]["template"]["spec"]
    return spec


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    for c in pod.get("containers", []):
        if c["name"] == name:
            return dict(c)
    raise TranslateError(f"no container {name!r} in the pod spec")


def config_map_data(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    for o in objects:
        if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == name:
            return dict(o.get("data") or {})
    raise TranslateError(f"ConfigMap {name} is not in the rendering")


# ---------------------------------------------------------------------------- env and args

_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: known variables are replaced, unknown ones kept, $$ -> $."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return _VAR.sub(sub, text)


def _field_ref(path: str, k: Kubelet) -> str:
    values = {"spec.nodeName": k.node_name, "metadata.name": k.pod_name,
              "metadata.namespace": k.namespace}
    if path not in values:
        raise TranslateError(f"fieldRef {path} is not supported by the translator")
    return values[path]


def _key_ref(kind: str, ref: Mapping[str, Any], k: Kubelet) -> str | None:
    table = k.secrets if kind == "secret" else k.config_maps
    data = table.get(ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise TranslateError(f"{kind} {ref['name']} has no key {ref['key']!r} (kubelet: "
                             f"CreateContainerConfigError)")
    return data[ref["key"]]


def _env(c: Mapping[str, Any], k: Kubelet) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        kind, ref = ("configMap", src["configMapRef"]) if "configMapRef" in src else ("secret", src["secretRef"])
        table = k.config_maps if kind == "configMap" else k.secrets
        data = table.get(ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise TranslateError(f"{kind} {ref['name']} (envFrom) does not exist")
        env.update({src.get("prefix", "") + key: v for key, v in data.items()})
    for e in c.get("env", []):
        value: str | None
        if "value" in e:
            value = expand(str(e["value"]), env)
        else:
            vf = e["valueFrom"]
            if "fieldRef" in vf:
                value = _field_ref(vf["fieldRef"]["fieldPath"], k)
            elif "secretKeyRef" in vf:
                value = _key_ref("secret", vf["secretKeyRef"], k)
            elif "configMapKeyRef" in vf:
                value = _key_ref("configMap", vf["configMapKeyRef"], k)
            else:
                raise TranslateError(f"env {e['name']}: valueFrom {sorted(vf)} is not supported")
        if value is not None:
            env[e["name"]] = value
    return env


def _listen_rewrite(arg: str, ports: Mapping[int, int]) -> str:
    m = re.fullmatch(r"(--?[\w.-]+=)(0\.0\.0\.0|\[::\]|)?:(\d+)", arg)
    if m and int(m.group(3)) in ports:
        return f"{m.group(1)}127.0.0.1:{ports[int(m.group(3))]}"
    return arg


# ---------------------------------------------------------------------------- security

def _security(pod: Mapping[str, Any], c: Mapping[str, Any], spec: RunSpec) -> None:
    psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
    merged = {**psc, **csc}
    uid, gid = merged.get("runAsUser"), merged.get("runAsGroup")
    if merged.get("runAsNonRoot") and uid == 0:
        raise TranslateError("runAsNonRoot with runAsUser: 0 (kubelet refuses to start it)")
    if uid is not None:
        spec.user = f"{uid}:{gid}" if gid is not None else str(uid)
    elif merged.get("runAsNonRoot"):
        spec.notes.append("runAsNonRoot without runAsUser: the image's numeric USER must be non-root")
    if psc.get("fsGroup") is not None:
        spec.options += ["--group-add", str(psc["fsGroup"])]
    for g in psc.get("supplementalGroups", []):
        spec.options += ["--group-add", str(g)]
    if csc.get("privileged"):
        spec.options += list(PRIVILEGED_EQUIVALENT)
        spec.notes.append("privileged: true -> " + " ".join(PRIVILEGED_EQUIVALENT)
                          + " (--privileged cannot be granted here)")
    caps = csc.get("capabilities") or {}
    for cap in caps.get("drop", []):
        spec.options += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        spec.options += ["--cap-add", cap]
    if csc.get("allowPrivilegeEscalation") is False:
        spec.options += ["--security-opt", "no-new-privileges"]
    if csc.get("readOnlyRootFilesystem"):
        spec.options.append("--read-only")
    seccomp = (merged.get("seccompProfile") or {}).get("type")
    if seccomp == "Unconfined" and not csc.get("privileged"):
        spec.options += ["--security-opt", "seccomp=unconfined"]
    elif seccomp not in (None, "RuntimeDefault", "Unconfined"):
        raise TranslateError(f"seccompProfile {seccomp} is not supported by the translator")


def _limits(c: Mapping[str, Any], spec: RunSpec) -> None:
    limits = (c.get("resources") or {}).get("limits") or {}
    if "memory" in limits:
        spec.options += ["--memory", str(quantity_bytes(str(limits["memory"])))]
    if "cpu" in limits:
        spec.options += ["--cpus", f"{quantity_cpus(str(limits['cpu'])):g}"]


_SUFFIX = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
           "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}


def quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|)", q)
    if not m:
        raise TranslateError(f"memory quantity {q!r} is not understood")
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])


def quantity_cpus(q: str) -> float:
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


# ---------------------------------------------------------------------------- volumes

def _mounts(pod: Mapping[str, Any], c: Mapping[str, Any], k: Kubelet, spec: RunSpec) -> None:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    privileged = bool((c.get("securityContext") or {}).get("privileged"))
    fs_group = (pod.get("securityContext") or {}).get("fsGroup")
    for vm in c.get("volumeMounts", []):
        vol = volumes.get(vm["name"])
        if vol is None:
            raise TranslateError(f"volumeMount {vm['name']} names no volume of the pod")
        prop_mode = vm.get("mountPropagation", "None")
        if prop_mode not in PROPAGATION:
            raise TranslateError(f"mountPropagation {prop_mode} is not a Kubernetes value")
        if prop_mode == "Bidirectional" and not privileged:
            raise TranslateError(f"{vm['name']}: Bidirectional propagation needs a privileged container")
        if "hostPath" in vol:
            hp = vol["hostPath"]
            kind = hp.get("type", "")
            if kind not in HOSTPATH_TYPES:
                raise TranslateError(f"hostPath type {kind} of {vm['name']} is not supported")
            source = k.host_path(vm["name"], hp["path"])
            (spec.create_dirs if kind == "DirectoryOrCreate" else spec.require_dirs).append(source)
        elif "emptyDir" in vol:
            source = k.empty_dir(vm["name"])
            spec.empty_dirs[source] = fs_group
        else:
            raise TranslateError(f"volume {vm['name']}: only hostPath and emptyDir are supported")
        if vm.get("subPath"):
            source = str(PurePosixPath(source) / vm["subPath"])
        spec.mounts.append(Mount(source, vm["mountPath"], bool(vm.get("readOnly")),
                                 PROPAGATION[prop_mode]))


def _service_account(pod: Mapping[str, Any], k: Kubelet, spec: RunSpec) -> None:
    if pod.get("automountServiceAccountToken") is False or not pod.get("serviceAccountName"):
        return
    if k.service_account is None:
        spec.notes.append("no service-account token supplied: the container cannot call the API server")
        return
    spec.mounts.append(Mount(k.service_account, SERVICE_ACCOUNT_DIR, read_only=True))
    spec.env.update(k.api_env)


# ---------------------------------------------------------------------------- entry point

def translate(pod: dict[str, Any], name: str, image: str, k: Kubelet) -> RunSpec:
    """The `docker run` equivalent of container `name` of pod spec `pod`, on kubelet `k`."""
    c = container(pod, name)
    env = _env(c, k)
    declared = {int(p["containerPort"]) for p in c.get("ports", [])}
    missing = sorted(declared - set(k.ports))
    if missing:
        raise TranslateError(f"no host port supplied for containerPort(s) {missing}")
    ports = {p: k.ports[p] for p in declared}
    args = [_listen_rewrite(expand(str(a), env), ports) for a in c.get("args", [])]
    spec = RunSpec(image=image, args=args, entrypoint=[expand(str(a), env) for a in c.get("command", [])],
                   env=env)
    spec.notes.append("pod network -> --network host; containerPorts "
                      + ", ".join(f"{p}->127.0.0.1:{q}" for p, q in sorted(ports.items())))
    _security(pod, c, spec)
    _limits(c, spec)
    _mounts(pod, c, k, spec)
    _service_account(pod, k, spec)
    return spec
