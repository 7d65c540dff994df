"""HTTP/1 request heads (proxy/http1/server.py over httptools, proxy/http1/headers.py):
bytes from a client, split across reads as the network may, into the real Http1Server.

Invariants: nothing escapes data_received (no 500 "proxy error", the answer to an
exception inside a callback); every dispatched request is within the limits (header count,
head bytes), carries no hop-by-hop header, no tulle-client-id in any spelling, no CR/LF/NUL
in a header, at most one Host, and a framing that matches its headers; what the proxy wrote
back is a sequence of well-formed HTTP/1.1 responses.
"""

from __future__ import annotations

from fuzz.http1_harness import LIMITS, ResponseReader, feed_split, new_server, split_points
from proxy.http1.headers import CHUNKED, HOP_BY_HOP, LENGTH, NO_BODY, folded_name

INSTRUMENT = ("proxy.http1",)

REFUSALS = {400, 408, 413, 414, 431, 501, 505}


def _answer_at_once(server, req):
    server.fail(req, 503, "fuzz", "fuzz")


def check_request(req) -> None:
    assert len(req.headers) <= LIMITS.max_headers
    size = len(req.target)
    for name, value in req.headers:
        lname = name.lower()
        assert lname not in HOP_BY_HOP, name
        assert folded_name(lname) != b"tulle-client-id", name
        assert not any(c in name for c in b"\r\n\0: "), name
        assert not any(c in value for c in b"\r\n\0"), value
        size += len(name) + len(value) + 4
    assert size <= LIMITS.max_head_bytes, size
    hosts = [v for n, v in req.headers if n.lower() == b"host"]
    assert len(hosts) <= 1
    lengths = [v for n, v in req.headers if n.lower() == b"content-length"]
    if req.framing == CHUNKED:
        assert not lengths and req.version == "1.1"
    elif req.framing == LENGTH:
        assert len(lengths) == 1 and int(lengths[0]) == req.length
    else:
        assert req.framing == NO_BODY and not lengths


def test_one_input(data: bytes) -> None:
    if not data:
        return
    defer = data[0] & 0x80
    payload, cuts = split_points(data)
    server, room, transport = new_server(None if defer else _answer_at_once)
    feed_split(server, payload, cuts)
    if defer:
        # Answer what was read, in order (pipelined requests wait in the server's queue).
        for _ in range(64):
            req = server.active
            if req is None or req.done or server.closed:
                break
            server.fail(req, 503, "fuzz", "fuzz")
    for req in room.requests:
        check_request(req)
    assert "internal" not in room.errors, room.errors
    reader = ResponseReader()
    reader.feed(transport.output())
    for resp in reader.responses:
        assert resp["complete"], resp
        assert resp["status"] in REFUSALS | {503}, resp["status"]
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
    return out
