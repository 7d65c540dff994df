"""Shared fixtures: a real nats-server per test session, and helpers to wait on events."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from pathlib import Path

import logging

import pytest
import structlog

# The test process's own log lines (the in-process auth callout and buses of module-wide
# fixtures) only from warning up: below that they land between pytest's dots, outside any
# test's capture. The processes under test log to their own files as configured.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    """One nats-server with JetStream and the mesh's authorization for the whole session
    (tests use their own keys): see tests/bus_support.py."""
    from tests.bus_support import MeshNats

    server = MeshNats(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.close()


@pytest.fixture
def own_nats(tmp_path):
    """A nats-server of this test's own, for tests that stop or kill it."""
    from tests.bus_support import MeshNats

    server = MeshNats(tmp_path / "nats").start()
    yield server
    server.close()


@pytest.fixture
def nats_url(nats_server):
    return nats_server.url


@pytest.fixture
def bus_factory(nats_url):
    """Make connected Bus clients; all are closed at the end of the test."""
    from tulle.bus import Bus

    made = []

    async def make(component="test", url=None, role=None):
        from tests.bus_support import bus_for

        bus = bus_for(url or nats_url, role or component, component=component)
        await bus.start()
        made.append(bus)
        return bus

    yield make
    # Buses are closed by the test's own loop via `close_buses`; leftovers are harmless.


async def eventually(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Await until `predicate()` (sync or async) is truthy; return its value.

    Polls a cheap predicate where the thing awaited has no event to subscribe to
    (another process's state). Fails the test with `what` on timeout.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Synchronous `eventually`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def is_root() -> bool:
    return os.geteuid() == 0


def have_netns() -> bool:
    return is_root() and shutil.which("ip") is not None and shutil.which("iptables") is not None


requires_netns = pytest.mark.skipif(
    not have_netns(), reason="needs root with `ip` (iproute2) and `iptables` for network namespaces; make test installs them as root")


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


@pytest.fixture(scope="module")
def lt():
    """One event loop in a thread per test module, for in-process proxies (tests.proxy_support)."""
    from tests.proxy_support import LoopThread

    loop = LoopThread()
    yield loop
    loop.stop()
