"""HTTP/1 request heads (proxy/http1/server.py over httptools, proxy/http1/headers.py, into
proxy/exchange.py): bytes from a client, split across reads as the network may, into the
real Http1Server; each request it reads becomes an Exchange that the room fails (503) at
once, or later and in order (pipelined requests wait in the server's queue).

Invariants: nothing escapes data_received (no 500 "proxy error", the answer to an
exception inside a callback); every dispatched request is within the limits (header count,
head bytes), carries no hop-by-hop header, no tulle-client-id in any spelling, no CR/LF/NUL
in a header, at most one Host (the one its authority came from), and a framing that matches
its headers; the head the proxy would send upstream for it is one well-formed request;
what the proxy wrote back is a sequence of well-formed HTTP/1.1 responses, one per request
the room answered, the last of them the only one that may close the connection; no request
is dispatched once the connection closed, nor one whose body can no longer be read whole.

The first input byte: bits 0-1 choose the cuts (http1_harness.split_points), bit 7 answers
later instead of at once, bit 6 reads on the outbound side (absolute-form targets routed).
"""

from __future__ import annotations

import httptools

from fuzz.http1_harness import LIMITS, ResponseReader, feed_split, new_server, split_points
from proxy.exchange import NO_BODY, SIZED, STREAMED
from proxy.http1.client import request_head
from proxy.http1.headers import HOP_BY_HOP, folded_name

INSTRUMENT = ("proxy.http1", "proxy.exchange")

REFUSALS = {400, 408, 413, 414, 431, 501, 505}
FUZZ_STATUS = 503  # the room's answer: not one the proxy's own refusals use

# Known proxy bugs, reported (proxy/ is not this harness's to fix). Each flag lets its
# invariant below pass (and the fuzzer look past it) until the bug is fixed; then the flag
# goes False and its crash- inputs in fuzz/corpus/http1_request/ keep it fixed.
# 1. Once proxy/http1/server.py closed the connection (an answer with `connection: close`,
#    e.g. to a request answered before its body was read), it goes on parsing the rest of
#    the read, and after an upgrade or CONNECT request answered without switching, the bytes
#    after its head (`_parser_upgraded`): the requests in them are dispatched, and go upstream.
#    crash-request-read-after-early-answer-closed, crash-request-after-refused-upgrade
KNOWN_REQUESTS_AFTER_CLOSE = False
# 2. A pipelined request whose chunked body turns out malformed (or stalls: 408) while it
#    waits in the queue is dispatched anyway when its turn comes (`refuse` queues the refusal
#    behind it), though nothing more is read: upstream, its body never ends, and no clock
#    runs (the server's body clock stops once refused, the exchange's waits for the body).
#    crash-queued-request-with-broken-body-dispatched
KNOWN_REFUSED_BODY_DISPATCHED = False


def _fail(x):
    x.fail(FUZZ_STATUS, "fuzz", "fuzz")


def check_exchange(x) -> None:
    """The request as the server hands it to the core (and on to any upstream)."""
    assert len(x.headers) <= LIMITS.max_headers
    size = len(x.path)
    for name, value in x.headers:
        lname = name.lower()
        assert lname not in HOP_BY_HOP, name
        assert folded_name(lname) != b"tulle-client-id", name
        assert not any(c in name for c in b"\r\n\0: "), name
        assert not any(c in value for c in b"\r\n\0"), value
        size += len(name) + len(value) + 4
    assert size <= LIMITS.max_head_bytes, size
    hosts = [v for n, v in x.headers if n.lower() == b"host"]
    assert len(hosts) <= 1 and x.host_header == bool(hosts), (hosts, x.host_header)
    if hosts and x.method != b"CONNECT":  # (CONNECT: the authority is its target)
        assert hosts[0] == x.authority, (hosts, x.authority)
    lengths = [v for n, v in x.headers if n.lower() == b"content-length"]
    if x.framing == STREAMED:
        assert not lengths and x.down.version == "1.1"
    elif x.framing == SIZED:
        assert len(lengths) == 1 and int(lengths[0]) == x.length
    else:
        assert x.framing == NO_BODY and not lengths
    if x.method != b"CONNECT":  # (a tunnel: no head goes upstream)
        _check_upstream_head(x, request_head(x))


class _Head:
    """A request head as an upstream's llhttp reads it."""

    def __init__(self):
        self.heads = 0
        self.url = b""
        self.hosts = 0
        self.parser = httptools.HttpRequestParser(self)

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.hosts += name.lower() == b"host"

    def on_headers_complete(self):
        self.heads += 1


def _check_upstream_head(x, head: bytes) -> None:
    """What an upstream would read: one request head, the same method and target, one Host
    at most (an absolute-form target's authority, or the client's Host)."""
    got = _Head()
    try:
        got.parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass  # an upgrade request: llhttp stops at its head
    except httptools.HttpParserError as e:
        raise AssertionError(f"malformed head for the upstream: {e}: {head[:300]!r}") from None
    assert got.heads == 1, head[:300]
    assert got.parser.get_method() == x.method and got.url == x.path, head[:300]
    assert got.hosts <= 1, head[:300]


def _closes(resp: dict) -> bool:
    return any(n.lower() == b"connection" and b"close" in v.lower() for n, v in resp["headers"])


def test_one_input(data: bytes) -> None:
    if not data:
        return
    defer = data[0] & 0x80
    payload, cuts = split_points(data)
    server, room, transport = new_server(None if defer else _fail, absolute_form=bool(data[0] & 0x40))
    feed_split(server, payload, cuts)
    if defer:
        # Answer what was read, in order: each answer dispatches the next queued request.
        for _ in range(64):
            req = server.active
            if req is None or req.x.done or server.closed:
                break
            _fail(req.x)
    for x in room.exchanges:
        check_exchange(x)
    assert "internal" not in room.errors, room.errors
    # No request is read once the proxy closed the connection (RFC 9112 9.6) ...
    late = room.after_close
    assert KNOWN_REQUESTS_AFTER_CLOSE or not late, [(x.method, x.path) for x in late]
    # ... and none goes on whose body can never end (reading stopped before it did).
    assert KNOWN_REFUSED_BODY_DISPATCHED or not room.unending, [(x.method, x.path) for x in room.unending]
    reader = ResponseReader()
    reader.feed(transport.output())
    statuses = []
    for resp in reader.responses:
        assert resp["complete"], resp
        assert resp["status"] in REFUSALS | {FUZZ_STATUS}, resp["status"]
        statuses.append(resp["status"])
    # Each request the room answered got that answer, once (the other responses are the
    # proxy's own: a target it cannot route, or a refusal) ...
    answered = [x for x in room.exchanges if x.status and x not in late]
    assert statuses.count(FUZZ_STATUS) == len(answered), (statuses, len(answered))
    # ... and nothing is written after a response that closes the connection.
    for resp in reader.responses[:-1]:
        assert not _closes(resp), statuses
    server.connection_lost(None)


def seeds() -> list[bytes]:
    reqs = [
        b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: web\r\n\r\nGET /b HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        b"POST /books HTTP/1.1\r\nHost: books:8080\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nTrailer: 1\r\n\r\n",
        b"GET http://authors.demo:8080/x HTTP/1.1\r\nHost: authors\r\ntulle-client-id: spoof\r\n"
        b"tulle_client_id: spoof\r\nConnection: keep-alive, x-hop\r\nx-hop: 1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nraw",
        b"CONNECT books:8080 HTTP/1.1\r\nHost: books:8080\r\n\r\n\x16\x03\x01",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    out = []
    for i, r in enumerate(reqs):
        out.append(bytes([i % 4]) + r)
        out.append(bytes([0x80 | (i % 4)]) + r)
        out.append(bytes([0xC0 | (i % 4)]) + r)  # outbound, answered later
    return out
