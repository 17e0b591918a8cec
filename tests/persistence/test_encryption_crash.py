"""SIGKILL in the middle of an encrypted volume's flush: NodeUnstage carries no secrets, yet the
restarted node resumes and commits the flush with the lineage key it kept from NodeStage (a
0600 file in a 0700 directory under its state dir, removed once the flush has committed), and
the other node reads the data back with the KEK."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.harness.cluster import Cluster, block_cap

from .enc import ENC, new_kek, secrets, unpublish_controller
from .helpers import CHUNK, SLOW_FLUSH_CLUSTER, MiB, fill_random, sha256_file, unpublish_until_flushing

pytestmark = [pytest.mark.root, pytest.mark.s3]
CLUSTER = SLOW_FLUSH_CLUSTER
SIZE = 128 * MiB
RANDOM = 112 * MiB


def test_sigkill_mid_flush_of_an_encrypted_volume_resumes_and_commits(cluster: Cluster):
    cl, cap = cluster, block_cap()
    kek = new_kek()
    vid = cl.create("enc-crash", SIZE, cap=cap, params=ENC, secrets=secrets(kek))
    target = cl.attach("node-a", vid, cap=cap, secrets=secrets(kek))
    want = fill_random(target, RANDOM)
    keyfile = Path(cl.nodes["node-a"].state_dir) / "keys" / f"{vid}.key"
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(keyfile.parent.stat().st_mode) == 0o700
    assert kek not in keyfile.read_text()                   # the lineage key, never the KEK

    unpublish_until_flushing(cl, "node-a", vid)
    cl.nodes["node-a"].kill()
    at_kill = len(cl.chunks())
    assert 0 < at_kill < RANDOM // CHUNK, f"not killed mid-flush ({at_kill} chunks stored)"
    assert keyfile.exists(), "the key a resumed flush needs is gone"

    cl.nodes["node-a"].start()                              # no secrets from here on
    cl.unstage("node-a", vid, timeout=120)
    unpublish_controller(cl, "node-a", vid)
    assert "resuming the interrupted flush" in cl.nodes["node-a"].log_path.read_text()
    assert not keyfile.exists(), "the lineage key stayed on the node after the flush committed"
    assert cl.catalog().volume(vid).generation >= 1

    target_b = cl.attach("node-b", vid, cap=cap, secrets=secrets(kek))
    assert sha256_file(target_b) == want
    cl.release("node-b", vid)
    cl.delete(vid)
