"""The HTTP/2 codec, server side (proxy/http2/session.py H2Session.feed): a client's bytes,
split across reads, into a server session driven as the wire adapter drives it (answering
requests, giving flow-control credit back).

Invariants: no exception (H2Error from feed means a bug of ours); events are the codec's own
kinds with bounded reasons; nothing is reported for a stream after its StreamClosed or
StreamReset.
"""

from __future__ import annotations

from fuzz.h2_harness import GET, POST, Driver
from fuzz.http1_harness import split_points
from proxy.http2 import H2Session

INSTRUMENT = ("proxy.http2",)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    payload, cuts = split_points(data)
    if data[0] & 0x80:
        payload = PREFACE + payload  # most inputs get past the preface check
    d = Driver(H2Session(client=False), server=True)
    d.feed(b"")
    pos = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(payload))):
        d.feed(payload[pos:cut])
        pos = cut
    d.feed(payload[pos:])


def client_bytes(script) -> bytes:
    """What a real client session writes for `script(client)` (without the preface byte)."""
    c = H2Session(client=True)
    script(c)
    return c.data_to_send()


def seeds() -> list[bytes]:
    def one_get(c):
        c.send_request(GET, end_stream=True)

    def post_body(c):
        sid = c.send_request(POST, end_stream=False)
        c.send_data(sid, b"hello" * 10, end_stream=False)
        c.send_trailers(sid, [(b"grpc-status", b"0")])

    def many(c):
        for i in range(5):
            sid = c.send_request(GET + [(b"x-n", str(i).encode())], end_stream=i % 2 == 0)
            if i % 2:
                c.reset(sid)
        c.ping(b"12345678")

    out = []
    for script in (one_get, post_body, many):
        raw = client_bytes(script)
        assert raw.startswith(PREFACE)
        out.append(b"\x80" + raw[len(PREFACE):])
        out.append(b"\x02" + raw)
    return out
