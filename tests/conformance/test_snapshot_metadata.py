"""SnapshotMetadata service, per spec.md "Snapshot Metadata Service RPCs" (alpha: served only
with --enable-snapshot-metadata): one test per sentence. The delta is compared with the ranges
really written between two snapshots, with every chunk object removed from the store first (the
answers come from manifests only)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
import pytest

from csi_perssd.csi import csi_pb2 as pb
from tests.plugins.driver import MiB, block_cap, create_request, expect, mount_cap, unique_name

pytestmark = pytest.mark.root
C = grpc.StatusCode
Svc = pb.PluginCapability.Service
VARIABLE = pb.BlockMetadataType.VARIABLE_LENGTH
DRIVER_FLAGS = ["--enable-snapshot-metadata"]
CHUNK = 64 << 10
SIZE = 8 * MiB
OBJECT = {"persistence": "object", "chunkSize": "64Ki"}


def snapshot(driver, vid: str, timeout: float = 60.0) -> str:
    req = pb.CreateSnapshotRequest(source_volume_id=vid, name=unique_name("snap"))
    deadline = time.monotonic() + timeout
    while True:
        snap = driver.controller.CreateSnapshot(req).snapshot
        if snap.ready_to_use:
            return snap.snapshot_id
        assert time.monotonic() < deadline
        time.sleep(0.1)


def write(target: str, writes: list[tuple[int, int]]) -> None:
    fd = os.open(target, os.O_RDWR)
    try:
        for off, n in writes:
            os.pwrite(fd, os.urandom(n), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def chunk_ranges(writes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The chunk-aligned, coalesced ranges that hold these writes."""
    chunks = sorted({c for off, n in writes for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)})
    out: list[list[int]] = []
    for c in chunks:
        if out and out[-1][1] == c * CHUNK:
            out[-1][1] += CHUNK
        else:
            out.append([c * CHUNK, (c + 1) * CHUNK])
    return [(a, b - a) for a, b in out]


def allocated(driver, sid: str, start: int = 0, max_results: int = 0) -> list:
    return list(driver.proc.metadata.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=sid, starting_offset=start, max_results=max_results)))


def delta(driver, base: str, target: str, start: int = 0, max_results: int = 0) -> list:
    return list(driver.proc.metadata.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=base, target_snapshot_id=target, starting_offset=start, max_results=max_results)))


def ranges(msgs: list) -> list[tuple[int, int]]:
    return [(b.byte_offset, b.size_bytes) for m in msgs for b in m.block_metadata]


def drop_chunks(driver) -> None:
    shutil.rmtree(Path(driver.proc.catalog.removeprefix("file://")) / "chunks", ignore_errors=True)


FIRST = [(0, 4096), (100 * 1024, 8192), (3 * MiB, 200 * 1024), (SIZE - 4096, 4096)]
SECOND = [(100 * 1024 + 4096, 4096), (5 * MiB + 10, 70 * 1024), (3 * MiB + 64 * 1024, 1000)]


@pytest.fixture(scope="module")
def two_snapshots(driver):
    """A block volume written twice, a snapshot after each write: (vid, s1, s2)."""
    vid, _, target = driver.published(block_cap(), size=SIZE, parameters=OBJECT)
    write(target, FIRST)
    s1 = snapshot(driver, vid)
    write(target, SECOND)
    s2 = snapshot(driver, vid)
    drop_chunks(driver)             # nothing below may read a chunk
    return vid, s1, s2


class TestCapability:
    def test_the_service_should_be_advertised_when_enabled(self, driver):
        caps = {c.service.type for c in driver.identity.GetPluginCapabilities(
            pb.GetPluginCapabilitiesRequest()).capabilities if c.HasField("service")}
        assert Svc.SNAPSHOT_METADATA_SERVICE in caps


class TestGetMetadataAllocated:
    def test_should_fail_when_no_snapshot_id_is_provided(self, driver):
        expect(C.INVALID_ARGUMENT, allocated, driver, "")

    def test_should_fail_with_not_found_for_an_unknown_snapshot(self, driver):
        expect(C.NOT_FOUND, allocated, driver, "psnap-" + "0" * 32)

    def test_an_invalid_starting_offset_should_be_out_of_range(self, driver, two_snapshots):
        _, s1, _ = two_snapshots
        expect(C.OUT_OF_RANGE, allocated, driver, s1, -1)
        expect(C.OUT_OF_RANGE, allocated, driver, s1, SIZE + 1)

    def test_a_negative_max_results_should_be_invalid(self, driver, two_snapshots):
        expect(C.INVALID_ARGUMENT, allocated, driver, two_snapshots[1], 0, -1)

    def test_should_return_the_written_ranges_coalesced(self, driver, two_snapshots):
        _, s1, s2 = two_snapshots
        m1 = allocated(driver, s1)
        assert ranges(m1) == chunk_ranges(FIRST)
        assert ranges(allocated(driver, s2)) == chunk_ranges(FIRST + SECOND)
        assert {m.block_metadata_type for m in m1} == {VARIABLE}
        assert {m.volume_capacity_bytes for m in m1} == {SIZE}

    def test_max_results_should_bound_every_message(self, driver, two_snapshots):
        s2 = two_snapshots[2]
        msgs = allocated(driver, s2, max_results=1)
        assert all(len(m.block_metadata) == 1 for m in msgs)
        assert ranges(msgs) == ranges(allocated(driver, s2))
        assert {m.block_metadata_type for m in msgs} == {VARIABLE}

    def test_starting_offset_should_continue_an_interrupted_stream(self, driver, two_snapshots):
        s2 = two_snapshots[2]
        full = ranges(allocated(driver, s2))
        start = full[1][0] + 1000                           # inside the second range
        got = ranges(allocated(driver, s2, start))
        assert start < got[0][0] + got[0][1]                # spec: S < B0.byte_offset + B0.size_bytes
        assert got[0] == (start, full[1][0] + full[1][1] - start) and got[1:] == full[2:]
        assert ranges(allocated(driver, s2, SIZE)) == []

    def test_tuples_should_ascend_without_overlap(self, driver, two_snapshots):
        got = ranges(allocated(driver, two_snapshots[2], max_results=2))
        assert all(n > 0 for _, n in got)
        assert all(a[0] + a[1] <= b[0] for a, b in zip(got, got[1:]))

    def test_an_empty_volume_should_report_its_capacity_and_no_range(self, driver):
        vol = driver.create(create_request(cap=block_cap(), size=SIZE, parameters=OBJECT))
        msgs = allocated(driver, snapshot(driver, vol.volume_id))
        assert ranges(msgs) == [] and msgs[0].volume_capacity_bytes == SIZE

    def test_a_mount_volume_should_report_the_ranges_of_its_device(self, driver):
        vid, staging = driver.staged(mount_cap(), size=SIZE, parameters=OBJECT)
        with open(os.path.join(staging, "f"), "wb") as f:
            f.write(os.urandom(300 * 1024))
        got = ranges(allocated(driver, snapshot(driver, vid)))
        assert got and sum(n for _, n in got) >= 300 * 1024
        assert got[-1][0] + got[-1][1] <= SIZE


class TestGetMetadataDelta:
    def test_should_fail_when_an_id_is_missing(self, driver, two_snapshots):
        _, s1, s2 = two_snapshots
        expect(C.INVALID_ARGUMENT, delta, driver, "", s2)
        expect(C.INVALID_ARGUMENT, delta, driver, s1, "")

    def test_should_fail_with_not_found_for_an_unknown_snapshot(self, driver, two_snapshots):
        _, s1, s2 = two_snapshots
        expect(C.NOT_FOUND, delta, driver, "psnap-" + "0" * 32, s2)
        expect(C.NOT_FOUND, delta, driver, s1, "psnap-" + "0" * 32)

    def test_snapshots_of_different_volumes_should_be_invalid(self, driver, two_snapshots):
        other = driver.create(create_request(cap=block_cap(), size=SIZE, parameters=OBJECT)).volume_id
        expect(C.INVALID_ARGUMENT, delta, driver, two_snapshots[1], snapshot(driver, other))

    def test_a_base_taken_after_the_target_should_be_invalid(self, driver, two_snapshots):
        _, s1, s2 = two_snapshots
        expect(C.INVALID_ARGUMENT, delta, driver, s2, s1)

    def test_an_invalid_starting_offset_should_be_out_of_range(self, driver, two_snapshots):
        _, s1, s2 = two_snapshots
        expect(C.OUT_OF_RANGE, delta, driver, s1, s2, -4096)
        expect(C.OUT_OF_RANGE, delta, driver, s1, s2, SIZE + 4096)

    def test_the_delta_should_be_the_ranges_written_between_the_snapshots(self, driver, two_snapshots):
        _, s1, s2 = two_snapshots
        msgs = delta(driver, s1, s2)
        assert ranges(msgs) == chunk_ranges(SECOND)
        assert {m.block_metadata_type for m in msgs} == {VARIABLE}
        assert {m.volume_capacity_bytes for m in msgs} == {SIZE}
        assert ranges(delta(driver, s1, s1)) == []

    def test_max_results_and_starting_offset(self, driver, two_snapshots):
        _, s1, s2 = two_snapshots
        full = ranges(delta(driver, s1, s2))
        paged = delta(driver, s1, s2, max_results=1)
        assert all(len(m.block_metadata) <= 1 for m in paged) and ranges(paged) == full
        resume = full[0][0] + full[0][1]                    # the byte after the first range
        assert ranges(delta(driver, s1, s2, resume)) == full[1:]
