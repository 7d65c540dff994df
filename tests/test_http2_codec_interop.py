"""The codec against other HTTP/2 implementations: the pure-Python h2 library on the other end
of each session (in memory), and real grpcio client and server over real sockets through a
relay made of the codec's two sessions (tests/http2_relay.py)."""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from proxy.http2 import (
    DataReceived,
    H2Config,
    H2Session,
    RequestReceived,
    ResponseReceived,
    StreamClosed,
    StreamReset,
    TrailersReceived,
)
from tests.http2_relay import H2Relay
from tests.http2_support import GET, OK, of, request


def h2_peer(client_side: bool) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding=None))
    conn.initiate_connection()
    return conn


def exchange(ours: H2Session, theirs: h2.connection.H2Connection, on_theirs=None) -> tuple[list, list]:
    """Move bytes both ways until quiet; the h2 side acknowledges the DATA it receives and may
    react to its events through on_theirs(events)."""
    mine, others = [], []
    for _ in range(10000):
        a = ours.data_to_send()
        mine += ours.pop_events()
        if a:
            got = theirs.receive_data(a)
            for e in got:
                if isinstance(e, h2.events.DataReceived) and e.flow_controlled_length:
                    theirs.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            others += got
            if on_theirs:
                on_theirs(got)
        b = theirs.data_to_send()
        if b:
            mine += ours.feed(b)
        if not a and not b:
            return mine, others
    raise AssertionError("no quiet after 10000 rounds")


# ---- h2 client -> our server ----

def test_an_h2_client_gets_a_get_a_post_with_trailers_and_a_large_body_from_our_server():
    server = H2Session(client=False)
    client = h2_peer(client_side=True)
    exchange(server, client)
    client.send_headers(1, GET, end_stream=True)
    client.send_headers(3, request(b"POST", extra=[(b"te", b"trailers")]))
    client.send_data(3, b"ping")
    client.send_headers(3, [(b"x-request-trailer", b"yes")], end_stream=True)
    mine, _ = exchange(server, client)
    assert [e.stream_id for e in of(mine, RequestReceived)] == [1, 3]
    assert of(mine, DataReceived, 3)[0].data == b"ping"
    assert of(mine, TrailersReceived, 3)[0].headers == [(b"x-request-trailer", b"yes")]
    server.consume(3, 4)
    big = os.urandom(300_000)  # beyond the h2 client's 65,535-byte windows
    server.send_response(1, OK)
    server.send_data(1, big, end_stream=True)
    server.send_response(3, OK)
    server.send_data(3, b"pong")
    server.send_trailers(3, [(b"grpc-status", b"0")])
    mine, theirs = exchange(server, client)
    body = b"".join(e.data for e in theirs if isinstance(e, h2.events.DataReceived) and e.stream_id == 1)
    assert hashlib.sha256(body).digest() == hashlib.sha256(big).digest()
    [trailers] = [e for e in theirs if isinstance(e, h2.events.TrailersReceived)]
    assert trailers.headers == [(b"grpc-status", b"0")]
    assert {e.stream_id for e in of(mine, StreamClosed)} == {1, 3}


def test_fifty_concurrent_h2_client_streams_are_answered_each_with_its_own_body():
    server = H2Session(client=False)
    client = h2_peer(client_side=True)
    exchange(server, client)
    for i in range(50):
        client.send_headers(2 * i + 1, request(path=f"/{i}".encode()), end_stream=True)
    mine, _ = exchange(server, client)
    for e in of(mine, RequestReceived):
        path = dict(e.headers)[b":path"]
        server.send_response(e.stream_id, OK)
        server.send_data(e.stream_id, path * 1000, end_stream=True)
    _, theirs = exchange(server, client)
    bodies: dict[int, bytes] = {}
    for e in theirs:
        if isinstance(e, h2.events.DataReceived):
            bodies[e.stream_id] = bodies.get(e.stream_id, b"") + e.data
    assert bodies == {2 * i + 1: f"/{i}".encode() * 1000 for i in range(50)}


def test_an_h2_client_reset_reaches_our_server():
    server = H2Session(client=False)
    client = h2_peer(client_side=True)
    exchange(server, client)
    client.send_headers(1, request(b"POST"))
    exchange(server, client)
    client.reset_stream(1, error_code=8)
    mine, _ = exchange(server, client)
    assert of(mine, StreamReset) == [StreamReset(1, 8, True)]


# ---- our client -> h2 server ----

def test_our_client_gets_a_streamed_body_and_trailers_from_an_h2_server_paced_by_consume():
    """The h2 server may send only what our windows allow; it gets more only as we consume."""
    client = H2Session(client=True)
    server = h2_peer(client_side=False)
    exchange(client, server)
    sid = client.send_request(request(b"POST", extra=[(b"te", b"trailers")]), end_stream=False)
    client.send_data(sid, b"q" * 100_000, end_stream=True)  # beyond h2's default window
    body = os.urandom(500_000)
    unsent = [body]
    answered = []

    def serve(events):
        """The h2 server's loop: answer when the request ended, then send what its flow-control
        window allows, then trailers."""
        for e in events:
            if isinstance(e, h2.events.StreamEnded):
                server.send_headers(e.stream_id, OK)
                answered.append(e.stream_id)
        if not answered or unsent[0] is None:
            return
        while unsent[0]:
            window = min(server.local_flow_control_window(sid), server.max_outbound_frame_size)
            if window <= 0:
                return
            server.send_data(sid, unsent[0][:window])
            unsent[0] = unsent[0][window:]
        server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        unsent[0] = None

    mine, theirs = exchange(client, server, serve)
    assert sum(len(e.data) for e in theirs if isinstance(e, h2.events.DataReceived)) == 100_000
    received = b""
    rounds = 0
    while not of(mine, TrailersReceived, sid):
        for e in of(mine, DataReceived, sid):
            received += e.data
            client.consume(sid, len(e.data))
        assert client.unconsumed(sid) == 0
        rounds += 1
        mine, _ = exchange(client, server, serve)
    received += b"".join(e.data for e in of(mine, DataReceived, sid))
    assert received == body
    assert rounds >= 5  # 500 KB through 65,535-byte stream windows
    assert of(mine, TrailersReceived, sid)[0].headers == [(b"grpc-status", b"0")]


def test_our_client_sees_an_h2_server_reset():
    client = H2Session(client=True)
    server = h2_peer(client_side=False)
    exchange(client, server)
    sid = client.send_request(GET)
    exchange(client, server)
    server.reset_stream(sid, error_code=2)
    mine, _ = exchange(client, server)
    assert of(mine, StreamReset) == [StreamReset(sid, 2, True)]


def test_our_client_keeps_within_the_h2_servers_stream_limit():
    client = H2Session(client=True)
    server = h2_peer(client_side=False)
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 5})
    exchange(client, server)
    assert client.remote_max_concurrent_streams == 5
    sids = [client.send_request(GET) for _ in range(12)]
    answered = []

    def serve(events):
        for e in events:
            if isinstance(e, h2.events.RequestReceived):
                assert server.open_inbound_streams <= 5  # h2 would have raised already
                server.send_headers(e.stream_id, OK, end_stream=True)
                answered.append(e.stream_id)

    mine, _ = exchange(client, server, serve)
    assert sorted(answered) == sids
    assert not of(mine, StreamReset)
    assert {e.stream_id for e in of(mine, ResponseReceived)} == set(sids)


# ---- grpcio client -> relay (our server session + our client session) -> grpcio server ----

def _echo(request: bytes, context) -> bytes:
    context.set_trailing_metadata((("x-echo-trailer", "t"),))
    metadata = dict(context.invocation_metadata())
    return request + b"|" + metadata.get("x-tag", "").encode()


def _fail(request: bytes, context):
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "no entry for " + request.decode())


def _split(request: bytes, context):
    for part in request.split(b","):
        yield part


def _join(requests, context) -> bytes:
    return b",".join(requests)


def _chat(requests, context):
    for r in requests:
        yield r.upper()


RELAY_QUEUE = 4096


@pytest.fixture(scope="module")
def grpc_through_relay(lt):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 8 << 20),
                                  ("grpc.max_send_message_length", 8 << 20)])
    ident = dict(request_deserializer=None, response_serializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(_echo, **ident),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail, **ident),
        "Split": grpc.unary_stream_rpc_method_handler(_split, **ident),
        "Join": grpc.stream_unary_rpc_method_handler(_join, **ident),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat, **ident),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # Small per-stream send queues, so that large messages make the relay hold peers back.
    relay = H2Relay(("127.0.0.1", port), H2Config(max_send_buffer=RELAY_QUEUE))
    relay_port = lt.call(relay.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{relay_port}",
                                    options=[("grpc.max_receive_message_length", 8 << 20),
                                             ("grpc.max_send_message_length", 8 << 20)])
    yield channel, relay
    channel.close()
    lt.call(relay.stop())
    server.stop(0)


def test_grpc_unary_call_with_metadata_and_trailers_crosses_the_relay(grpc_through_relay):
    channel, _ = grpc_through_relay
    call = channel.unary_unary("/test.Echo/Unary")
    response, info = call.with_call(b"hello", metadata=(("x-tag", "m1"),), timeout=10)
    assert response == b"hello|m1"
    assert info.code() == grpc.StatusCode.OK
    assert ("x-echo-trailer", "t") in info.trailing_metadata()


def test_grpc_error_status_and_message_cross_the_relay(grpc_through_relay):
    channel, _ = grpc_through_relay
    with pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/test.Echo/Fail")(b"books", timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "no entry for books"


def test_grpc_server_client_and_bidirectional_streaming_cross_the_relay(grpc_through_relay):
    channel, _ = grpc_through_relay
    assert list(channel.unary_stream("/test.Echo/Split")(b"a,b,c", timeout=10)) == [b"a", b"b", b"c"]
    assert channel.stream_unary("/test.Echo/Join")(iter([b"x", b"y", b"z"]), timeout=10) == b"x,y,z"
    assert list(channel.stream_stream("/test.Echo/Chat")(iter([b"one", b"two"]), timeout=10)) == [b"ONE", b"TWO"]


def test_grpc_messages_of_4_mib_cross_with_the_relay_holding_only_bounded_buffers(grpc_through_relay):
    channel, relay = grpc_through_relay
    message = os.urandom(4 << 20)
    response = channel.unary_unary("/test.Echo/Unary")(message, timeout=30)
    assert hashlib.sha256(response).digest() == hashlib.sha256(message + b"|").digest()
    sides = [side for conn in relay.connections for side in (conn.down, conn.up)]
    # Both directions filled a queue and held their peer back (no consume) until it drained...
    assert all(side.held_back > 0 for side in sides)
    # ...so no queue ever held more than its limit plus the one stream window the sender had
    # been granted (65,535 bytes), where 4 MiB would have piled up without backpressure.
    assert max(side.max_buffered for side in sides) <= RELAY_QUEUE + 65535


def test_concurrent_grpc_calls_share_one_relayed_connection(grpc_through_relay):
    channel, relay = grpc_through_relay
    before = len(relay.connections)
    call = channel.unary_unary("/test.Echo/Unary")
    results = []
    lock = threading.Lock()

    def one(i):
        r = call(f"n{i}".encode(), metadata=(("x-tag", str(i)),), timeout=10)
        with lock:
            results.append(r)

    with futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(one, range(64)))
    assert sorted(results) == sorted(f"n{i}|{i}".encode() for i in range(64))
    assert len(relay.connections) == max(before, 1)
