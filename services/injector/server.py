"""The webhook's HTTPS listener: HTTP/1.1 with keep-alive (the API server reuses its
connections), POST / only, a body cap, and the certificate swapped in place when it
changes. A thin adapter: each request body goes to `handle(bytes) -> Answer`.

Refusals are protocol-correct and counted: 400 (bad head), 404 (path), 405 (method),
411 (no Content-Length), 413 (body over the cap, refused before it is read), 431.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import Awaitable, Callable, Optional

from services.injector.admission import Answer
from tulle.log import get_logger
from tulle.metrics import REGISTRY

MAX_HEAD = 16384
BAD_REQUESTS = REGISTRY.counter("tulle_injector_bad_requests_total",
                                "Webhook requests refused before or while reading the review", ["reason"])
ADMISSIONS = REGISTRY.counter("tulle_injector_admissions_total",
                              "Admission reviews answered, by resource (pods, services, other) and result "
                              "(injected, skipped, annotated, ignored)", ["resource", "result"])
CERT_RELOADS = REGISTRY.counter("tulle_injector_certificate_reloads_total",
                                "Webhook serving certificate (re)loads, by result", ["result"])
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
            413: "Content Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def _memfd(data: bytes, name: str) -> str:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    return f"/proc/self/fd/{fd}"


class ServingCertificate:
    """One SSLContext for the listener whose certificate is replaced in place: a handshake
    after `load()` presents the new certificate; connections already open keep theirs."""

    def __init__(self):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["http/1.1"])
        self.loaded: Optional[bytes] = None  # the certificate PEM now served
        self.log = get_logger()

    def load(self, cert_pem: bytes, key_pem: bytes, where: str) -> bool:
        """Check the pair in a scratch context first, so a bad replacement never
        leaves the live one half-loaded. False (logged, counted) when it is refused."""
        if cert_pem == self.loaded:
            return True
        paths = []
        try:
            paths = [_memfd(cert_pem, "webhook-cert"), _memfd(key_pem, "webhook-key")]
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(*paths)
            self.context.load_cert_chain(*paths)
        except (ssl.SSLError, OSError, ValueError) as e:
            CERT_RELOADS.labels("invalid").inc()
            self.log.error("webhook certificate refused; keeping the one served", where=where, error=str(e))
            return False
        finally:
            for p in paths:
                os.close(int(p.rsplit("/", 1)[1]))
        CERT_RELOADS.labels("loaded").inc()
        self.log.info("webhook certificate loaded", where=where, first=self.loaded is None)
        self.loaded = cert_pem
        return True


class WebhookServer:
    def __init__(self, host: str, port: int, cert: ServingCertificate,
                 handle: Callable[[bytes], Awaitable[Answer]], *, max_body: int = 3 * 1024 * 1024,
                 idle_timeout_s: float = 60.0):
        self.host, self.port = host, port
        self.cert = cert
        self.handle = handle
        self.max_body = max_body
        self.idle_timeout_s = idle_timeout_s
        self._server: Optional[asyncio.AbstractServer] = None
        self.log = get_logger()

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, ssl=self.cert.context,
                                                  reuse_address=True, limit=MAX_HEAD, ssl_handshake_timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True to keep the connection for another."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout_s)
        except asyncio.LimitOverrunError:
            return await self._refuse(writer, 431, "request head too large", "head_too_large")
        except asyncio.IncompleteReadError:
            return False
        try:
            method, path, headers, keep_alive = _parse_head(head)
        except ValueError:
            return await self._refuse(writer, 400, "malformed request head", "bad_head")
        if "transfer-encoding" in headers:
            return await self._refuse(writer, 411, "send the review with a Content-Length", "no_length")
        length_text = headers.get("content-length")
        if method != "POST":
            return await self._refuse(writer, 405, "only POST is served", "method", extra={"allow": "POST"})
        if path.split("?", 1)[0] != "/":
            return await self._refuse(writer, 404, "the webhook is served at /", "path")
        if length_text is None:
            return await self._refuse(writer, 411, "send the review with a Content-Length", "no_length")
        if not length_text.isdigit():
            return await self._refuse(writer, 400, "bad Content-Length", "bad_head")
        length = int(length_text)
        if length > self.max_body:
            return await self._refuse(writer, 413, f"the review is larger than {self.max_body} bytes", "too_large")
        body = await asyncio.wait_for(reader.readexactly(length), 30)
        try:
            answer = await self.handle(body)
        except Exception:
            self.log.exception("admission review failed")
            await _send(writer, 500, b'{"message": "internal error"}', close=True)
            return False
        if answer.status != 200:
            BAD_REQUESTS.labels(answer.outcome.reason or "malformed").inc()
        else:
            o = answer.outcome
            ADMISSIONS.labels(o.resource if o.resource in ("pods", "services") else "other", o.result).inc()
        await _send(writer, answer.status, answer.body, close=not keep_alive)
        return keep_alive

    async def _refuse(self, writer, status: int, message: str, reason: str, extra: Optional[dict] = None) -> bool:
        BAD_REQUESTS.labels(reason).inc()
        body = ('{"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": %d, "message": "%s"}'
                % (status, message)).encode()
        await _send(writer, status, body, close=True, extra=extra)
        return False


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], bool]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ValueError("request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError("header")
        key = name.lower()
        if key in headers and key in ("content-length", "transfer-encoding"):
            raise ValueError("repeated framing header")
        headers[key] = value.strip()
    conn = headers.get("connection", "").lower()
    keep_alive = (version == "HTTP/1.1" and conn != "close") or conn == "keep-alive"
    return method, target, headers, keep_alive


async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, *, close: bool,
                extra: Optional[dict] = None) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "content-type: application/json",
             f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    if close:
        lines.append("connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
