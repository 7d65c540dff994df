"""The HTTP/2 codec, client side (proxy/http2/session.py H2Session.feed): a server's bytes,
split across reads, into a client session that has sent two requests (one with a body),
driven as the wire adapter drives it.

Invariants: as the server target's — no exception, the codec's own events with bounded
reasons, nothing for a stream after its end.
"""

from __future__ import annotations

from fuzz.h2_harness import GET, OK, POST, Driver
from fuzz.http1_harness import split_points
from proxy.http2 import H2Session


INSTRUMENT = ("proxy.http2",)


def _client() -> Driver:
    c = H2Session(client=True)
    c.send_request(GET, end_stream=True)  # stream 1
    sid = c.send_request(POST, end_stream=False)  # stream 3
    c.send_data(sid, b"body" * 20, end_stream=True)
    d = Driver(c, server=False)
    d.known.update((1, 3))
    d.feed(b"")
    return d


def test_one_input(data: bytes) -> None:
    payload, cuts = split_points(data)
    d = _client()
    pos = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(payload))):
        d.feed(payload[pos:cut])
        pos = cut
    d.feed(payload[pos:])


def seeds() -> list[bytes]:
    from proxy.http2 import events as ev

    out = []
    for variant in range(3):
        c = _client().s
        s = H2Session(client=False)
        received = s.feed(c.data_to_send())
        for e in received:
            if isinstance(e, ev.RequestReceived):
                if variant == 0:
                    s.send_response(e.stream_id, OK, end_stream=False)
                    s.send_data(e.stream_id, b"answer", end_stream=True)
                elif variant == 1:
                    s.send_informational(e.stream_id, [(b":status", b"103")])
                    s.send_response(e.stream_id, OK, end_stream=False)
                    s.send_trailers(e.stream_id, [(b"grpc-status", b"0")])
                else:
                    s.reset(e.stream_id)
        if variant == 2:
            s.goaway()
        out.append(bytes([variant]) + s.data_to_send())
    return out
