"""The committed stubs match proto/csi.proto, and proto/csi.proto is the spec's, unchanged."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import genproto

SPEC_PROTO = Path("/work/shared/csi-spec/csi.proto")
STUBS = genproto.ROOT / "csi_perssd" / "csi"


def test_generated_stubs_are_not_stale(tmp_path):
    files = genproto.generate(tmp_path)
    assert {f.name for f in files} == {"csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi", "csi_pb2_grpc.pyi"}
    for f in files:
        committed = STUBS / f.name
        assert committed.read_bytes() == f.read_bytes(), f"{committed} is stale: run `make proto` and commit"


def test_proto_is_the_specs_unchanged_copy():
    if not SPEC_PROTO.exists():
        pytest.skip(f"{SPEC_PROTO} is not on this machine")
    assert genproto.PROTO.read_bytes() == SPEC_PROTO.read_bytes(), "proto/csi.proto differs from the spec's csi.proto"


def test_stubs_describe_csi_v1():
    from csi_perssd.csi import csi_pb2 as pb
    assert pb.DESCRIPTOR.package == "csi.v1"
    assert {"Identity", "Controller", "Node"} <= set(pb.DESCRIPTOR.services_by_name)
