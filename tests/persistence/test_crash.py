"""Crash: SIGKILL the node process in the middle of a flush — twice — restart it each time;
NodeUnstage completes, the data is intact on the other node, and the resumed flush neither
re-reads what the journal recorded nor re-uploads what was already uploaded. The other node is
killed in the middle of hydrating too: after its restart the half-written copy is not reused."""
from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.cluster import Cluster, block_cap

from .helpers import CHUNK, MiB, chunk_hashes, chunk_keys, code, image, sha256_file

pytestmark = [pytest.mark.root, pytest.mark.s3]
# one upload at a time and short NodeUnstage waits: the flush takes seconds and reports progress
CLUSTER = {"node_extra": ["--flush-workers", "1"], "env": {"PERSSD_UNSTAGE_WAIT_SECONDS": "0.3"}}
SIZE = 256 * MiB
RANDOM = 224 * MiB


def _unstage_once(cl: Cluster, node: str, vid: str) -> tuple[grpc.StatusCode, str]:
    staging, _ = cl.paths(node, vid)
    try:
        cl.nodes[node].node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging),
                                              timeout=30)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _journal_entries(path: Path) -> int:
    try:
        lines = path.read_text(errors="replace").split("\n")
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines[1:] if re.fullmatch(r"\d+ (-|[0-9a-f]{64}) \d+", line))


def test_sigkill_during_flush_resumes_without_reuploading(cluster: Cluster):
    cl, cap = cluster, block_cap()
    vid = cl.create("crash", SIZE, cap=cap)
    target = cl.attach("node-a", vid, cap=cap)
    fd = os.open(target, os.O_WRONLY)
    try:
        for off in range(0, RANDOM, CHUNK):
            os.pwrite(fd, os.urandom(CHUNK), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    want = sha256_file(target)
    data_chunks = RANDOM // CHUNK

    # 1st kill: while NodeUnstage reports a flush in progress (> 0%)
    cl.unpublish("node-a", vid)
    seen = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        c, msg = _unstage_once(cl, "node-a", vid)
        assert c == grpc.StatusCode.ABORTED, f"flush ended before the kill ({c}: {msg})"
        m = re.search(r"(\d+)/(\d+) bytes \((\d+)%\)", msg)
        assert m, f"no progress in the ABORTED message: {msg!r}"
        if int(m.group(1)) > 0:
            seen = msg
            break
    assert seen, "the flush never made progress"
    cl.nodes["node-a"].kill()
    time.sleep(1.0)     # a PUT whose body the server had fully received may still land
    at_kill1 = cl.chunks()
    assert 0 < len(at_kill1) < data_chunks, f"kill #1 not in the middle of the flush ({len(at_kill1)} chunks)"

    # restart: the job resumes on its own (final pass, journaled); 2nd kill once the journal has entries
    cl.nodes["node-a"].start()
    journal = Path(cl.nodes["node-a"].state_dir) / "jobs" / f"{vid}.journal"
    deadline = time.monotonic() + 60
    while _journal_entries(journal) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    cl.nodes["node-a"].kill()
    journaled = _journal_entries(journal)
    time.sleep(1.0)
    at_kill2 = cl.chunks()
    assert journaled >= 2, "the resumed flush wrote no journal"
    assert len(at_kill2) < data_chunks, "kill #2 came after the flush had uploaded everything"
    assert set(at_kill1) <= set(at_kill2)

    # restart again: NodeUnstage completes
    cl.nodes["node-a"].start()
    calls = cl.unstage("node-a", vid, timeout=120)
    cl.controller.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id="node-a"))
    read3 = cl.transferred("node-a", "flushed_read")
    uploaded3 = cl.transferred("node-a", "uploaded")
    end = cl.chunks()
    new = {k: v for k, v in end.items() if k not in at_kill2}
    # nothing stored before the kill is uploaded again; the only object the restarted flush may
    # find already there without having counted it is the one PUT in flight at the kill (1 worker)
    assert uploaded3 <= sum(new.values()), "the resumed flush re-uploaded chunks that were already stored"
    assert sum(new.values()) - uploaded3 <= CHUNK + 64, "new chunks appeared that the resumed flush did not upload"
    assert read3 <= (data_chunks - journaled) * CHUNK, "journaled chunks were read again"
    assert set(end) == chunk_keys(chunk_hashes(image(cl, "node-a", vid)), cl.prefix)
    assert "resuming the interrupted flush" in cl.nodes["node-a"].log_path.read_text()

    # the data is intact on node-b, even when node-b is killed while hydrating it
    cl.controller.controller.ControllerPublishVolume(pb.ControllerPublishVolumeRequest(
        volume_id=vid, node_id="node-b", volume_capability=cap))
    staging_b, _ = cl.paths("node-b", vid)
    Path(staging_b).mkdir(parents=True, exist_ok=True)
    stage = threading.Thread(target=lambda: code(cl.nodes["node-b"].node.NodeStageVolume, pb.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=staging_b, volume_capability=cap), timeout=120))
    stage.start()
    img_b = image(cl, "node-b", vid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not img_b.exists() or img_b.stat().st_blocks * 512 < 24 * MiB):
        time.sleep(0.005)
    cl.nodes["node-b"].kill()
    stage.join()
    half = img_b.stat().st_blocks * 512
    assert half < RANDOM, "node-b finished hydrating before the kill"
    cl.nodes["node-b"].start()
    target_b = cl.attach("node-b", vid, cap=cap)
    assert cl.transferred("node-b", "hydrated") > 0, "the half-hydrated copy was reused"
    assert sha256_file(target_b) == want
    cl.release("node-b", vid)
    cl.delete(vid)
    print(f"\nPERF crash: killed at {seen!r}; {len(at_kill1)} chunks stored at kill #1, {len(at_kill2)} at kill #2 "
          f"({journaled} journaled); resumed run read {read3 / MiB:.0f} MiB and uploaded {len(new)} chunks "
          f"({uploaded3 / MiB:.0f} MiB); {calls} NodeUnstage calls after the restart; node-b killed with "
          f"{half / MiB:.0f} MiB hydrated")
