"""local/fiemap.py: comparing block mappings of reflinked files (pure part) and the real ioctl on XFS."""
from __future__ import annotations

import os

import pytest

from csi_perssd.local.backend import Extent
from csi_perssd.local.fiemap import Mapping, changed_between, extent_diff
from csi_perssd.local.rawfile import try_reflink
from tests.harness.xfsdir import xfs_dir

K = 4096


def test_identical_mappings_differ_nowhere_even_when_split_differently():
    a = [Mapping(0, 1000 * K, 8 * K), Mapping(16 * K, 2000 * K, 4 * K)]
    b = [Mapping(0, 1000 * K, 3 * K), Mapping(3 * K, 1003 * K, 5 * K), Mapping(16 * K, 2000 * K, 4 * K)]
    assert extent_diff(a, b, 32 * K) == []


def test_rewritten_range_differs_and_neighbours_merge():
    base = [Mapping(0, 1000 * K, 16 * K)]
    live = [Mapping(0, 1000 * K, 4 * K), Mapping(4 * K, 5000 * K, 2 * K), Mapping(6 * K, 7000 * K, K),
            Mapping(7 * K, 1007 * K, 9 * K)]
    assert extent_diff(live, base, 16 * K) == [Extent(4 * K, 3 * K)]


def test_data_on_one_side_only_is_a_change_both_ways():
    base = [Mapping(0, 1000 * K, 4 * K)]
    live = [Mapping(0, 1000 * K, 4 * K), Mapping(8 * K, 3000 * K, 4 * K)]
    assert extent_diff(live, base, 16 * K) == [Extent(8 * K, 4 * K)]      # written
    assert extent_diff(base, live, 16 * K) == [Extent(8 * K, 4 * K)]      # discarded


def test_unwritten_reads_as_zero_like_a_hole():
    hole = [Mapping(0, 1000 * K, 4 * K)]
    prealloc = [Mapping(0, 1000 * K, 4 * K), Mapping(4 * K, 9000 * K, 4 * K, unwritten=True)]
    assert extent_diff(prealloc, hole, 8 * K) == []
    written = [Mapping(0, 1000 * K, 4 * K), Mapping(4 * K, 9000 * K, 4 * K)]
    assert extent_diff(written, prealloc, 8 * K) == [Extent(4 * K, 4 * K)]


def test_ranges_are_clipped_to_the_size():
    a = [Mapping(0, 1000 * K, 64 * K)]
    assert extent_diff(a, [], 8 * K) == [Extent(0, 8 * K)]


@pytest.mark.root
def test_copy_on_write_after_reflink_shows_exactly_the_written_blocks(tmp_path):
    with xfs_dir(str(tmp_path / "x"), 320 << 20) as d:
        live, base = os.path.join(d, "live"), os.path.join(d, "base")
        with open(live, "wb") as f:
            f.write(os.urandom(64 * K))
            f.truncate(256 * K)
        assert try_reflink(live, base)
        assert changed_between(live, base) == []
        fd = os.open(live, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * K, 5 * K)                  # inside the data
            os.pwrite(fd, b"y" * 2 * K, 128 * K)            # into the hole
        finally:
            os.close(fd)
        assert changed_between(live, base) == [Extent(5 * K, K), Extent(128 * K, 2 * K)]
