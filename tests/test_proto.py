"""The committed stubs match proto/csi.proto, and proto/csi.proto is the spec's, unchanged."""
from __future__ import annotations

import hashlib
from pathlib import Path

from tests.harness import genproto

SPEC_PROTO = Path("/work/shared/csi-spec/csi.proto")
# sha256 of csi.proto at tag v1.12.0 of github.com/container-storage-interface/spec
UPSTREAM_V1_12_0_SHA256 = "5b81236a3809f3ff0b877ff9b82215d0b74a8e291d7f3ec6ee1a44f537c0f86a"
STUBS = genproto.ROOT / "csi_perssd" / "csi"


def test_generated_stubs_are_not_stale(tmp_path):
    files = genproto.generate(tmp_path)
    assert {f.name for f in files} == {"csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi", "csi_pb2_grpc.pyi"}
    for f in files:
        committed = STUBS / f.name
        assert committed.read_bytes() == f.read_bytes(), f"{committed} is stale: run `make proto` and commit"


def test_proto_is_the_specs_unchanged_copy():
    data = genproto.PROTO.read_bytes()
    assert hashlib.sha256(data).hexdigest() == UPSTREAM_V1_12_0_SHA256, \
        "proto/csi.proto differs from upstream csi.proto v1.12.0"
    if SPEC_PROTO.exists():                 # the reference copy, where this machine has it
        assert data == SPEC_PROTO.read_bytes(), "proto/csi.proto differs from the spec's csi.proto"


def test_stubs_describe_csi_v1():
    from csi_perssd.csi import csi_pb2 as pb
    assert pb.DESCRIPTOR.package == "csi.v1"
    assert {"Identity", "Controller", "Node"} <= set(pb.DESCRIPTOR.services_by_name)
