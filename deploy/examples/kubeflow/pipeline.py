"""Kubeflow Pipelines v2: steps that share one perssd-nvme volume, each on its own node.

`produce` writes a data set at local-NVMe speed on one node; when its pod ends, the node plugin
flushes the volume to S3; `verify` runs on another node, whose node plugin hydrates the
volume from S3 at NodeStage, and reads the same bytes. No step copies outputs anywhere.

Two pipelines:
- `perssd_shared_volume`: the pipeline creates the claim (kfp-kubernetes CreatePVC, class
  perssd-nvme), mounts it in every step and deletes it at the end;
- `perssd_named_volume`: every step mounts an existing claim named by the `pvc_name` parameter
  (e.g. one that outlives the runs, as a data set cache).

Compile (offline; needs `pip install -r requirements.txt`):
    python pipeline.py --output perssd-pipeline.yaml [--named]
and upload the YAML in the Kubeflow Pipelines UI, or submit it with kfp.Client().
(No `from __future__ import annotations` here: kfp reads the components' annotations as types.)
"""

import argparse
from typing import Union

from kfp import compiler, dsl, kubernetes
from kfp.dsl import pipeline_channel

STORAGE_CLASS = "perssd-nvme"
MOUNT = "/data"
IMAGE = "python:3.12-slim"


@dsl.component(base_image=IMAGE)
def produce(data_dir: str, size_mb: int) -> str:
    """Writes SIZE_MB of data into DATA_DIR; returns its SHA-256."""
    import hashlib
    import os
    import socket

    h = hashlib.sha256()
    with open(os.path.join(data_dir, "dataset.bin"), "wb") as f:
        for _ in range(size_mb):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    print(f"produced {size_mb} MiB on {socket.gethostname()}")
    return h.hexdigest()


@dsl.component(base_image=IMAGE)
def verify(data_dir: str, sha256: str) -> None:
    """Reads the data set another step wrote (on another node) and checks its SHA-256."""
    import hashlib
    import os
    import socket

    h = hashlib.sha256()
    with open(os.path.join(data_dir, "dataset.bin"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != sha256:
        raise SystemExit(f"dataset.bin differs: {h.hexdigest()} != {sha256}")
    print(f"verified on {socket.gethostname()}")


Param = Union[str, int, dict, pipeline_channel.PipelineChannel]


def _steps(pvc_name: Param, size_mb: Param, produce_on: Param, verify_on: Param) -> dsl.PipelineTask:
    """produce, then verify, both mounting PVC_NAME at /data, on the nodes the selectors pick."""
    p = produce(data_dir=MOUNT, size_mb=size_mb)
    v = verify(data_dir=MOUNT, sha256=p.output)
    for task, where in ((p, produce_on), (v, verify_on)):
        kubernetes.mount_pvc(task, pvc_name=pvc_name, mount_path=MOUNT)
        kubernetes.add_node_selector_json(task, node_selector_json=where)
        task.set_cpu_request("100m").set_cpu_limit("1").set_memory_request("64M").set_memory_limit("256M")
        task.set_caching_options(False)
    return v


@dsl.pipeline(name="perssd-shared-volume",
              description="produce and verify on two nodes through a perssd-nvme claim the run creates")
def perssd_shared_volume(size: str = "20Gi", size_mb: int = 512,
                         produce_on: dict = {"kubernetes.io/hostname": "worker-1"},  # noqa: B006
                         verify_on: dict = {"kubernetes.io/hostname": "worker-2"}) -> None:  # noqa: B006
    pvc = kubernetes.CreatePVC(pvc_name_suffix="-perssd", access_modes=["ReadWriteOnce"], size=size,
                               storage_class_name=STORAGE_CLASS)
    last = _steps(pvc.outputs["name"], size_mb, produce_on, verify_on)
    kubernetes.DeletePVC(pvc_name=pvc.outputs["name"]).after(last)


@dsl.pipeline(name="perssd-named-volume",
              description="produce and verify on two nodes through an existing perssd-nvme claim")
def perssd_named_volume(pvc_name: str = "train-data", size_mb: int = 512,
                        produce_on: dict = {"kubernetes.io/hostname": "worker-1"},  # noqa: B006
                        verify_on: dict = {"kubernetes.io/hostname": "worker-2"}) -> None:  # noqa: B006
    _steps(pvc_name, size_mb, produce_on, verify_on)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", required=True, help="where to write the compiled pipeline (YAML)")
    ap.add_argument("--named", action="store_true", help="the pipeline that mounts an existing claim")
    args = ap.parse_args()
    fn = perssd_named_volume if args.named else perssd_shared_volume
    compiler.Compiler().compile(pipeline_func=fn, package_path=args.output)


if __name__ == "__main__":
    main()
