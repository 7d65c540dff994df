"""Every control-plane service process, as `python -m services.<name>`: it starts, reports
ready (admin /ready and a CloudEvent), survives NATS going away, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, wait_until
from tests.identity_support import make_issuer_dir, token_secret
from tulle import schemas
from tulle.bus import Bus
from tulle.natsserver import free_port

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


def admin_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


class ServiceProcess:
    def __init__(self, name: str, nats_url: str, tmp: Path):
        self.name, self.port, self.log = name, free_port(), tmp / f"{name}.log"
        cmd = [sys.executable, "-m", f"services.{name}", "--nats", nats_url, "--admin", f"127.0.0.1:{self.port}",
               "--log-format", "json", *service_args(name, tmp)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
        return admin_status(self.port, "/ready") == 200

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"{self.name} did not stop within 15 s of SIGTERM")
        return self.proc.returncode


@pytest.mark.parametrize("name", SERVICES)
async def test_a_service_announces_it_is_ready_with_a_cloudevent(name, nats_server, tmp_path):
    bus = Bus(nats_server.url, component="test")
    await bus.start()
    got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_event(msg):
        event = schemas.decode_event(msg.data)
        if event.data.get("admin") == f"127.0.0.1:{svc.port}" and not got.done():
            got.set_result(event)

    await bus.subscribe_raw(f"tulle.events.{name}.ready", on_event)
    svc = ServiceProcess(name, nats_server.url, tmp_path)
    try:
        event = await asyncio.wait_for(got, 30)
        assert event.type == f"dev.tulle.{name}.ready" and event.specversion == "1.0"
        assert event.source.startswith(f"/tulle/{name}/") and event.data["component"] == name
        assert admin_status(svc.port, "/live") == 200 and admin_status(svc.port, "/ready") == 200
        assert svc.stop() == 0  # SIGTERM: a clean exit
    finally:
        svc.stop()
        await bus.close()


@pytest.mark.parametrize("name", SERVICES)
def test_a_service_outlives_nats_and_is_ready_again_soon_after_it_returns(name, own_nats, tmp_path):
    svc = ServiceProcess(name, own_nats.url, tmp_path)
    try:
        wait_until(svc.ready, 30, what=f"{name} ready")
        own_nats.kill()
        wait_until(lambda: admin_status(svc.port, "/ready") == 503, 20, what=f"{name} to report not ready")
        assert svc.proc.poll() is None and admin_status(svc.port, "/live") == 200  # alive all along
        own_nats.start()
        wait_until(svc.ready, 15, what=f"{name} ready again after NATS returned")
    finally:
        assert svc.stop() == 0
