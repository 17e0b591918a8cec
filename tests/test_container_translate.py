"""Unit tests of the container-test helpers that need no daemon: the manifest -> `docker run`
translator (on the real rendering of deploy/kubernetes/base and on small specs) and the scan
that derives the driver's external tools from its source."""
from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest

from tests.container import toolscan
from tests.container import translate as tr
from tests.container.tools import driver_tools
from tests.test_deploy import render

HOSTPATHS: list[tuple[str, str]] = []


def kubelet(**kw: object) -> tr.Kubelet:
    def host_path(volume: str, path: str) -> str:
        HOSTPATHS.append((volume, path))
        return "/dev" if path == "/dev" else f"/h/{volume}"

    base: dict[str, object] = dict(
        node_name="node-a", pod_name="pod-1", namespace="ns", host_path=host_path,
        empty_dir=lambda v: f"/e/{v}",
        config_maps={"perssd-config": {"PERSSD_CATALOG": "s3://b/p", "PERSSD_LOG_LEVEL": "info"}},
        secrets={"perssd-s3": {"endpoint": "http://127.0.0.1:1", "accessKeyId": "AK", "secretAccessKey": "SK"}},
        ports={9808: 41000, 9809: 41001}, service_account="/sa",
        api_env={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"})
    base.update(kw)
    return tr.Kubelet(**base)  # type: ignore[arg-type]


def node_spec() -> tr.RunSpec:
    pod = tr.workload(render("base"), "DaemonSet", "perssd-node")
    return tr.translate(pod, "csi-perssd", "img:t", kubelet())


def test_node_daemonset_translates_to_privileged_equivalent_with_propagation() -> None:
    spec = node_spec()
    argv = spec.argv("n1")
    assert argv[:7] == ["docker", "run", "-d", "--name", "n1", "--network", "host"]
    assert "--privileged" not in argv
    for opt in ("SYS_ADMIN", "MKNOD", "seccomp=unconfined", "apparmor=unconfined", "b *:* rwm", "c *:* rwm"):
        assert opt in argv, opt
    assert spec.user == "0"
    mounts = {m.target: m for m in spec.mounts}
    assert mounts["/var/lib/kubelet"].propagation == "rshared"
    assert mounts["/dev"].source == "/dev"
    assert mounts["/run/udev"].read_only and mounts["/run/udev"].propagation == "rprivate"
    assert mounts["/var/lib/perssd/volumes"].source == "/h/data-dir"
    assert mounts["/var/run/secrets/kubernetes.io/serviceaccount"].read_only
    assert "type=bind,source=/h/kubelet-dir,target=/var/lib/kubelet,bind-propagation=rshared" in argv
    # args: $(VAR) from the env (fieldRef spec.nodeName), listen address moved to the host port
    assert "--node-id=node-a" in spec.args
    assert "--metrics-address=127.0.0.1:41000" in spec.args
    assert spec.env["AWS_SECRET_ACCESS_KEY"] == "SK" and spec.env["PERSSD_CATALOG"] == "s3://b/p"
    assert "PERSSD_S3_REGION" not in spec.env               # optional key, absent in the Secret
    assert spec.env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert argv[-len(spec.args) - 1:] == ["img:t", *spec.args]
    assert "/h/data-dir" in spec.create_dirs and "/h/kubelet-dir" in spec.require_dirs
    assert ["--memory", str(1 << 30)] == argv[argv.index("--memory"):argv.index("--memory") + 2]
    assert any("privileged" in n for n in spec.notes)


def test_controller_deployment_is_non_root_read_only_without_privileges() -> None:
    pod = tr.workload(render("base"), "Deployment", "perssd-controller")
    spec = tr.translate(pod, "csi-perssd", "img:t", kubelet())
    argv = spec.argv("c1")
    assert spec.user == "65532:65532"
    assert "--read-only" in argv and "no-new-privileges" in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert ["--group-add", "65532"] == argv[argv.index("--group-add"):argv.index("--group-add") + 2]
    assert "SYS_ADMIN" not in argv
    assert spec.empty_dirs == {"/e/socket-dir": 65532, "/e/tmp": 65532}
    assert {m.target for m in spec.mounts} >= {"/csi", "/tmp"}


def test_removing_a_hostpath_from_the_daemonset_changes_the_run() -> None:
    pod = copy.deepcopy(tr.workload(render("base"), "DaemonSet", "perssd-node"))   # render() is cached
    c = next(c for c in pod["containers"] if c["name"] == "csi-perssd")
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "state-dir"]
    spec = tr.translate(pod, "csi-perssd", "img:t", kubelet())
    assert "/var/lib/perssd/state" not in {m.target for m in spec.mounts}


def _pod(container: dict, volumes: list | None = None, **pod: object) -> dict:
    return {"containers": [dict(name="c", **container)], "volumes": volumes or [], **pod}


@pytest.mark.parametrize("container,volumes,message", [
    ({"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "perssd-s3", "key": "nope"}}}]}, [], "no key"),
    ({"volumeMounts": [{"name": "v", "mountPath": "/v"}]}, [], "names no volume"),
    ({"volumeMounts": [{"name": "v", "mountPath": "/v", "mountPropagation": "Bidirectional"}]},
     [{"name": "v", "hostPath": {"path": "/x"}}], "privileged"),
    ({"volumeMounts": [{"name": "v", "mountPath": "/v", "mountPropagation": "Sideways"}]},
     [{"name": "v", "hostPath": {"path": "/x"}}], "not a Kubernetes value"),
    ({"ports": [{"containerPort": 1234}]}, [], "no host port"),
    ({"securityContext": {"runAsNonRoot": True, "runAsUser": 0}}, [], "runAsNonRoot"),
    ({"volumeMounts": [{"name": "v", "mountPath": "/v"}]}, [{"name": "v", "nfs": {}}], "only hostPath"),
])
def test_what_kubelet_would_refuse_is_refused(container: dict, volumes: list, message: str) -> None:
    with pytest.raises(tr.TranslateError, match=message):
        tr.translate(_pod(container, volumes), "c", "img", kubelet())


def test_expand_and_env_order() -> None:
    assert tr.expand("a-$(X)-$(Y)-$$(X)", {"X": "1"}) == "a-1-$(Y)-$(X)"
    spec = tr.translate(_pod({"envFrom": [{"configMapRef": {"name": "perssd-config"}}],
                              "env": [{"name": "PERSSD_LOG_LEVEL", "value": "debug"},
                                      {"name": "N", "value": "$(PERSSD_LOG_LEVEL)!"},
                                      {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                              "args": ["--x=$(N)", "--l=0.0.0.0:9808", "--keep=:9"],
                              "ports": [{"containerPort": 9808}]}),
                        "c", "img", kubelet())
    assert spec.env["PERSSD_LOG_LEVEL"] == "debug" and spec.env["N"] == "debug!" and spec.env["NS"] == "ns"
    assert spec.args == ["--x=debug!", "--l=127.0.0.1:41000", "--keep=:9"]
    assert tr.quantity_bytes("64Mi") == 64 << 20 and tr.quantity_cpus("100m") == 0.1


# ------------------------------------------------------------------ tools derived from the code

def test_derived_tool_list_covers_what_the_driver_runs() -> None:
    tools = driver_tools()
    assert tools, "the scan found no external tool at all"
    for t in ("mkfs.ext4", "mkfs.xfs", "xfs_growfs", "resize2fs", "losetup", "blkid", "fsfreeze",
              "mount", "umount", "lvm", "thin_delta", "e2fsck"):
        assert t in tools, f"{t} not derived from the code"
    assert all(":" in src for srcs in tools.values() for src in srcs)


def test_scan_finds_literals_variables_templates_and_declarations(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(textwrap.dedent('''
        import shutil, subprocess
        REQUIRED_TOOLS = ("declared-tool",)
        def a(dev, kind):
            subprocess.run(["direct", dev], check=True)
            argv = ["via-var", "-x"]
            run(argv + [dev])
            runner.run([f"mkfs.{kind}", dev])
            shutil.which("looked-up")
            print(["not-a-call"])
            subprocess.run([sys.executable, "-c", "1"])
    '''))
    scan = toolscan.scan_package(pkg)
    assert set(scan.tools) == {"declared-tool", "direct", "via-var", "looked-up"}
    assert set(scan.templates) == {"mkfs.{}"}
    with pytest.raises(ValueError, match="mkfs"):
        toolscan.expand(scan, {})
    assert {"mkfs.ext4", "direct"} <= set(toolscan.expand(scan, {"mkfs.{}": ["ext4"]}))
