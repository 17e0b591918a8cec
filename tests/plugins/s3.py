"""SeaweedFS fixtures: one real S3 server per test session, a fresh S3Store prefix per test.

    def test_x(s3_store): ...                 # S3Store on s3://perssd/t-<random>/
    def test_y(seaweed, s3_store):            # stop/restart the server (outage)
        with seaweed_outage(seaweed): ...
"""
from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from csi_perssd.remote.s3 import Retry, S3Store
from tests.harness.seaweed import Seaweed

# a short budget so tests of an outage end within seconds
TEST_RETRY = Retry(attempts=3, base_s=0.05, cap_s=0.5, deadline_s=5.0,
                   connect_timeout_s=1.0, read_timeout_s=20.0)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    sw = Seaweed(tmp_path_factory.mktemp("seaweed"))
    sw.start()
    try:
        yield sw
    finally:
        sw.stop()


def make_s3_store(sw: Seaweed, prefix: str | None = None, **opts) -> S3Store:
    """An S3Store on the test server under a unique prefix (restarts the server if a test left
    it stopped)."""
    if not sw.running:
        sw.start()
    opts.setdefault("retries", TEST_RETRY)
    return S3Store(sw.url(prefix or f"t-{secrets.token_hex(6)}"), endpoint_url=sw.endpoint,
                   access_key=sw.access_key, secret_key=sw.secret_key, **opts)


@pytest.fixture
def s3_store(seaweed: Seaweed) -> S3Store:
    return make_s3_store(seaweed)


@contextmanager
def seaweed_outage(sw: Seaweed) -> Iterator[None]:
    """Stop the server for the body of the block; start it again (same ports and data) after."""
    sw.stop()
    try:
        yield
    finally:
        sw.start()
