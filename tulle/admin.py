"""The admin HTTP server every Tulle process runs: /live, /ready, /metrics, and extras.

Deliberately tiny: HTTP/1.1, small GET/POST requests, keep-alive for scrapers. It is
off the data path, so clarity beats speed here. At most `max_connections` are open at
once: one more is accepted and closed at once, and counted
(`tulle_admin_connections_refused_total`), so probes and scrapes keep working while
someone holds connections open.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from tulle.log import get_logger
from tulle.metrics import REGISTRY, Registry

MAX_HEAD = 8192
MAX_CONNECTIONS = 64


@dataclass
class AdminRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    peer: str
    body: bytes = b""

    @property
    def from_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.peer).is_loopback
        except ValueError:
            return False


@dataclass
class AdminResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]

_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


class AdminServer:
    def __init__(self, host: str, port: int, *, ready: Callable[[], bool], registry: Registry = REGISTRY,
                 max_connections: int = MAX_CONNECTIONS):
        self.host = host
        self.port = port
        self._ready = ready
        self.registry = registry
        self.max_connections = max_connections
        self.open_connections = 0
        self._refused = registry.counter("tulle_admin_connections_refused_total",
                                         "Admin connections closed at once: max_connections were open")
        self.routes: dict[str, Handler] = {
            "/live": self._live,
            "/ready": self._ready_handler,
            "/metrics": self._metrics,
        }
        self._server: asyncio.AbstractServer | None = None
        self.log = get_logger()

    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1)
            except asyncio.TimeoutError:
                pass

    async def _live(self, req: AdminRequest) -> AdminResponse:
        return AdminResponse(200, b"live\n")

    async def _ready_handler(self, req: AdminRequest) -> AdminResponse:
        return AdminResponse(200, b"ready\n") if self._ready() else AdminResponse(503, b"not ready\n")

    async def _metrics(self, req: AdminRequest) -> AdminResponse:
        return AdminResponse(200, self.registry.render().encode(), "text/plain; version=0.0.4; charset=utf-8")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self.max_connections:
            self._refused.inc()
            writer.close()
            return
        self.open_connections += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.open_connections -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("", 0))[0]
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                except asyncio.LimitOverrunError:
                    await self._send(writer, AdminResponse(431, b"request head too large\n"), close=True)
                    return
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                if len(head) > MAX_HEAD:
                    await self._send(writer, AdminResponse(431, b"request head too large\n"), close=True)
                    return
                try:
                    req, keep_alive = self._parse(head, peer)
                    length = int(req.headers.get("content-length", "0") or 0)
                    if length < 0 or length > 65536:
                        raise ValueError("body too large")
                    if length:
                        req.body = await asyncio.wait_for(reader.readexactly(length), 30)
                except (ValueError, UnicodeDecodeError):
                    await self._send(writer, AdminResponse(400, b"bad request\n"), close=True)
                    return
                handler = self.routes.get(req.path)
                if handler is None:
                    resp = AdminResponse(404, b"not found\n")
                else:
                    try:
                        resp = await handler(req)
                    except Exception:
                        self.log.exception("admin handler failed", path=req.path)
                        resp = AdminResponse(500, b"internal error\n")
                await self._send(writer, resp, close=not keep_alive, head_only=req.method == "HEAD")
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    @staticmethod
    def _parse(head: bytes, peer: str) -> tuple[AdminRequest, bool]:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError("version")
        headers = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ValueError("header")
            headers[name.lower()] = value.strip()
        path, _, query = target.partition("?")
        conn = headers.get("connection", "").lower()
        keep_alive = (version == "HTTP/1.1" and conn != "close") or conn == "keep-alive"
        return AdminRequest(method, path, query, headers, peer), keep_alive

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, resp: AdminResponse, *, close: bool, head_only: bool = False) -> None:
        reason = _REASONS.get(resp.status, "Unknown")
        lines = [f"HTTP/1.1 {resp.status} {reason}", f"content-type: {resp.content_type}",
                 f"content-length: {len(resp.body)}"]
        lines += [f"{k}: {v}" for k, v in resp.headers.items()]
        if close:
            lines.append("connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else resp.body))
        await writer.drain()
