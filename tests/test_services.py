"""Every control-plane service process, as `python -m services.<name>`: it starts, reports
ready (admin /ready and a CloudEvent), survives NATS going away, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.bus_support import TESTER, bus_for
from tests.conftest import wait_until
from tests.identity_support import make_issuer_dir, token_secret
from tests.service_process import ServiceProcess
from tulle import schemas
from tulle.bus import Bus

SERVICES = ["destination", "identity", "policy", "injector"]


def service_args(name: str, tmp: Path) -> list[str]:
    if name == "identity":
        make_issuer_dir(tmp / "issuer")
        token_secret(tmp / "token-secret")
        return ["--issuer-dir", str(tmp / "issuer"), "--token-secret-file", str(tmp / "token-secret")]
    if name in ("destination", "policy"):
        (tmp / "manifests").mkdir()
        return ["--manifests", str(tmp / "manifests")]
    return []


def start(name: str, nats_url: str, tmp: Path) -> ServiceProcess:
    return ServiceProcess(name, nats_url, service_args(name, tmp), tmp / f"{name}.log").start()


@pytest.mark.parametrize("name", SERVICES)
async def test_a_service_announces_it_is_ready_with_a_cloudevent(name, nats_server, tmp_path):
    bus = bus_for(nats_server.url, TESTER, component="test")
    await bus.start()
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_event(msg):
        event = schemas.decode_event(msg.data)
        if event.data.get("admin") == f"127.0.0.1:{svc.admin_port}" and not got.done():
            got.set_result(event)

    await bus.subscribe_raw(f"tulle.events.{name}.ready", on_event)
    svc = start(name, nats_server.url, tmp_path)
    try:
        event = await asyncio.wait_for(got, 30)
        assert event.type == f"dev.tulle.{name}.ready" and event.specversion == "1.0"
        assert event.source.startswith(f"/tulle/{name}/") and event.data["component"] == name
        assert svc.get("/live")[0] == 200 and svc.get("/ready")[0] == 200
        assert svc.stop(15) == 0  # SIGTERM: a clean exit
    finally:
        svc.stop(15)
        await bus.close()


@pytest.mark.parametrize("name", SERVICES)
def test_a_service_outlives_nats_and_is_ready_again_soon_after_it_returns(name, own_nats, tmp_path):
    svc = start(name, own_nats.url, tmp_path)
    try:
        svc.wait_ready(30)
        own_nats.kill()
        wait_until(lambda: svc.get("/ready")[0] == 503, 20, what=f"{name} to report not ready")
        assert svc.alive() and svc.get("/live")[0] == 200  # alive all along
        own_nats.start()
        wait_until(svc.ready, 15, what=f"{name} ready again after NATS returned")
    finally:
        assert svc.stop(15) == 0
