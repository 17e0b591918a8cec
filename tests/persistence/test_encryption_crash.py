"""SIGKILL in the middle of an encrypted volume's flush: NodeUnstage carries no secrets, yet the
restarted node resumes and commits the flush with the lineage key it kept from NodeStage (a
0600 file in a 0700 directory under its state dir, removed once the flush has committed), and
the other node reads the data back with the KEK."""
from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import grpc
import pytest

from tests.harness.cluster import Cluster, block_cap

from .enc import ENC, new_kek, secrets, unpublish_controller
from .helpers import CHUNK, MiB, sha256_file, unstage_once

pytestmark = [pytest.mark.root, pytest.mark.s3]
CLUSTER = {"node_extra": ["--flush-workers", "1"], "env": {"PERSSD_UNSTAGE_WAIT_SECONDS": "0.3"}}
SIZE = 128 * MiB
RANDOM = 112 * MiB


def test_sigkill_mid_flush_of_an_encrypted_volume_resumes_and_commits(cluster: Cluster):
    cl, cap = cluster, block_cap()
    kek = new_kek()
    vid = cl.create("enc-crash", SIZE, cap=cap, params=ENC, secrets=secrets(kek))
    target = cl.attach("node-a", vid, cap=cap, secrets=secrets(kek))
    fd = os.open(target, os.O_WRONLY)
    try:
        for off in range(0, RANDOM, CHUNK):
            os.pwrite(fd, os.urandom(CHUNK), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    want = sha256_file(target)
    keyfile = Path(cl.nodes["node-a"].state_dir) / "keys" / f"{vid}.key"
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert stat.S_IMODE(keyfile.parent.stat().st_mode) == 0o700
    assert kek not in keyfile.read_text()                   # the lineage key, never the KEK

    cl.unpublish("node-a", vid)
    deadline = time.monotonic() + 60
    progressed = False
    while time.monotonic() < deadline and not progressed:
        c, msg = unstage_once(cl, "node-a", vid)
        assert c == grpc.StatusCode.ABORTED, f"flush ended before the kill ({c}: {msg})"
        m = re.search(r"(\d+)/(\d+) bytes", msg)
        progressed = bool(m and int(m.group(1)) > 0)
    assert progressed, "the flush never made progress"
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
