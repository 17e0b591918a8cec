"""Generate csi_perssd/csi/csi_pb2*.py and their typing stubs (csi_pb2*.pyi, mypy-protobuf) from
proto/csi.proto.

protoc writes imports relative to the include root, so the proto is staged under a
temporary `csi_perssd/csi/` tree to make the generated code import `csi_perssd.csi.csi_pb2`.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "csi.proto"
OUT_PKG = "csi_perssd/csi"
FILES = ("csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi", "csi_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    """A protoc plugin of mypy-protobuf (a dev dependency): beside this interpreter, or on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install the dev dependencies (pip install -e '.[dev]')")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Generate the stubs into out_dir/csi_perssd/csi and return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / OUT_PKG
        src.mkdir(parents=True)
        shutil.copy(PROTO, src / "csi.proto")
        include = Path(grpc_tools.__file__).parent / "_proto"
        (out_dir / OUT_PKG).mkdir(parents=True, exist_ok=True)
        rc = protoc.main([
            "protoc", f"-I{tmp}", f"-I{include}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={out_dir}", f"--mypy_grpc_out={out_dir}",
            f"{OUT_PKG}/csi.proto",
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
    return [out_dir / OUT_PKG / name for name in FILES]


def main() -> int:
    files = generate(ROOT)
    for f in files:
        print(f"generated {f.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
