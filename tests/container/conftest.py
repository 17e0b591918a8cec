"""Session fixtures of the container tests: a daemon, the base, the driver image built from the
project's Dockerfile; figures (times, size) printed in the terminal summary.

`make test-image` runs these wherever a container daemon can run; a daemon that cannot be
reached or started fails the tests (never a silent pass). Nothing here is shipped."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import images
from .daemon import Daemon, DaemonError, connect
from .images import IMAGE_TAG

FIGURES: dict[str, str] = {}


@pytest.fixture(scope="session")
def docker() -> Iterator[Daemon]:
    try:
        d = connect()
    except DaemonError as e:
        pytest.fail(f"no container daemon: {e}", pytrace=False)
    FIGURES["daemon"] = f"{d.host} ({'started by this session' if d.started_pid else 'already running'})"
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="session")
def base(docker: Daemon) -> images.Base:
    try:
        b = images.ensure_base(docker)
    except DaemonError as e:
        pytest.fail(str(e), pytrace=False)
    FIGURES["base"] = (f"{b.image} ({'official' if b.official else 'Debian stand-in'}, "
                       f"{'cached' if not b.seconds else f'built in {b.seconds:.0f} s'})")
    return b


@pytest.fixture(scope="session")
def image(docker: Daemon, base: images.Base) -> str:
    try:
        seconds = images.build_driver_image(docker, base.image, IMAGE_TAG)
    except DaemonError as e:
        pytest.fail(str(e), pytrace=False)
    size = images.image_size(docker, IMAGE_TAG)
    base_size = images.image_size(docker, base.image)
    FIGURES["image"] = (f"{IMAGE_TAG}: {size / 1e6:.0f} MB ({(size - base_size) / 1e6:.0f} MB over "
                        f"its base {base_size / 1e6:.0f} MB), docker build {seconds:.0f} s")
    return IMAGE_TAG


_T0 = time.monotonic()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    FIGURES["wall time"] = f"{time.monotonic() - _T0:.0f} s"
    terminalreporter.section("container image figures")
    for k, v in FIGURES.items():
        terminalreporter.write_line(f"{k}: {v}")


SESSION_TIMEOUT_S = 1800     # the first test's setup builds the base and the image (minutes on a fresh machine)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = str(Path(__file__).parent)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.timeout(SESSION_TIMEOUT_S))
