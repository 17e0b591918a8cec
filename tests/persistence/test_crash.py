"""Crash: SIGKILL the node process in the middle of a flush — twice — restart it each time;
NodeUnstage completes, the data is intact on the other node, and the resumed flush neither
re-reads what the journal recorded nor re-uploads what was already uploaded. The other node is
killed in the middle of hydrating too: after its restart the half-written copy is not reused."""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi_perssd.csi import csi_pb2 as pb
from tests.harness.cluster import Cluster, block_cap

from .helpers import (CHUNK, SLOW_FLUSH_CLUSTER, MiB, chunk_hashes, chunk_keys, code, fill_random, image, sha256_file,
                      unpublish_until_flushing)

pytestmark = [pytest.mark.root, pytest.mark.s3]
CLUSTER = SLOW_FLUSH_CLUSTER
SIZE = 256 * MiB
RANDOM = 224 * MiB
DATA_CHUNKS = RANDOM // CHUNK


def _journal_entries(path: Path) -> int:
    try:
        lines = path.read_text(errors="replace").split("\n")
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines[1:] if re.fullmatch(r"\d+ (-|[0-9a-f]{64}) \d+", line))


@dataclass
class _Kills:
    seen: str                   # the NodeUnstage progress message before kill #1
    at_kill1: dict[str, int]    # chunks stored at each kill
    at_kill2: dict[str, int]
    journaled: int              # journal entries of the resumed flush at kill #2


def _kill_twice_mid_flush(cl: Cluster, vid: str) -> _Kills:
    # 1st kill: while NodeUnstage reports a flush in progress (> 0%)
    seen = unpublish_until_flushing(cl, "node-a", vid)
    cl.nodes["node-a"].kill()
    time.sleep(1.0)     # a PUT whose body the server had fully received may still land
    at_kill1 = cl.chunks()
    assert 0 < len(at_kill1) < DATA_CHUNKS, f"kill #1 not in the middle of the flush ({len(at_kill1)} chunks)"

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
    assert len(at_kill2) < DATA_CHUNKS, "kill #2 came after the flush had uploaded everything"
    assert set(at_kill1) <= set(at_kill2)
    return _Kills(seen, at_kill1, at_kill2, journaled)


def _finish_and_check_no_reupload(cl: Cluster, vid: str, k: _Kills) -> tuple[int, float, float, int]:
    """Restart again: NodeUnstage completes; (NodeUnstage calls, bytes read, bytes uploaded, new chunks)."""
    cl.nodes["node-a"].start()
    calls = cl.unstage("node-a", vid, timeout=120)
    cl.controller.controller.ControllerUnpublishVolume(pb.ControllerUnpublishVolumeRequest(volume_id=vid, node_id="node-a"))
    read3 = cl.transferred("node-a", "flushed_read")
    uploaded3 = cl.transferred("node-a", "uploaded")
    end = cl.chunks()
    new = {key: v for key, v in end.items() if key not in k.at_kill2}
    # nothing stored before the kill is uploaded again; the only object the restarted flush may
    # find already there without having counted it is the one PUT in flight at the kill (1 worker)
    assert uploaded3 <= sum(new.values()), "the resumed flush re-uploaded chunks that were already stored"
    assert sum(new.values()) - uploaded3 <= CHUNK + 64, "new chunks appeared that the resumed flush did not upload"
    assert read3 <= (DATA_CHUNKS - k.journaled) * CHUNK, "journaled chunks were read again"
    assert set(end) == chunk_keys(chunk_hashes(image(cl, "node-a", vid)), cl.prefix)
    assert "resuming the interrupted flush" in cl.nodes["node-a"].log_path.read_text()
    return calls, read3, uploaded3, len(new)


def _hydrate_killed_on_node_b(cl: Cluster, vid: str, cap: pb.VolumeCapability, want: str) -> int:
    """The data is intact on node-b, even when node-b is killed while hydrating it; the bytes it
    had hydrated at the kill."""
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
    return half


def test_sigkill_during_flush_resumes_without_reuploading(cluster: Cluster):
    cl, cap = cluster, block_cap()
    vid = cl.create("crash", SIZE, cap=cap)
    want = fill_random(cl.attach("node-a", vid, cap=cap), RANDOM)
    k = _kill_twice_mid_flush(cl, vid)
    calls, read3, uploaded3, new = _finish_and_check_no_reupload(cl, vid, k)
    half = _hydrate_killed_on_node_b(cl, vid, cap, want)
    cl.delete(vid)
    print(f"\nPERF crash: killed at {k.seen!r}; {len(k.at_kill1)} chunks stored at kill #1, {len(k.at_kill2)} at "
          f"kill #2 ({k.journaled} journaled); resumed run read {read3 / MiB:.0f} MiB and uploaded {new} chunks "
          f"({uploaded3 / MiB:.0f} MiB); {calls} NodeUnstage calls after the restart; node-b killed with "
          f"{half / MiB:.0f} MiB hydrated")
