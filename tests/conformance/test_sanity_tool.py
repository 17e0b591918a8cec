"""tests/harness/sanity.py (`make sanity`): starts a --mode all driver, hands csi-sanity the right
flags and returns its exit code. csi-sanity cannot be installed here, so a stand-in executable
checks the flags against the real running driver."""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests.harness import sanity

pytestmark = pytest.mark.root

STAND_IN = r'''#!{python}
import json, os, sys
sys.path.insert(0, {root!r})
import grpc
from csi_perssd.csi import csi_pb2 as pb, csi_pb2_grpc as rpc
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--csi."))
report = {{"flags": flags, "argv": sys.argv[1:]}}
report["mountdir_exists"] = os.path.exists(flags["csi.mountdir"])
report["stagingdir_exists"] = os.path.exists(flags["csi.stagingdir"])
report["mountdir_parent_exists"] = os.path.isdir(os.path.dirname(flags["csi.mountdir"]))
params = json.load(open(flags["csi.testvolumeparameters"]))
report["params"] = params
ch = grpc.insecure_channel(flags["csi.endpoint"])
report["ready"] = rpc.IdentityStub(ch).Probe(pb.ProbeRequest()).ready.value
report["max_volumes_per_node"] = rpc.NodeStub(ch).NodeGetInfo(pb.NodeGetInfoRequest()).max_volumes_per_node
cap = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(),
                          access_mode=pb.VolumeCapability.AccessMode(mode=1))
vol = rpc.ControllerStub(ch).CreateVolume(pb.CreateVolumeRequest(
    name="sanity", volume_capabilities=[cap], parameters=params,
    capacity_range=pb.CapacityRange(required_bytes=int(flags["csi.testvolumesize"])))).volume
rpc.ControllerStub(ch).DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
report["capacity"] = vol.capacity_bytes
report["context"] = dict(vol.volume_context)
json.dump(report, open({out!r}, "w"))
sys.exit(7)
'''


@pytest.fixture
def stand_in(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("s")      # short: the driver's unix socket lives below it
    out = tmp_path / "report.json"
    exe = tmp_path / "csi-sanity"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sanity.__file__))))
    exe.write_text(STAND_IN.format(python=sys.executable, root=root, out=str(out)))
    exe.chmod(0o755)
    return exe, out


def test_runs_csi_sanity_against_a_live_driver_and_returns_its_exit_code(stand_in, capsys):
    exe, out = stand_in
    rc = sanity.main([str(exe), "--workdir", str(exe.parent), "--", "-ginkgo.focus=Node"])
    assert rc == 7
    report = json.loads(out.read_text())
    assert report["ready"] is True
    assert report["flags"]["csi.endpoint"].startswith("unix:///")
    assert not report["mountdir_exists"] and not report["stagingdir_exists"]
    params, size, _ = sanity.default_params()
    assert int(report["flags"]["csi.testvolumesize"]) == size
    assert int(report["flags"]["csi.testvolumeexpandsize"]) == 2 * size
    assert report["capacity"] >= size
    assert report["context"]["persistence"] == "object"        # default StorageClass parameters
    assert report["mountdir_parent_exists"]                     # csi-sanity mkdirs without -p
    assert json.loads(open(report["flags"]["csi.testvolumemutableparameters"]).read()) == sanity.MUTABLE_PARAMS
    assert report["flags"]["csi.testnodevolumeattachlimit"] == "true"
    assert report["max_volumes_per_node"] == sanity.ATTACH_LIMIT
    assert report["params"] == params
    assert "-ginkgo.focus=Node" in report["argv"]
    assert "csi-sanity exited with 7" in capsys.readouterr().out


def test_parameters_can_be_chosen(stand_in):
    exe, out = stand_in
    assert sanity.main([str(exe), "--workdir", str(exe.parent), "--param", "persistence=object",
                        "--param", "mobility=pool"]) == 7
    assert json.loads(out.read_text())["context"] == {"persistence": "object", "mobility": "pool"}


def test_a_missing_binary_is_an_error(tmp_path):
    assert sanity.main([str(tmp_path / "nope")]) == 2


def test_block_mode_passes_the_access_type(stand_in):
    exe, out = stand_in
    assert sanity.main([str(exe), "--workdir", str(exe.parent), "--block"]) == 7
    assert json.loads(out.read_text())["flags"]["csi.testvolumeaccesstype"] == "block"
