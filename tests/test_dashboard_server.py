"""The dashboard's web server and bus side against a real nats-server (observer role) and
real sockets: DNS-rebinding protection and security headers (the two findings of Linkerd's
2019 audit, both on its dashboard), read-only, a cap on tabs, one poller and one event
consumer shared by every tab, and explain answered from the published policy."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.bus_support import TESTER, bus_for
from tests.conftest import eventually
from tulle import schemas
from tulle.dashboard.hub import Hub, Settings
from tulle.dashboard.server import SECURITY_HEADERS, allowed_hosts, make_app

WEB_ID = schemas.identity_name("web", "demo")


@pytest.fixture
async def dashboard(nats_url):
    """A running dashboard (hub + aiohttp on 127.0.0.1) reading the bus as the observer."""
    bus = bus_for(nats_url, "observer", component="dashboard")
    await bus.start()
    hub = Hub(bus, Settings(window_s=5, traffic_interval_s=0.2, routes_interval_s=0.2, gather_timeout_s=0.1,
                            max_streams=3), url=nats_url)
    # As `tulle dashboard` runs it: open event streams get 1 s to end at shutdown.
    runner = web.AppRunner(make_app(hub, hosts=allowed_hosts("127.0.0.1")), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hub.start()
    port = site._server.sockets[0].getsockname()[1]
    yield {"hub": hub, "port": port, "url": f"http://127.0.0.1:{port}", "bus": bus}
    await hub.stop()
    await runner.cleanup()
    await bus.close()


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """What a plain socket gets back: how an attacker's page (or curl) would talk to it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def get(path: str, host: str | None) -> bytes:
    return (f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
            + "Connection: close\r\n\r\n").encode()


async def test_a_request_for_another_host_name_is_refused_before_any_handler(dashboard):
    port = dashboard["port"]
    # A page of evil.example whose name was rebound to 127.0.0.1 sends its own Host.
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example", ""):
        for path in ("/", "/api/stream", "/api/explain?workload=demo.web&from=10.0.0.1", "/static/app.js"):
            status, _, body = await raw(port, get(path, host))
            assert status == 400 and b"DNS rebinding" in body, (host, path, status)
    status, _, _ = await raw(port, b"GET / HTTP/1.0\r\n\r\n")  # no Host at all
    assert status == 400
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        status, _, body = await raw(port, get("/", host))
        assert status == 200 and b"<title>Tulle dashboard</title>" in body, host
    # Probes come with the pod's address as Host; they learn nothing but "ok".
    status, _, body = await raw(port, get("/live", "10.42.0.7:50750"))
    assert (status, body) == (200, b"ok\n")


async def test_every_answer_carries_the_security_headers(dashboard):
    port = dashboard["port"]
    host = f"localhost:{port}"
    for request in (get("/", host), get("/static/app.js", host), get("/static/vendor/cytoscape.min.js", host),
                    get("/api/explain", host), get("/nothing-here", host), get("/", "evil.example"),
                    f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()):
        status, headers, _ = await raw(port, request)
        for name, value in SECURITY_HEADERS.items():
            assert headers.get(name.lower()) == value, (request.split(b"\r\n")[0], status, name)
    _, headers, _ = await raw(port, get("/", host))
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "script-src 'self';" in headers["content-security-policy"]  # no inline script, no eval


async def test_the_dashboard_is_read_only(dashboard):
    port = dashboard["port"]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = await raw(port, f"{method} /api/explain HTTP/1.1\r\nHost: localhost\r\n"
                                             "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        assert (status, headers.get("allow")) == (405, "GET, HEAD"), method


class Tab:
    """A browser tab's event stream, read as EventSource would."""

    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session, self.url = session, url
        self.resp = None
        self.kinds: dict[str, list] = {}

    async def open(self) -> int:
        self.resp = await self.session.get(self.url + "/api/stream", headers={"Host": "localhost"})
        if self.resp.status == 200:
            self.task = asyncio.ensure_future(self._read())
        return self.resp.status

    async def _read(self) -> None:
        try:
            await self._lines()
        except (RuntimeError, aiohttp.ClientError):
            pass  # closed by the test

    async def _lines(self) -> None:
        kind = None
        async for line in self.resp.content:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind:
                self.kinds.setdefault(kind, []).append(orjson.loads(line[6:]))

    def events(self) -> list[dict]:
        return [item for batch in self.kinds.get("events", []) for item in batch["items"]]

    async def close(self) -> None:
        self.resp.close()
        self.task.cancel()


async def test_tabs_beyond_the_cap_are_refused_and_a_closed_tab_frees_its_place(dashboard):
    async with aiohttp.ClientSession() as session:
        tabs = [Tab(session, dashboard["url"]) for _ in range(4)]
        assert [await t.open() for t in tabs[:3]] == [200, 200, 200]
        assert await tabs[3].open() == 503
        await tabs[0].close()
        await eventually(lambda: len(dashboard["hub"].tabs) == 2, what="the closed tab to be let go")
        assert await Tab(session, dashboard["url"]).open() == 200
        for t in tabs[1:3]:
            await t.close()


async def test_polling_is_shared_by_every_tab_and_stops_with_the_last_one(dashboard, nats_url):
    hub = dashboard["hub"]
    assert not hub.active.is_set() and hub.polls["traffic"] == 0  # no tab: no scatter-gather
    tester = bus_for(nats_url, TESTER, component="tester")
    await tester.start()
    requests = []

    async def count(msg):
        requests.append(msg)

    sub = await tester.nc.subscribe(schemas.PROXY_TRAFFIC_SUBJECT, cb=count)
    await tester.sync()
    async with aiohttp.ClientSession() as session:
        tabs = [Tab(session, dashboard["url"]) for _ in range(3)]
        for t in tabs:
            assert await t.open() == 200
        await eventually(lambda: hub.polls["traffic"] >= 5, what="five rounds of traffic polling")
        polls = hub.polls["traffic"]
        # Each round is one request on the bus, whatever the number of tabs.
        assert polls <= len(requests) <= polls + 1
        await eventually(lambda: all(len(t.kinds.get("topology", [])) >= 2 for t in tabs),
                         what="every tab to get the topology")
        for t in tabs:
            await t.close()
    await eventually(lambda: not hub.tabs, what="the tabs to be let go")
    assert not hub.active.is_set()
    await sub.unsubscribe()
    await tester.close()


async def test_one_event_consumer_feeds_every_tab(dashboard, nats_url):
    destination = bus_for(nats_url, "destination", component="destination")
    await destination.start()
    await destination.ensure_events_stream()
    hub = dashboard["hub"]
    first = await destination.publish_event("endpoints-changed", {"key": "first"})
    await eventually(lambda: any(e["id"] == first.id for e in hub.events), what="the dashboard's event consumer")
    # The session's bus may hold other tests' ephemeral consumers for a while: count what tabs add.
    before = await _consumers(destination)
    async with aiohttp.ClientSession() as session:
        tabs = [Tab(session, dashboard["url"]) for _ in range(3)]
        for t in tabs:
            assert await t.open() == 200
        marker = uuid.uuid4().hex
        event = await destination.publish_event("endpoints-changed", {"key": marker})
        await eventually(lambda: all(any(e["id"] == event.id for e in t.events()) for t in tabs),
                         what="the event in every tab")
        assert await _consumers(destination) <= before  # one ordered consumer for all, none per tab
        for t in tabs:
            await t.close()
    assert hub.events[-1]["data"] == {"key": marker}
    await destination.close()


async def _consumers(bus) -> int:
    info = await bus.js.stream_info(schemas.EVENTS_STREAM)
    return info.state.consumer_count


async def test_explain_answers_from_the_published_policy(dashboard, nats_url):
    policy_bus = bus_for(nats_url, "policy", component="policy")
    await policy_bus.start()
    wp = schemas.WorkloadPolicy(
        namespace="demo", workload="authors", default_policy="deny",
        default=schemas.PortPolicy(port=0, server="default:deny"),
        ports=[schemas.PortPolicy(port=8080, server="authors-http", kind="Server", protocol="HTTP/1",
                                  authorizations=[schemas.Authorization(name="from-web", identities=[WEB_ID])])])
    await policy_bus.put(schemas.POLICY_BUCKET, "demo.authors", wp)
    hub = dashboard["hub"]
    await eventually(lambda: "demo.authors" in hub.state.policies, what="the dashboard to see the policy")
    async with aiohttp.ClientSession(headers={"Host": "localhost"}) as session:
        async def explain(**params):
            async with session.get(dashboard["url"] + "/api/explain", params=params) as resp:
                return resp.status, await resp.json()

        status, body = await explain(workload="demo.authors", **{"from": WEB_ID}, port="8080")
        assert status == 200 and body["allowed"] is True
        status, body = await explain(workload="demo.authors", **{"from": "10.1.2.3"})
        assert status == 200 and body["allowed"] is False and [p["port"] for p in body["ports"]] == [8080, 0]
        status, body = await explain(workload="demo.authors", **{"from": "a b"})
        assert status == 400 and "expected an identity" in body["error"]
        status, body = await explain(workload="demo.authors", **{"from": WEB_ID}, port="99999")
        assert status == 400
        status, body = await explain(workload="demo.nobody", **{"from": WEB_ID})
        assert status == 400 and body["error"] == "no policy published for demo/nobody"
    await policy_bus.delete(schemas.POLICY_BUCKET, "demo.authors")
    await policy_bus.close()


# --- the command ---------------------------------------------------------------------------------


def run_cli(*args: str, tmp_path, env: dict | None = None):
    import os
    import subprocess

    from tests.local_support import TULLE

    full = dict(os.environ, TULLE_STATE_DIR=str(tmp_path / "no-run"), **(env or {}))
    full.pop("TULLE_NATS_URL", None)
    full.pop("TULLE_NATS_CREDS", None)
    return subprocess.run([TULLE, "dashboard", *args], capture_output=True, text=True, timeout=60, env=full)


def test_bad_flags_and_an_unreachable_mesh_are_one_line_each(tmp_path, nats_url):
    from tests.bus_support import cli_bus_args

    out = run_cli("--window", "5m", tmp_path=tmp_path)
    assert out.returncode == 2 and out.stderr == "tulle: dashboard: --window '5m': must be from 2s to 1m " \
                                                  "(proxies keep a minute of samples)\n"
    out = run_cli("--nats", nats_url, tmp_path=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("tulle: dashboard: no credential for NATS at ")
    assert len(out.stderr.splitlines()) == 1
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_cli("--port", str(port), *cli_bus_args(nats_url), tmp_path=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith(f"tulle: dashboard: cannot listen on 127.0.0.1:{port}: ")
    assert "Traceback" not in out.stderr
