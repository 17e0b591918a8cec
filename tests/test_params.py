"""params.py: StorageClass parameters parsed and validated in one place."""
from __future__ import annotations

import pytest

from csi_perssd import params
from csi_perssd.errors import Code, CsiError


def invalid(p: dict[str, str]) -> str:
    with pytest.raises(CsiError) as e:
        params.parse(p)
    assert e.value.code == Code.INVALID_ARGUMENT
    return e.value.message


def test_defaults():
    vp = params.parse({})
    assert (vp.mobility, vp.persistence, vp.chunk_size, vp.compression, vp.fs_type) == ("pool", "object", 4 << 20, 1, "")
    assert vp.as_dict() == {"mobility": "pool", "persistence": "object", "chunkSize": str(4 << 20), "compression": "1"}


@pytest.mark.parametrize("text,value", [("4Mi", 4 << 20), ("4M", 4 << 20), ("4MiB", 4 << 20), ("1048576", 1 << 20),
                                        ("64Ki", 64 << 10), ("64k", 64 << 10), ("1Gi", 1 << 30), (" 2Mi ", 2 << 20)])
def test_sizes(text, value):
    assert params.parse_size(text, "chunkSize") == value


@pytest.mark.parametrize("text", ["", "4X", "-1", "1.5Mi", "Mi", "4 Mi", "4Ti"])
def test_bad_sizes(text):
    with pytest.raises(CsiError) as e:
        params.parse_size(text, "parameter chunkSize")
    assert e.value.code == Code.INVALID_ARGUMENT and "chunkSize" in e.value.message


def test_persistence_local_implies_mobility_node():
    assert params.parse({"persistence": "local"}).mobility == "node"
    assert params.parse({"persistence": "local", "mobility": "node"}).mobility == "node"
    assert "mobility=node" in invalid({"persistence": "local", "mobility": "pool"})


@pytest.mark.parametrize("p", [{"mobility": "anywhere"}, {"persistence": "tape"}, {"chunkSize": "32Ki"},
                               {"chunkSize": "128Mi"}, {"chunkSize": "3Mi"}, {"compression": "20"},
                               {"compression": "-1"}, {"compression": "fast"}, {"fsType": "btrfs"}], ids=str)
def test_invalid_values(p):
    key = next(iter(p))
    assert key in invalid(p)


def test_chunk_size_bounds_are_inclusive():
    assert params.parse({"chunkSize": "64Ki"}).chunk_size == params.MIN_CHUNK
    assert params.parse({"chunkSize": "64Mi"}).chunk_size == params.MAX_CHUNK


def test_unknown_keys_are_rejected_and_named():
    msg = invalid({"mobilty": "node", "zzz": "1"})
    assert "mobilty" in msg and "zzz" in msg


def test_co_reserved_keys_are_ignored():
    vp = params.parse({"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/pv/name": "pv-1"})
    assert vp == params.parse({})


def test_fs_type_and_compression():
    vp = params.parse({"fsType": "xfs", "compression": "0"})
    assert vp.fs_type == "xfs" and vp.compression == 0
    assert "fsType" not in vp.as_dict()
