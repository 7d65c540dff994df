"""The HTTP/2 codec (proxy/http2, nghttp2 through cffi) between its own client and server
sessions in memory: requests and responses, bodies, trailers, flow control with backpressure
both ways, many streams, resets and shutdown."""
from __future__ import annotations

import hashlib
import os

import pytest

from proxy.http2 import (
    DataReceived,
    GoAwayReceived,
    H2Config,
    H2Error,
    HeaderListTooLarge,
    InformationalResponseReceived,
    PingAcked,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    SettingsAcked,
    StreamClosed,
    StreamReset,
    StreamWritable,
    TrailersReceived,
)
from proxy.http2 import _ffi
from proxy.http2.session import CANCEL, NO_ERROR, REFUSED_STREAM
from tests.http2_support import GET, OK, Pair, of, request


def body_of(events, sid) -> bytes:
    return b"".join(e.data for e in of(events, DataReceived, sid))


def test_connection_start_exchanges_settings_with_linkerd_like_limits():
    pair = Pair()
    [server_view] = of(pair.server_events, RemoteSettingsChanged)
    [client_view] = of(pair.client_events, RemoteSettingsChanged)
    assert client_view.changes[_ffi.SETTINGS_MAX_CONCURRENT_STREAMS] == 100
    assert client_view.changes[_ffi.SETTINGS_MAX_HEADER_LIST_SIZE] == 16384
    assert client_view.changes[_ffi.SETTINGS_INITIAL_WINDOW_SIZE] == 65535
    assert server_view.changes[_ffi.SETTINGS_ENABLE_PUSH] == 0
    assert of(pair.client_events, SettingsAcked) and of(pair.server_events, SettingsAcked)
    # The connection window is raised to 1 MiB for the peer's sending.
    assert pair.client.send_window(0) == 1 << 20
    assert pair.server.send_window(0) == 1 << 20


def test_get_returns_headers_and_body_and_both_sides_see_the_stream_close():
    pair = Pair()
    sid = pair.client.send_request(request(extra=[(b"user-agent", b"test"), (b"accept", b"*/*")]))
    _, se = pair.pump()
    [req] = of(se, RequestReceived)
    assert (req.stream_id, req.end_stream) == (sid, True)
    assert req.headers == [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                           (b":authority", b"svc.test"), (b"user-agent", b"test"), (b"accept", b"*/*")]
    pair.server.send_response(sid, [(b":status", b"200"), (b"content-type", b"text/plain")])
    assert pair.server.send_data(sid, b"hello", end_stream=True)
    ce, se = pair.pump()
    [resp] = of(ce, ResponseReceived)
    assert resp.headers == [(b":status", b"200"), (b"content-type", b"text/plain")]
    assert not resp.end_stream
    assert body_of(ce, sid) == b"hello" and of(ce, DataReceived)[-1].end_stream
    assert of(ce, StreamClosed, sid) and of(se, StreamClosed, sid)
    assert pair.client.open_streams == pair.server.open_streams == 0


def test_post_body_and_trailers_travel_both_ways_in_order():
    pair = Pair()
    sid = pair.client.send_request(request(b"POST", b"/books.Books/Get",
                                           [(b"content-type", b"application/grpc"), (b"te", b"trailers")]),
                                   end_stream=False)
    assert pair.client.send_data(sid, b"\x00\x00\x00\x00\x03abc")
    pair.client.send_trailers(sid, [(b"x-request-trailer", b"1")])
    _, se = pair.pump()
    kinds = [type(e) for e in se if getattr(e, "stream_id", None) == sid]
    assert kinds == [RequestReceived, DataReceived, TrailersReceived]
    assert body_of(se, sid) == b"\x00\x00\x00\x00\x03abc"
    assert of(se, TrailersReceived)[0].headers == [(b"x-request-trailer", b"1")]
    pair.server.send_response(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    pair.server.send_data(sid, b"\x00\x00\x00\x00\x02ok")
    pair.server.send_trailers(sid, [(b"grpc-status", b"0"), (b"grpc-message", b"")])
    ce, se = pair.pump()
    kinds = [type(e) for e in ce if getattr(e, "stream_id", None) == sid]
    assert kinds == [ResponseReceived, DataReceived, TrailersReceived, StreamClosed]
    assert of(ce, TrailersReceived)[0].headers == [(b"grpc-status", b"0"), (b"grpc-message", b"")]


def test_trailers_only_response_is_one_header_section_that_ends_the_stream():
    pair = Pair()
    sid = pair.client.send_request(request(b"POST"), end_stream=False)
    pair.client.end_stream(sid)
    pair.pump()
    pair.server.send_response(sid, [(b":status", b"200"), (b"grpc-status", b"14")], end_stream=True)
    ce, _ = pair.pump()
    [resp] = of(ce, ResponseReceived)
    assert resp.end_stream and (b"grpc-status", b"14") in resp.headers
    assert not of(ce, DataReceived) and of(ce, StreamClosed, sid)


def test_100_continue_arrives_before_the_final_response():
    pair = Pair()
    sid = pair.client.send_request(request(b"PUT", extra=[(b"expect", b"100-continue")]), end_stream=False)
    pair.pump()
    pair.server.send_informational(sid, [(b":status", b"100")])
    ce, _ = pair.pump()
    assert [e.headers for e in of(ce, InformationalResponseReceived)] == [[(b":status", b"100")]]
    pair.client.send_data(sid, b"payload", end_stream=True)
    _, se = pair.pump()
    assert body_of(se, sid) == b"payload"
    pair.server.send_response(sid, [(b":status", b"204")], end_stream=True)
    ce, _ = pair.pump()
    assert of(ce, ResponseReceived)[0].headers == [(b":status", b"204")]


def test_a_large_upload_moves_only_as_fast_as_the_server_consumes_it():
    """The receive window is acknowledged by consume(), not on arrival: an unread stream gets
    one stream window (65,535 bytes) and no more, and send_data pushes back on the sender,
    which refills only on StreamWritable."""
    pair = Pair()
    body = os.urandom(1 << 20)
    sid = pair.client.send_request(request(b"POST"), end_stream=False)
    sent = 0

    def fill():
        nonlocal sent
        while sent < len(body):
            chunk = body[sent:sent + 16384]
            sent += len(chunk)
            if not pair.client.send_data(sid, chunk, end_stream=sent == len(body)):
                return

    fill()
    assert sent == 64 * 1024  # send_data said stop at max_send_buffer
    ce, se = pair.pump()
    received = body_of(se, sid)
    assert len(received) == 65535  # one stream window; nothing consumed yet
    assert pair.server.unconsumed(sid) == 65535
    assert of(ce, StreamWritable, sid)  # the queue drained into the window
    fill()
    assert pair.client.send_buffered(sid) >= 64 * 1024 - 1
    # Nothing more moves while the consumer does not consume, and the sender stays stopped.
    ce, se = pair.pump()
    assert not of(se, DataReceived) and not of(ce, StreamWritable)
    writable = 0
    while len(received) < len(body):
        pair.server.consume(sid, pair.server.unconsumed(sid))
        ce, se = pair.pump()
        assert of(se, DataReceived, sid), f"stalled at {len(received)}"
        received += body_of(se, sid)
        if of(ce, StreamWritable, sid):
            writable += 1
            fill()
        assert pair.client.send_buffered(sid) <= 64 * 1024 + 16384
    assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()
    assert writable >= 10
    assert of(pair.server_events, DataReceived)[-1].end_stream


def test_a_stream_nobody_reads_does_not_stall_the_others():
    """One slow consumer holds one stream window of the 1 MiB connection window; other streams
    keep flowing, and the proxy never buffers more than the windows it granted."""
    pair = Pair()
    slow = pair.client.send_request(request(b"POST", b"/slow"), end_stream=False)
    pair.client.send_data(slow, b"s" * 200_000, end_stream=True)
    pair.pump()
    assert pair.server.unconsumed(slow) == 65535
    for i in range(30):
        sid = pair.client.send_request(request(b"POST", b"/fast"), end_stream=False)
        pair.client.send_data(sid, b"f" * 100_000, end_stream=True)
        got = 0
        while True:
            _, se = pair.pump()
            for e in of(se, DataReceived, sid):
                got += len(e.data)
                pair.server.consume(sid, len(e.data))
            if got == 100_000:
                break
            assert of(se, DataReceived, sid), f"stream {i} stalled at {got}"
    # 3 MB went through beside the unread stream, which still holds exactly its window.
    assert pair.server.unconsumed(slow) == 65535
    assert pair.client.send_buffered(slow) == 200_000 - 65535


def test_bytes_left_unconsumed_by_reset_streams_return_to_the_connection_window():
    """Otherwise each abandoned stream would leak its window and the connection would stall."""
    pair = Pair()
    for _ in range(20):  # 20 x 65,535 bytes > the 1 MiB connection window
        sid = pair.client.send_request(request(b"POST"), end_stream=False)
        pair.client.send_data(sid, b"x" * 65535)
        pair.pump()
        assert pair.server.unconsumed(sid) == 65535
        pair.server.reset(sid, CANCEL)
        ce, se = pair.pump()
        assert of(ce, StreamReset, sid)[0].error_code == CANCEL
    sid = pair.client.send_request(request(b"POST"), end_stream=False)
    pair.client.send_data(sid, b"y" * 1000, end_stream=True)
    _, se = pair.pump()
    assert body_of(se, sid) == b"y" * 1000


def test_a_hundred_concurrent_streams_complete_with_their_own_bodies():
    pair = Pair()
    sids = [pair.client.send_request(request(b"POST", f"/{i}".encode()), end_stream=False) for i in range(100)]
    for i, sid in enumerate(sids):
        pair.client.send_data(sid, f"request {i}".encode() * 100, end_stream=True)
    _, se = pair.pump()
    assert len(of(se, RequestReceived)) == 100
    for i, sid in enumerate(sids):
        assert body_of(se, sid) == f"request {i}".encode() * 100
        pair.server.send_response(sid, OK)
        pair.server.send_data(sid, f"response {i}".encode() * 100, end_stream=True)
    ce, _ = pair.pump()
    for i, sid in enumerate(sids):
        assert body_of(ce, sid) == f"response {i}".encode() * 100
    assert len(of(ce, StreamClosed)) == 100


def test_requests_beyond_the_servers_stream_limit_wait_for_a_free_stream():
    pair = Pair(server_config=H2Config(max_concurrent_streams=10))
    sids = [pair.client.send_request(GET) for _ in range(25)]
    _, se = pair.pump()
    assert len(of(se, RequestReceived)) == 10
    done = set()
    while len(done) < 25:
        for e in of(se, RequestReceived):
            pair.server.send_response(e.stream_id, OK, end_stream=True)
        ce, se = pair.pump()
        done |= {e.stream_id for e in of(ce, StreamClosed)}
        assert not of(ce, StreamReset)
    assert done == set(sids)


def test_a_client_reset_reaches_the_server_as_a_remote_reset():
    pair = Pair()
    sid = pair.client.send_request(request(b"POST"), end_stream=False)
    pair.pump()
    pair.client.reset(sid, CANCEL)
    ce, se = pair.pump()
    assert of(se, StreamReset, sid) == [StreamReset(sid, CANCEL, True)]
    assert of(ce, StreamReset, sid) == [StreamReset(sid, CANCEL, False)]
    # The caller may still hold a chunk for that stream: it is dropped, not an error.
    assert pair.client.send_data(sid, b"late") is False


def test_a_server_reset_reaches_the_client_with_its_code():
    pair = Pair()
    sid = pair.client.send_request(GET)
    pair.pump()
    pair.server.reset(sid, REFUSED_STREAM)
    ce, _ = pair.pump()
    assert of(ce, StreamReset, sid) == [StreamReset(sid, REFUSED_STREAM, True)]


def test_graceful_goaway_finishes_open_streams_and_refuses_later_ones():
    pair = Pair()
    first = pair.client.send_request(GET)
    pair.pump()
    pair.server.goaway(NO_ERROR, b"shutting down")
    ce, _ = pair.pump()
    assert of(ce, GoAwayReceived) == [GoAwayReceived(NO_ERROR, first, b"shutting down")]
    assert not pair.client.accepts_requests
    late = pair.client.send_request(GET)  # a race with the GOAWAY: refused, safe to retry
    ce, se = pair.pump()
    assert of(ce, StreamReset, late) == [StreamReset(late, REFUSED_STREAM, False)]
    assert not of(se, RequestReceived)
    pair.server.send_response(first, OK, end_stream=True)
    ce, _ = pair.pump()
    assert of(ce, StreamClosed, first)
    assert pair.server.closed


def test_goaway_refuses_streams_above_its_last_stream_id_so_they_can_be_retried():
    pair = Pair()
    first = pair.client.send_request(GET)
    pair.pump()
    second = pair.client.send_request(GET)
    # The server's GOAWAY (last = first) crosses the second request on the wire.
    pair.server.goaway()
    to_client = pair.server.data_to_send()
    pair.server.feed(pair.client.data_to_send())
    ce = pair.client.feed(to_client)
    assert of(ce, StreamReset, second) == [StreamReset(second, REFUSED_STREAM, False)]
    assert not of(ce, StreamReset, first)


def test_ping_is_answered():
    pair = Pair()
    pair.client.ping(b"12345678")
    ce, _ = pair.pump()
    assert of(ce, PingAcked) == [PingAcked(b"12345678")]


def test_a_too_large_request_header_section_leaves_the_stream_open_for_a_431():
    pair = Pair()
    small = pair.client.send_request(GET)
    big = pair.client.send_request(request(extra=[(b"x-big", b"a" * 17000)]))
    _, se = pair.pump()
    assert of(se, HeaderListTooLarge) == [HeaderListTooLarge(big, True, False)]
    assert [e.stream_id for e in of(se, RequestReceived)] == [small]
    pair.server.send_response(big, [(b":status", b"431")], end_stream=True)
    pair.server.send_response(small, OK, end_stream=True)
    ce, _ = pair.pump()
    assert {e.stream_id: e.headers for e in of(ce, ResponseReceived)} == {
        big: [(b":status", b"431")], small: OK}


def test_a_header_section_exactly_at_the_limit_is_accepted():
    base = sum(len(n) + len(v) + 32 for n, v in GET)
    for size, accepted in ((16384 - 1, True), (16384, True), (16384 + 1, False)):
        pair = Pair()
        value_len = size - base - 32 - len(b"x-pad")
        pair.client.send_request(request(extra=[(b"x-pad", b"p" * value_len)]))
        _, se = pair.pump()
        assert bool(of(se, RequestReceived)) is accepted, size
        assert bool(of(se, HeaderListTooLarge)) is not accepted, size


def test_response_trailers_too_large_are_reported_not_delivered():
    pair = Pair()
    sid = pair.client.send_request(GET)
    pair.pump()
    pair.server.send_response(sid, OK)
    pair.server.send_trailers(sid, [(b"x-big", b"t" * 17000)])
    ce, _ = pair.pump()
    assert of(ce, HeaderListTooLarge) == [HeaderListTooLarge(sid, True, True)]
    assert not of(ce, TrailersReceived)


def test_sending_after_the_end_of_a_stream_is_an_error_of_the_caller():
    pair = Pair()
    sid = pair.client.send_request(GET)  # ends the request
    with pytest.raises(H2Error):
        pair.client.send_data(sid, b"x")
    pair.pump()
    pair.server.send_response(sid, OK, end_stream=True)
    with pytest.raises(H2Error):
        pair.server.send_trailers(sid, [(b"x", b"y")])
    with pytest.raises(H2Error):
        pair.client.send_response(sid, OK)


def test_authorization_is_never_indexed_by_hpack():
    """RFC 9113 §8.2.3: credentials stay out of the compression context (no CRIME-style
    guessing); other fields are indexed as usual."""
    pair = Pair()
    for _ in range(2):
        pair.client.send_request(request(extra=[(b"authorization", b"Bearer secret"), (b"x-other", b"v")]))
        pair.pump()
    before = pair.client.hpack_encoder_table_size
    pair.client.send_request(request(extra=[(b"authorization", b"Bearer other"), (b"x-other", b"v")]))
    pair.pump()
    assert pair.client.hpack_encoder_table_size == before  # no new entry for the new credential


def test_an_adapter_object_attached_to_a_stream_goes_away_with_the_stream():
    pair = Pair()
    sid = pair.client.send_request(GET)
    _, se = pair.pump()
    pair.server.attach(sid, {"route": "books"})
    assert pair.server.context(sid) == {"route": "books"}
    pair.server.send_response(sid, OK, end_stream=True)
    pair.pump()
    assert pair.server.context(sid) is None


def test_lowering_the_stream_limit_applies_once_the_peer_acknowledges_it():
    pair = Pair()
    pair.server.update_settings({_ffi.SETTINGS_MAX_CONCURRENT_STREAMS: 2})
    ce, se = pair.pump()
    assert of(se, SettingsAcked)
    assert pair.client.remote_max_concurrent_streams == 2
    for _ in range(5):
        pair.client.send_request(GET)
    _, se = pair.pump()
    assert len(of(se, RequestReceived)) == 2  # the others wait in the client for a free stream


def test_a_response_complete_before_the_upload_stops_it_with_no_error_and_both_sides_close_cleanly():
    """RFC 9113 §8.1: e.g. a 413 or a gRPC error sent while the client still streams."""
    pair = Pair()
    sid = pair.client.send_request(request(b"POST"), end_stream=False)
    pair.client.send_data(sid, b"u" * 1000)
    pair.pump()
    pair.server.send_response(sid, [(b":status", b"413")], end_stream=True)
    ce, se = pair.pump()
    assert of(ce, ResponseReceived, sid)[0].headers == [(b":status", b"413")]
    assert of(ce, StreamClosed, sid) and not of(ce, StreamReset)
    assert of(se, StreamClosed, sid) and not of(se, StreamReset)
    assert pair.client.send_data(sid, b"more") is False
    assert pair.server.open_streams == pair.client.open_streams == 0
