"""HTTP/1 response heads and bodies from an upstream (proxy/http1/client.py over httptools,
proxy/http1/headers.py, through proxy/exchange.py): one request goes through the real
Http1Server, whose room attaches a real Http1Client to its Exchange; the fuzz input is
everything the upstream answers, split across reads.

Invariants: no exception inside a callback (the proxy logs "handling failed" for those:
here that raises); what reaches the client parses as HTTP/1.1 responses — interim ones,
at most as many as the proxy passes on, then one final response whose only connection-level headers are the proxy's own, with no
more headers than the proxy accepts upstream, and, when complete, exactly the body bytes
the upstream's response carried (re-framed, never altered); an upstream response the
proxy cannot forward becomes the proxy's own 502, never a half-written head.
"""

from __future__ import annotations

import httptools

import proxy.http1.client as client_mod
import proxy.http1.server as server_mod
from fuzz.http1_harness import LIMITS, UpstreamPool, ResponseReader, Transport, feed_split, new_server, split_points
from proxy.http1.client import Http1Client

INSTRUMENT = ("proxy.http1", "proxy.exchange")


class _RaisingLog:
    """The proxy's 'unexpected exception' log lines are bugs here."""

    def error(self, msg, **kw):
        raise AssertionError(f"{msg}: {kw}")

    exception = error

    def __getattr__(self, name):
        return lambda *a, **k: None


client_mod.log = _RaisingLog()
server_mod.log = _RaisingLog()


REQUESTS = (
    (b"GET", b"GET / HTTP/1.1\r\nHost: up\r\n\r\n"),
    (b"HEAD", b"HEAD / HTTP/1.1\r\nHost: up\r\n\r\n"),
    (b"GET", b"GET / HTTP/1.0\r\n\r\n"),
    (b"POST", b"POST / HTTP/1.1\r\nHost: up\r\nContent-Length: 2\r\n\r\nhi"),
)


class _UpstreamBody:
    """The body of the upstream's final response as llhttp reads it (what must arrive)."""

    def __init__(self):
        self.body = b""
        self.final = False
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self):
        # Only the first final response counts (what follows it is not an answer to the request).
        self.final = self.parser.get_status_code() >= 200 and not self.complete

    def on_body(self, b):
        if self.final:
            self.body += b

    def on_message_complete(self):
        if self.final:
            self.complete = True
            self.final = False


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    method, raw_request = REQUESTS[data[0] % len(REQUESTS)]
    payload, cuts = split_points(data[1:])
    up_transport = Transport()
    upstream = Http1Client(UpstreamPool())
    upstream.connection_made(up_transport)

    def route(x):
        assert not room.exchanges[1:] and x.up is None and x.attempts == 0, "routed twice"
        x.attach(upstream)

    server, room, down = new_server(route)
    server.data_received(raw_request)
    assert room.exchanges, "the request was not dispatched"
    feed_split(upstream, payload, cuts)
    if not upstream.closed:
        upstream.connection_lost(None)  # the upstream closes: ends a body delimited by close
    out = down.output()
    if method == b"HEAD":
        return  # a HEAD response has no body whatever its head says: nothing to parse against
    reader = ResponseReader()
    try:
        reader.feed(out)
    except httptools.HttpParserError as e:
        raise AssertionError(f"the proxy wrote a malformed response: {e}: {out[:300]!r}") from None
    finals = [r for r in reader.responses if r.get("status", 0) >= 200]
    assert len(finals) <= 1, finals
    interims = reader.responses[:-1] if finals else reader.responses
    assert all(r.get("status", 0) < 200 for r in interims), "a response after the final one"
    assert len(interims) <= LIMITS.max_interim, len(interims)
    if not finals:
        assert not reader.responses or down.closed, out[:300]
        return
    final = finals[0]
    names = [n.lower() for n, _ in final["headers"]]
    assert len(names) <= LIMITS.max_headers + 3, len(names)
    for hop in (b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"):
        assert hop not in names, (hop, final["headers"])
    assert names.count(b"transfer-encoding") <= 1 and names.count(b"connection") <= 1
    assert names.count(b"content-length") <= 1 or b"transfer-encoding" in names
    if b"tulle-proxy-error" in names:
        assert final["status"] in (502, 504), final["status"]
        return
    if final["complete"]:
        expected = _UpstreamBody()
        try:
            expected.parser.feed_data(payload)
        except httptools.HttpParserError:
            pass
        if expected.complete or upstream.until_close:
            assert final["body"] == expected.body, (final["body"][:100], expected.body[:100])


def seeds() -> list[bytes]:
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nx: y\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nraw",
        b"HTTP/1.0 500 Oops\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive, x-a\r\nx-a: 1\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    ]
    return [bytes([i, j]) + r for j, r in enumerate(responses) for i in range(len(REQUESTS))]
