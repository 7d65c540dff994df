"""HTTP/2 limits and attacks against the codec's server session, the way an attacker sends
them: a raw client (the h2 library for the handshake and HPACK, frames crafted by hand) feeding
bytes to an H2Session. Each refusal is checked against the frame RFC 9113 prescribes, reported
once with a bounded reason for the adapter's counters, and leaves a concurrent well-behaved
connection (and, for stream-level refusals, the other streams of the same connection) working.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hyperframe.frame import PingFrame, PushPromiseFrame, SettingsFrame, WindowUpdateFrame

from proxy.http2 import (
    DataReceived,
    H2Config,
    H2Session,
    HeaderListTooLarge,
    PeerMisbehaved,
    RequestReceived,
    ResponseReceived,
    StreamReset,
)
from proxy.http2.events import REASONS
from proxy.http2.session import (
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
)
from tests.http2_support import GET, OK, Bystander, RawClient, goaway_of, of, request, resets_of


def misbehaved(events) -> list[tuple[str, int, int]]:
    found = [(e.reason, e.stream_id, e.error_code) for e in of(events, PeerMisbehaved)]
    assert all(r in REASONS for r, _, _ in found)
    return found


def answer_all(server: H2Session, events) -> None:
    for e in of(events, RequestReceived):
        server.send_response(e.stream_id, OK, end_stream=True)


def assert_closed_with(server: H2Session, raw: RawClient, reason: str, code: int) -> None:
    out = server.data_to_send()
    goaway = goaway_of(out)
    assert goaway is not None, "no GOAWAY sent"
    assert goaway.error_code == code
    assert misbehaved(raw.events + server.pop_events()) == [(reason, 0, code)]
    assert server.closed


# ---- concurrent streams ----

def test_streams_beyond_the_limit_before_the_peer_acked_it_are_refused_and_the_rest_served():
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server, ack_settings=False)  # a client that opens streams at once
    for _ in range(103):
        raw.conn.send_headers(raw.conn.get_next_available_stream_id(), GET, end_stream=True)
    events = raw.send_pending()
    assert len(of(events, RequestReceived)) == 100
    answer_all(server, events)
    out = server.data_to_send()
    assert resets_of(out) == {201: REFUSED_STREAM, 203: REFUSED_STREAM, 205: REFUSED_STREAM}
    assert misbehaved(events + server.pop_events()) == [
        ("refused_stream", sid, REFUSED_STREAM) for sid in (201, 203, 205)]
    served = [e for e in raw.conn.receive_data(out) if e.__class__.__name__ == "ResponseReceived"]
    assert len(served) == 100
    assert not server.closed
    by.finish()


def test_a_peer_exceeding_the_stream_limit_it_acknowledged_loses_the_connection():
    """nghttp2 treats this stream error as a connection error (RFC 9113 §5.4.1 allows it):
    the peer had agreed to the limit."""
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    for _ in range(100):
        raw.conn.send_headers(raw.conn.get_next_available_stream_id(), GET, end_stream=True)
    raw.send_pending()
    raw.send(raw.headers_frame(201))
    assert_closed_with(server, raw, "max_concurrent_streams", PROTOCOL_ERROR)
    by.finish()


# ---- header list size and HPACK ----

def test_a_header_section_over_16_kib_is_surfaced_for_a_431_and_the_stream_stays_usable():
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.conn.send_headers(1, request(extra=[(b"x-big", b"b" * 17000)]), end_stream=True)
    raw.conn.send_headers(3, GET, end_stream=True)
    events = raw.send_pending()
    assert of(events, HeaderListTooLarge) == [HeaderListTooLarge(1, True, False)]
    assert [e.stream_id for e in of(events, RequestReceived)] == [3]
    server.send_response(1, [(b":status", b"431")], end_stream=True)
    answer_all(server, events)
    statuses = {e.stream_id: dict(e.headers)[b":status"]
                for e in raw.conn.receive_data(server.data_to_send()) if e.__class__.__name__ == "ResponseReceived"}
    assert statuses == {1: b"431", 3: b"200"}
    by.finish()


def test_an_hpack_bomb_is_caught_by_the_decoded_size_not_the_wire_size():
    """A 4 KB field stored once in the dynamic table and referenced many times: a few hundred
    bytes on the wire decode to far more than the limit; memory stays bounded."""
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    big = (b"x-bomb", b"z" * 4000)
    raw.conn.send_headers(1, request(extra=[big]), end_stream=True)  # now indexed
    events = raw.send_pending()
    assert of(events, RequestReceived)
    raw.conn.send_headers(3, request(extra=[big] * 100), end_stream=True)
    wire = raw.conn.data_to_send()
    assert len(wire) < 1000
    events = raw.send(wire)
    assert of(events, HeaderListTooLarge) == [HeaderListTooLarge(3, True, False)]
    assert not of(events, RequestReceived)
    by.finish()


def test_an_hpack_table_size_update_above_our_setting_is_a_compression_error():
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.conn.encoder.header_table_size = 1 << 20  # we advertised 4096
    raw.conn.send_headers(1, GET, end_stream=True)
    raw.send_pending()
    assert_closed_with(server, raw, "hpack", COMPRESSION_ERROR)
    by.finish()


def test_an_undecodable_header_block_is_a_compression_error():
    server = H2Session(client=False)
    raw = RawClient(server)
    frame = bytearray(raw.headers_frame(1))
    frame[9:] = b"\xff" * (len(frame) - 9)  # an index far beyond both tables
    raw.send(bytes(frame))
    assert_closed_with(server, raw, "hpack", COMPRESSION_ERROR)


def test_a_peer_offering_a_huge_hpack_table_does_not_grow_our_encoder():
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.conn.update_settings({SettingsFrame.HEADER_TABLE_SIZE: 1 << 30})
    raw.send_pending()
    raw.conn.receive_data(server.data_to_send())
    for i in range(1, 200, 2):
        raw.conn.send_headers(i, GET, end_stream=True)
        raw.send_pending()
        server.send_response(i, OK + [(b"x-unique", str(i).encode() * 50)], end_stream=True)
        raw.conn.receive_data(server.data_to_send())
    assert 0 < server.hpack_encoder_table_size <= 4096


# ---- CONTINUATION flood ----

def test_a_continuation_flood_ends_the_connection_with_enhance_your_calm():
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    block = raw.conn.encoder.encode(request(extra=[(f"x-{i}".encode(), b"a" * 50) for i in range(10)]))
    pieces = [block[i:i + 8] for i in range(0, len(block), 8)]
    assert len(pieces) > 20
    from hyperframe.frame import HeadersFrame
    head = HeadersFrame(1)
    head.data = pieces[0]
    head.flags.add("END_STREAM")
    raw.send(head.serialize())
    for piece in pieces[1:20]:
        raw.send(raw.continuation_frame(1, piece))
    assert_closed_with(server, raw, "continuation_flood", ENHANCE_YOUR_CALM)
    by.finish()


def test_a_header_block_in_up_to_max_continuations_frames_is_accepted():
    server = H2Session(client=False, config=H2Config(max_continuations=8))
    raw = RawClient(server)
    block = raw.conn.encoder.encode(request(extra=[(b"x-a", b"a" * 40)]))
    size = -(-len(block) // 9)
    pieces = [block[i:i + size] for i in range(0, len(block), size)]
    assert len(pieces) == 9  # HEADERS + 8 CONTINUATION
    from hyperframe.frame import HeadersFrame
    head = HeadersFrame(1)
    head.data = pieces[0]
    head.flags.add("END_STREAM")
    raw.send(head.serialize())
    for piece in pieces[1:-1]:
        raw.send(raw.continuation_frame(1, piece))
    events = raw.send(raw.continuation_frame(1, pieces[-1], end_headers=True))
    [req] = of(events, RequestReceived)
    assert (b"x-a", b"a" * 40) in req.headers
    assert not misbehaved(raw.events)


# ---- rapid reset (CVE-2023-44487) ----

class StoppedClock:
    """A clock the test moves: the reset rules measure stream lifetimes and refill rates."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def open_and_reset(raw: RawClient, n: int, clock: StoppedClock | None = None, lifetime: float = 0.0):
    for _ in range(n):
        sid = raw.conn.get_next_available_stream_id()
        raw.conn.send_headers(sid, GET, end_stream=False)
        raw.send_pending()
        if clock is not None:
            clock.now += lifetime
        raw.conn.reset_stream(sid)
        raw.send_pending()
        if raw.server.closed or goaway_of(raw.server.data_to_send()) is not None:
            return sid


def test_rapid_reset_ends_the_connection_with_enhance_your_calm_after_500_streams():
    """Envoy's rule: after 500 streams, more than half of them reset within a second of
    opening is an attack."""
    by = Bystander()
    clock = StoppedClock()
    server = H2Session(client=False, clock=clock)
    raw = RawClient(server)
    events_before = len(raw.events)
    open_and_reset(raw, 499, clock)
    assert not misbehaved(raw.events) and not server.closed
    raw.conn.send_headers(raw.conn.get_next_available_stream_id(), GET, end_stream=False)
    raw.send_pending()
    raw.conn.reset_stream(999)
    raw.send_pending()
    assert len(of(raw.events[events_before:], StreamReset)) == 500
    assert_closed_with(server, raw, "rapid_reset", ENHANCE_YOUR_CALM)
    by.finish()


def test_cancellations_of_streams_that_lived_a_while_are_not_an_attack():
    """gRPC clients cancel long calls all the time; a reset after the stream's first second,
    at a sustainable rate, is not premature."""
    clock = StoppedClock()
    server = H2Session(client=False, clock=clock)
    raw = RawClient(server)
    open_and_reset(raw, 1500, clock, lifetime=1.5)
    assert not misbehaved(raw.events)
    assert not server.closed and goaway_of(server.data_to_send()) is None


def test_a_burst_of_resets_beyond_the_token_bucket_ends_the_connection():
    """Resets of streams that lived long enough for Envoy's rule, but more of them than the
    bucket allows: reset_burst at once, then reset_rate per second."""
    clock = StoppedClock()
    server = H2Session(client=False, clock=clock, config=H2Config(reset_burst=100, reset_rate=10))
    raw = RawClient(server)
    resets = 0
    while not server.closed and resets < 1000:
        sids = []
        for _ in range(50):
            sids.append(raw.conn.get_next_available_stream_id())
            raw.conn.send_headers(sids[-1], GET, end_stream=False)
            raw.send_pending()
        clock.now += 2.0  # 2 s old: not premature; refills 20 tokens
        for sid in sids:
            raw.conn.reset_stream(sid)
            raw.send_pending()
            resets += 1
            if misbehaved(raw.events):
                break
        server.data_to_send()
    # 100 at once, then 20 per 50 resets: the 4th round of 50 runs dry.
    assert 100 < resets < 200
    assert misbehaved(raw.events) == [("rapid_reset", 0, ENHANCE_YOUR_CALM)]
    assert server.closed


def test_stream_errors_the_peer_provokes_also_count_as_resets():
    """hyper's RUSTSEC-2024-0003: making the server reset malformed streams in a loop costs the
    peer as much as resetting them itself."""
    clock = StoppedClock()
    server = H2Session(client=False, clock=clock, config=H2Config(reset_burst=50, reset_rate=1))
    raw = RawClient(server)
    events = []
    for i in range(60):
        events += raw.send(raw.headers_frame(2 * i + 1, request(extra=[(b"connection", b"close")])))
        server.data_to_send()
        events += server.pop_events()
        if server.closed:
            break
    found = misbehaved(events)
    assert found[:50] == [("malformed_message", 2 * i + 1, PROTOCOL_ERROR) for i in range(50)]
    assert found[50:] == [("rapid_reset", 0, ENHANCE_YOUR_CALM)]
    assert server.closed


# ---- PING and SETTINGS floods ----

def test_a_ping_flood_from_a_peer_that_does_not_read_ends_with_enhance_your_calm():
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    for i in range(1001):
        raw.conn.ping(i.to_bytes(8, "big"))
        raw.send_pending()  # the server never gets to write: its ACKs pile up
    assert_closed_with(server, raw, "ping_flood", ENHANCE_YOUR_CALM)
    by.finish()


def test_many_pings_from_a_peer_that_reads_its_acks_are_all_answered():
    server = H2Session(client=False)
    raw = RawClient(server)
    acks = 0
    for i in range(3000):
        raw.conn.ping(i.to_bytes(8, "big"))
        raw.send_pending()
        acks += sum(1 for e in raw.conn.receive_data(server.data_to_send()) if e.__class__.__name__ == "PingAckReceived")
    assert acks == 3000 and not misbehaved(raw.events)


def test_a_settings_flood_ends_with_enhance_your_calm():
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    for _ in range(1001):
        f = SettingsFrame(0)
        f.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 65535}
        raw.send(f.serialize())
    assert_closed_with(server, raw, "settings_flood", ENHANCE_YOUR_CALM)
    by.finish()


def test_a_settings_frame_with_too_many_entries_ends_with_enhance_your_calm():
    server = H2Session(client=False)
    raw = RawClient(server)
    f = SettingsFrame(0)
    f.settings = {0x100 + i: 1 for i in range(33)}  # unknown ids, which must otherwise be ignored
    raw.send(f.serialize())
    assert_closed_with(server, raw, "too_many_settings", ENHANCE_YOUR_CALM)


# ---- flow control ----

def test_a_window_update_past_2_31_minus_1_on_a_stream_resets_it_with_flow_control_error():
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.conn.send_headers(1, GET, end_stream=False)
    raw.conn.send_headers(3, GET, end_stream=True)
    raw.send_pending()
    f = WindowUpdateFrame(1)
    f.window_increment = 2**31 - 1
    events = raw.send(f.serialize())
    out = server.data_to_send()
    assert resets_of(out) == {1: FLOW_CONTROL_ERROR}
    assert misbehaved(events + server.pop_events()) == [("flow_control", 1, FLOW_CONTROL_ERROR)]
    server.send_response(3, OK, end_stream=True)  # the connection's other stream is served
    assert [e.stream_id for e in raw.conn.receive_data(server.data_to_send())
            if e.__class__.__name__ == "ResponseReceived"] == [3]
    by.finish()


def test_a_window_update_past_2_31_minus_1_on_the_connection_ends_it_with_flow_control_error():
    server = H2Session(client=False)
    raw = RawClient(server)
    f = WindowUpdateFrame(0)
    f.window_increment = 2**31 - 1
    raw.send(f.serialize())
    assert_closed_with(server, raw, "flow_control", FLOW_CONTROL_ERROR)


def test_data_beyond_the_stream_window_resets_the_stream_with_flow_control_error():
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.conn.send_headers(1, GET, end_stream=False)
    raw.send_pending()
    for _ in range(3):
        raw.send(raw.data_frame(1, b"d" * 16384))
    events = raw.send(raw.data_frame(1, b"d" * 16384))  # 65,536 > 65,535
    assert sum(len(e.data) for e in of(raw.events, DataReceived)) == 3 * 16384
    assert resets_of(server.data_to_send()) == {1: FLOW_CONTROL_ERROR}
    assert misbehaved(events + server.pop_events()) == [("flow_control", 1, FLOW_CONTROL_ERROR)]
    by.finish()


def test_data_beyond_the_connection_window_ends_the_connection_with_flow_control_error():
    server = H2Session(client=False, config=H2Config(connection_window=65535, initial_stream_window=1 << 20))
    raw = RawClient(server)
    raw.conn.send_headers(1, GET, end_stream=False)
    raw.send_pending()
    for _ in range(4):
        raw.send(raw.data_frame(1, b"d" * 16384))
    assert_closed_with(server, raw, "flow_control", FLOW_CONTROL_ERROR)


# ---- stream states ----

def test_reusing_a_closed_stream_id_is_a_protocol_error():
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.conn.send_headers(1, GET, end_stream=True)
    raw.send_pending()
    server.send_response(1, OK, end_stream=True)
    raw.conn.receive_data(server.data_to_send())  # stream 1 is closed on both sides
    raw.send(raw.headers_frame(1))
    assert_closed_with(server, raw, "protocol_error", PROTOCOL_ERROR)
    by.finish()


def test_opening_a_stream_below_the_highest_id_is_a_protocol_error():
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.send(raw.headers_frame(7))
    raw.send(raw.headers_frame(5))
    assert_closed_with(server, raw, "protocol_error", PROTOCOL_ERROR)


def test_a_client_opening_an_even_stream_id_is_a_protocol_error():
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.send(raw.headers_frame(2))
    assert_closed_with(server, raw, "protocol_error", PROTOCOL_ERROR)


def test_data_after_end_stream_is_stream_closed():
    by = Bystander()
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.conn.send_headers(1, GET, end_stream=True)
    raw.send_pending()
    raw.send(raw.data_frame(1, b"late"))
    assert_closed_with(server, raw, "stream_closed", STREAM_CLOSED)
    by.finish()


def test_frames_for_a_stream_the_server_reset_are_ignored_not_punished():
    """RFC 9113 §5.1: the peer may have sent them before it saw our RST_STREAM."""
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.conn.send_headers(1, request(b"POST"), end_stream=False)
    raw.send_pending()
    server.reset(1)
    server.data_to_send()
    raw.send(raw.data_frame(1, b"in flight"))
    raw.send(raw.headers_frame(1, [(b"grpc-status", b"0")]))  # late trailers
    raw.send(raw.headers_frame(3))
    assert of(raw.events, RequestReceived)[-1].stream_id == 3
    assert not misbehaved(raw.events) and not server.closed


# ---- malformed messages (RFC 9113 §8.1.1: stream error PROTOCOL_ERROR) ----

@pytest.mark.parametrize("headers", [
    request(extra=[(b"connection", b"keep-alive")]),
    request(extra=[(b"X-Upper", b"1")]),
    request(extra=[(b"te", b"gzip")]),
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc.test")],  # no :path
    [(b"x-first", b"1")] + GET,  # a regular field before pseudo-fields
], ids=["connection-header", "uppercase-name", "te-not-trailers", "no-path", "pseudo-after-regular"])
def test_a_malformed_request_is_reset_with_protocol_error_and_others_go_on(headers):
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.send(raw.headers_frame(1, headers))
    raw.send(raw.headers_frame(3, GET))
    assert [e.stream_id for e in of(raw.events, RequestReceived)] == [3]
    assert resets_of(server.data_to_send()) == {1: PROTOCOL_ERROR}
    events = raw.events + server.pop_events()
    assert misbehaved(events) == [("malformed_message", 1, PROTOCOL_ERROR)]
    assert not of(events, StreamReset)  # the adapter never saw stream 1: nothing to end
    assert not server.closed


def test_a_connection_that_does_not_start_with_the_http2_preface_is_refused():
    server = H2Session(client=False)
    events = server.feed(b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n")
    assert goaway_of(server.data_to_send()).error_code == PROTOCOL_ERROR
    assert misbehaved(events + server.pop_events()) == [("bad_preface", 0, PROTOCOL_ERROR)]
    assert server.closed


# ---- a malicious server against the client session ----

def test_a_server_push_is_refused_by_the_client_as_a_protocol_error():
    import h2.config
    import h2.connection

    client = H2Session(client=True)
    origin = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    origin.initiate_connection()
    origin.receive_data(client.data_to_send())
    client.feed(origin.data_to_send())
    sid = client.send_request(GET)
    origin.receive_data(client.data_to_send())
    f = PushPromiseFrame(sid)
    f.promised_stream_id = 2
    f.data = origin.encoder.encode(GET)
    f.flags.add("END_HEADERS")
    events = client.feed(f.serialize())
    assert goaway_of(client.data_to_send()).error_code == PROTOCOL_ERROR
    assert [r for r, s, _ in misbehaved(events + client.pop_events()) if s == 0] == ["protocol_error"]


def test_a_response_header_section_too_large_is_reported_to_the_client_adapter():
    import h2.config
    import h2.connection

    client = H2Session(client=True)
    origin = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    origin.initiate_connection()
    origin.receive_data(client.data_to_send())
    client.feed(origin.data_to_send())
    origin.receive_data(client.data_to_send())
    sid = client.send_request(GET)
    origin.receive_data(client.data_to_send())
    # The h2 origin does not enforce our advisory SETTINGS_MAX_HEADER_LIST_SIZE and sends anyway.
    headers = [(b":status", b"200")] + [(f"x-{i}".encode(), b"v" * 1000) for i in range(20)]
    origin.send_headers(sid, headers, end_stream=True)
    events = client.feed(origin.data_to_send())
    assert of(events, HeaderListTooLarge) == [HeaderListTooLarge(sid, True, False)]
    assert not of(events, ResponseReceived)


# ---- whatever arrives, the codec answers with events, never an exception ----

_frame = st.tuples(
    st.integers(0, 10),                      # type (10: unknown, must be ignored)
    st.integers(0, 255),                     # flags
    st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]),
    st.binary(max_size=64),
)


def _wire(frames) -> bytes:
    return b"".join(len(p).to_bytes(3, "big") + bytes([t, f]) + sid.to_bytes(4, "big") + p
                    for t, f, sid, p in frames)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_frame, max_size=12), cut=st.integers(1, 64))
def test_any_frame_sequence_from_a_client_gets_events_or_a_refusal_never_an_exception(frames, cut):
    server = H2Session(client=False)
    raw = RawClient(server)
    raw.conn.send_headers(1, request(b"POST"), end_stream=False)
    raw.send_pending()
    wire = _wire(frames)
    events = []
    for i in range(0, len(wire), cut):  # delivered in arbitrary pieces
        events += server.feed(wire[i:i + cut])
        server.data_to_send()
        events += server.pop_events()
    assert all(type(e).__module__ == "proxy.http2.events" for e in events)
    assert all(e.reason in REASONS for e in of(events, PeerMisbehaved))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_frame, max_size=12))
def test_any_frame_sequence_from_a_server_gets_events_or_a_refusal_never_an_exception(frames):
    import h2.config
    import h2.connection

    client = H2Session(client=True)
    origin = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    origin.initiate_connection()
    origin.receive_data(client.data_to_send())
    client.feed(origin.data_to_send())
    client.send_request(request(b"POST"), end_stream=False)
    client.data_to_send()
    events = client.feed(_wire(frames))
    client.data_to_send()
    events += client.pop_events()
    assert all(e.reason in REASONS for e in of(events, PeerMisbehaved))


def test_without_the_librarys_continuation_limit_the_session_counts_them_itself(monkeypatch):
    """Before Debian's deb12u2 update libnghttp2 1.52 had no CONTINUATION limit; the session
    then counts the frames in its on_begin_frame callback (here with a limit below nghttp2's
    built-in 8, so that the count, not the library, must be what answers)."""
    from proxy.http2 import _ffi
    from hyperframe.frame import HeadersFrame

    monkeypatch.setattr(_ffi, "HAS_MAX_CONTINUATIONS", False)
    server = H2Session(client=False, config=H2Config(max_continuations=4))
    raw = RawClient(server)
    block = raw.conn.encoder.encode(request(extra=[(f"x-{i}".encode(), b"a" * 50) for i in range(10)]))
    head = HeadersFrame(1)
    head.data = block[:8]
    head.flags.add("END_STREAM")
    raw.send(head.serialize())
    for i in range(1, 5):
        raw.send(raw.continuation_frame(1, block[8 * i:8 * i + 8]))
    assert not misbehaved(raw.events)  # 4 CONTINUATION frames: allowed
    raw.send(raw.continuation_frame(1, block[40:48]))
    assert_closed_with(server, raw, "continuation_flood", ENHANCE_YOUR_CALM)
