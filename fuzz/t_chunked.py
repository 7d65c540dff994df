"""Chunked request bodies (llhttp's chunk decoding in proxy/http1/server.py, re-encoded by
the proxy towards the upstream): the fuzz input is the body of a chunked request, split
across reads, sent through the real Http1Server and its Exchange (proxy/exchange.py) to a
real Http1Client.

Invariants: what the upstream receives is one well-formed chunked request carrying exactly
the body bytes llhttp decoded from the client (no chunk-size or extension or trailer byte
leaks into it, nothing of a following request is appended); it is terminated by the last
chunk only when the client's body was complete; the proxy never answers 500.
"""

from __future__ import annotations

import httptools

from fuzz.http1_harness import UpstreamPool, Transport, feed_split, new_server, split_points
from proxy.http1.client import Http1Client

INSTRUMENT = ("proxy.http1", "proxy.exchange")

HEAD = b"POST /up HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n"


class _Body:
    """The first request's body as llhttp reads it, and whether it ended."""

    def __init__(self):
        self.body = b""
        self.messages = 0
        self.complete = False
        self.parser = httptools.HttpRequestParser(self)

    def on_body(self, b):
        if self.messages == 0:
            self.body += b

    def on_message_complete(self):
        if self.messages == 0:
            self.complete = True
        self.messages += 1

    def read(self, data: bytes) -> "_Body":
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            pass
        return self


def test_one_input(data: bytes) -> None:
    body, cuts = split_points(data)
    up_transport = Transport()
    upstream = Http1Client(UpstreamPool())
    upstream.connection_made(up_transport)

    def route(x):
        assert not room.exchanges[1:] and x.attempts == 0, "routed twice"
        x.attach(upstream)

    server, room, down = new_server(route)
    feed_split(server, HEAD + body, [c + len(HEAD) for c in cuts])
    assert b" 500 " not in down.output()[:12], down.output()[:200]
    expected = _Body().read(HEAD + body)
    sent = up_transport.output()
    got = _Body()
    try:
        got.parser.feed_data(sent)
    except httptools.HttpParserError as e:
        raise AssertionError(f"malformed chunked body sent upstream: {e}: {sent[:300]!r}") from None
    assert got.messages <= 1, "more than one request sent upstream"
    assert got.body == expected.body[:len(got.body)], (got.body[:80], expected.body[:80])
    if expected.complete and not server.refused:
        assert got.complete and got.body == expected.body, (got.body[:80], expected.body[:80])
    if got.complete:
        assert expected.complete
    server.connection_lost(None)


def seeds() -> list[bytes]:
    bodies = [
        b"5\r\nhello\r\n0\r\n\r\n",
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n",
        b"a\r\n0123456789\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: up\r\n\r\n",
        b"1\r\nx\r\n",
        b"ffffffffffffffffff\r\nx",
        b"0\r\n\r\n",
        b"3\r\nabc\n0\r\n\r\n",
    ]
    return [bytes([i]) + b for b in bodies for i in range(4)]
