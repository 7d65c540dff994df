"""The dashboard's web server (aiohttp): static files, one server-sent-events stream per
tab, and the explain endpoint. Read-only: GET and HEAD only.

Security (the two findings of Linkerd's 2019 audit were on its dashboard):
- DNS rebinding: a request whose Host is not the bound address, localhost, 127.0.0.1,
  [::1] or a name given with --allowed-host is refused (400) before any handler runs —
  a page of another site that rebinds its name to 127.0.0.1 reaches nothing. /live and
  /ready answer any Host (Kubernetes probes use the pod IP) and say nothing but "ok".
- Headers on every answer: a Content-Security-Policy that allows only this origin's
  scripts and styles (no inline script, no eval) and no framing (frame-ancestors 'none'
  and X-Frame-Options: DENY), X-Content-Type-Options: nosniff, no referrer.
- No CORS headers: another origin's script cannot read the stream or the API.
"""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Iterable, Optional

import orjson
from aiohttp import web

from tulle.dashboard.hub import Hub, sse_frame
from tulle.errors import UserError
from tulle.log import get_logger

log = get_logger(part="dashboard")

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0
WRITE_TIMEOUT_S = 10.0  # a tab that reads nothing for this long is closed
MAX_CLIENT_LEN = 512

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
ANY_HOST_PATHS = ("/live", "/ready")


def host_name(host_header: str) -> Optional[str]:
    """The name part of a Host header, lower-cased (`[::1]:8080` -> `::1`); None when malformed."""
    host = host_header.strip().lower()
    if not host:
        return None
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or (host[end + 1:] and not host[end + 1:].startswith(":")):
            return None
        name, rest = host[1:end], host[end + 2:]
    else:
        name, _, rest = host.partition(":")
    if rest and not rest.isdigit():
        return None
    return name.rstrip(".") or None


def allowed_hosts(address: str, extra: Iterable[str] = ()) -> frozenset[str]:
    names = {"localhost", "127.0.0.1", "::1"}
    try:
        if not ipaddress.ip_address(address).is_unspecified:
            names.add(str(ipaddress.ip_address(address)))
    except ValueError:
        names.add(address.lower())
    names.update(h.strip().lower().rstrip(".") for h in extra if h.strip())
    return frozenset(names)


def make_app(hub: Hub, *, hosts: frozenset[str]) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler):
        if request.path not in ANY_HOST_PATHS:
            name = host_name(request.headers.get("Host", ""))
            if name is None or name not in hosts:
                log.info("refused a request for another host", host=request.headers.get("Host", "")[:100])
                return web.Response(status=400, text="tulle dashboard: this host name is not served here "
                                                     "(DNS rebinding protection; see --allowed-host)\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="tulle dashboard is read-only\n", headers={"Allow": "GET, HEAD"})
        return await handler(request)

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)
        if request.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"

    async def index(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def live(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200 if hub.bus.connected else 503,
                            text="ok\n" if hub.bus.connected else "not connected to NATS\n")

    async def explain(request: web.Request) -> web.Response:
        from tulle.dashboard import views

        workload = request.query.get("workload", "")
        client = request.query.get("from", "")
        port_text = request.query.get("port", "")
        if not workload or not client or len(client) > MAX_CLIENT_LEN or len(workload) > 300:
            return _json({"error": "give workload=<namespace>.<workload> and from=<identity|ip|identity@ip>"}, 400)
        port = None
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                return _json({"error": f"port {port_text[:20]!r}: expected 1-65535"}, 400)
            port = int(port_text)
        try:
            return _json(views.explain(hub.state, workload, client, port))
        except UserError as e:
            return _json({"error": str(e).removeprefix("policy: ")}, 400)

    async def stream(request: web.Request) -> web.StreamResponse:
        tab = hub.open_tab()
        if tab is None:
            return web.Response(status=503, text=f"tulle dashboard: at most {hub.settings.max_streams} open tabs\n",
                                headers={"Retry-After": "10"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        try:
            await response.prepare(request)
            await _write(response, b"retry: 2000\n\n" + sse_frame("events", {"replay": True,
                                                                          "items": list(hub.events)}))
            while True:
                frames = []
                for name, topic in hub.topics.items():
                    if topic.version and tab.sent.get(name) != topic.version:
                        tab.sent[name] = topic.version
                        frames.append(topic.frame)
                if tab.events:
                    items = list(tab.events)
                    tab.events.clear()
                    frames.append(sse_frame("events", {"replay": False, "items": items, "dropped": tab.dropped}))
                    tab.dropped = 0
                tab.wake.clear()
                if frames:
                    await _write(response, b"".join(frames))
                try:
                    await asyncio.wait_for(tab.wake.wait(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    await _write(response, b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.TimeoutError, RuntimeError):
            pass  # the tab went away (or stopped reading); a shutdown's cancellation goes on up
        finally:
            hub.close_tab(tab)
        return response

    app = web.Application(middlewares=[guard])
    app.on_response_prepare.append(headers)
    app.router.add_get("/", index)
    app.router.add_get("/live", live)
    app.router.add_get("/ready", ready)
    app.router.add_get("/api/stream", stream)
    app.router.add_get("/api/explain", explain)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    return app


async def _write(response: web.StreamResponse, data: bytes) -> None:
    await asyncio.wait_for(response.write(data), WRITE_TIMEOUT_S)


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")
