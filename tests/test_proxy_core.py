"""The proxy's pure pieces, without I/O: detection, ClientHello parsing, the transport
header, authorities and service names, header rules, the balancer."""

import random
import socket
import ssl
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import detect, transport
from proxy.authority import mesh_service, split_authority
from proxy.balancer import Balancer
from proxy.http1 import headers as h
from tulle import pki

# --- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data,kind", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", detect.Kind.HTTP1),
    (b"POST /x HTTP/1.0\r\n", detect.Kind.HTTP1),
    (b"OPTIONS * HTTP/1.1\r\n", detect.Kind.HTTP1),
    (b"CONNECT a:443 HTTP/1.1\r\n", detect.Kind.HTTP1),
    (b"GET / HT", detect.Kind.NEED_MORE),
    (b"GE", detect.Kind.NEED_MORE),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", detect.Kind.H2),
    (b"PRI * HTTP/2.0\r\n", detect.Kind.NEED_MORE),
    (b"\x16\x03\x01\x02\x00\x01", detect.Kind.TLS),
    (b"\x16", detect.Kind.NEED_MORE),
    (b"GET key\r\n", detect.Kind.OPAQUE),  # a Redis inline command, not HTTP
    (b"\x00\x00\x00\x08\x04\xd2\x16/", detect.Kind.OPAQUE),  # Postgres SSLRequest
    (b"SSH-2.0-OpenSSH_9.2\r\n", detect.Kind.OPAQUE),
    (b"GET / HTTP/2.0\r\n", detect.Kind.OPAQUE),
    (b"PUT /x HTTP/1.1\r\n", detect.Kind.HTTP1),
])
def test_classify_first_bytes(data, kind):
    assert detect.classify(data) == kind


def test_an_over_long_request_line_is_still_http_so_the_server_refuses_it():
    assert detect.classify(b"GET /" + b"a" * detect.MAX_REQUEST_LINE) == detect.Kind.HTTP1


def _real_client_hello(sni: str | None, alpn: list[str] | None) -> bytes:
    """The bytes OpenSSL sends first as a TLS client, captured from a socket pair."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    a, b = socket.socketpair()

    def client():
        try:
            s = ctx.wrap_socket(a, server_hostname=sni, do_handshake_on_connect=False)
            s.settimeout(1)
            s.do_handshake()
        except (OSError, ssl.SSLError):
            pass

    t = threading.Thread(target=client)
    t.start()
    b.settimeout(5)
    data = b.recv(65536)
    b.close()
    t.join()
    a.close()
    return data


def test_client_hello_gives_sni_and_alpn_of_a_real_handshake():
    ident = "web.demo.serviceaccount.identity.tulle.cluster.local"
    data = _real_client_hello(ident, [pki.ALPN_PROXY])
    assert detect.classify(data) == detect.Kind.TLS
    hello = detect.client_hello(data)
    assert hello.complete and hello.valid
    assert hello.sni == ident
    assert hello.alpn == [pki.ALPN_PROXY]


def test_client_hello_without_sni_has_none():
    hello = detect.client_hello(_real_client_hello(None, None))
    assert hello.complete and hello.valid and hello.sni is None and hello.alpn == []


def test_a_truncated_client_hello_needs_more_bytes():
    data = _real_client_hello("example.com", None)
    for cut in (1, 5, 10, len(data) // 2, len(data) - 1):
        assert not detect.client_hello(data[:cut]).complete


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_detection_never_crashes_on_garbage(data):
    detect.classify(data)
    hello = detect.client_hello(data)
    assert isinstance(hello.complete, bool)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_client_hello_parsing_survives_mutations(data):
    base = bytearray(_HELLO)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    detect.client_hello(bytes(base))  # never raises


_HELLO = _real_client_hello("a.b.serviceaccount.identity.tulle.cluster.local", [pki.ALPN_PROXY])

# --- transport header ----------------------------------------------------------------------


def test_transport_header_round_trips():
    raw = transport.encode(8080, transport.HTTP1)
    assert raw == b"TLT1\x1f\x90\x01\x00" and len(raw) == transport.SIZE
    assert transport.decode(raw + b"GET / ...") == (8080, transport.HTTP1)


@pytest.mark.parametrize("raw", [b"TLT1\x1f", b"TLT2\x1f\x90\x01\x00", b"TLT1\x00\x00\x01\x00", b"TLT1\x1f\x90\x07\x00"])
def test_bad_transport_headers_are_refused(raw):
    with pytest.raises(transport.TransportHeaderError):
        transport.decode(raw)


# --- authorities and names ---------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    (b"web", ("web", 80)),
    (b"Web.Demo:8080", ("web.demo", 8080)),
    (b"web.demo.svc.cluster.local.:80", ("web.demo.svc.cluster.local", 80)),
    (b"[::1]:9000", ("::1", 9000)),
    (b"10.96.0.1", ("10.96.0.1", 80)),
    (b"user@web:81", ("web", 81)),
    (b"web:0", None), (b"web:99999", None), (b"web:x", None), (b"we b", None), (b"", None), (b"[zz]:1", None),
])
def test_split_authority(raw, expected):
    assert split_authority(raw) == expected


@pytest.mark.parametrize("host,expected", [
    ("web", ("mine", "web")),
    ("web.demo", ("demo", "web")),
    ("web.demo.svc", ("demo", "web")),
    ("web.demo.svc.cluster.local", ("demo", "web")),
    ("web.demo.svc.other.domain", None),
    ("www.example.com", None),
    ("10.1.2.3", None),
    ("web_x", None),
])
def test_mesh_service_names(host, expected):
    assert mesh_service(host, "mine") == expected


# --- header rules ----------------------------------------------------------------------------


def hdrs(*pairs):
    return [(a.encode(), b.encode()) for a, b in pairs]


def test_hop_by_hop_and_connection_named_headers_are_removed():
    fwd, host, framing, length, upgrade, close = h.request_head(hdrs(
        ("Host", "a"), ("Connection", "keep-alive, x-foo"), ("Keep-Alive", "5"), ("X-Foo", "1"), ("Proxy-Connection", "x"),
        ("TE", "trailers"), ("Trailer", "x"), ("X-Bar", "2")), "1.1")
    assert [n for n, _ in fwd] == [b"Host", b"X-Bar"]
    assert host == b"a" and framing == h.NO_BODY and upgrade is None and not close


@pytest.mark.parametrize("pairs,reason", [
    ((("Transfer-Encoding", "gzip, chunked"),), "unsupported transfer-encoding"),
    ((("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")), "unsupported transfer-encoding"),
    ((("Transfer-Encoding", "chunked"), ("Content-Length", "3")), "content-length with transfer-encoding"),
    ((("Content-Length", "3"), ("Transfer-Encoding", "chunked")), "content-length with transfer-encoding"),
    ((("Content-Length", "+3"),), "invalid content-length"),
    ((("Host", "a"), ("Host", "b")), "more than one host header"),
])
def test_framing_a_proxy_must_refuse(pairs, reason):
    with pytest.raises(h.HeadError) as e:
        h.request_head(hdrs(*pairs), "1.1")
    assert e.value.status == 400 and e.value.reason == reason


def test_transfer_encoding_on_http10_is_refused():
    with pytest.raises(h.HeadError):
        h.request_head(hdrs(("Transfer-Encoding", "chunked")), "1.0")


def test_an_upgrade_needs_connection_upgrade():
    assert h.request_head(hdrs(("Upgrade", "websocket")), "1.1")[4] is None
    assert h.request_head(hdrs(("Connection", "Upgrade"), ("Upgrade", "websocket")), "1.1")[4] == b"websocket"


def test_chunked_response_drops_its_content_length():
    fwd, framing, *_ = h.response_head(hdrs(("Content-Length", "5"), ("Transfer-Encoding", "chunked"), ("X", "y")))
    assert framing == h.CHUNKED and [n for n, _ in fwd] == [b"X"]


def test_error_responses_carry_the_reason_and_no_body():
    raw = h.error_response(503, "no endpoints for a/b:80\r\nx: y")
    assert raw.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"content-length: 0\r\n" in raw and b"tulle-proxy-error: no endpoints for a/b:80  x: y\r\n" in raw


# --- balancer -----------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_p2c_prefers_the_faster_endpoint():
    clock = Clock()
    b = Balancer(clock=clock, rng=random.Random(1))
    b.update(["fast", "slow"])
    fast, slow = b.states
    for _ in range(20):
        clock.t += 0.1
        fast.observe(0.001, clock.t)
        slow.observe(0.200, clock.t)
    picks = [b.pick().endpoint for _ in range(1000)]
    assert picks.count("fast") == 1000  # with two endpoints p2c always compares both


def test_outstanding_requests_raise_the_cost():
    clock = Clock()
    b = Balancer(clock=clock, rng=random.Random(2))
    b.update(["a", "b"])
    a, _ = b.states
    for _ in range(3):
        b.start(a)
    assert all(b.pick().endpoint == "b" for _ in range(50))


def test_peak_ewma_jumps_up_at_once_and_decays_slowly():
    clock = Clock()
    b = Balancer(clock=clock)
    b.update(["a"])
    st_a = b.states[0]
    st_a.observe(0.5, 1.0)
    assert st_a.ewma == 0.5
    st_a.observe(0.001, 2.0)  # one second later: decays by exp(-1/10)
    assert 0.44 < st_a.ewma < 0.46


def test_endpoints_that_stay_keep_their_figures_across_updates():
    clock = Clock()
    b = Balancer(clock=clock)
    b.update(["a", "b"])
    b.states[0].observe(0.9, 0.0)
    removed = b.update(["a", "c"])
    assert [s.endpoint for s in removed] == ["b"]
    assert {s.endpoint: s.ewma for s in b.states}["a"] == 0.9


def test_no_endpoints_picks_nothing():
    b = Balancer(clock=Clock())
    assert b.pick() is None


def test_p2c_spreads_load_over_equal_endpoints():
    b = Balancer(clock=Clock(), rng=random.Random(3))
    b.update(list("abcd"))
    counts = {}
    for _ in range(4000):
        e = b.pick().endpoint
        counts[e] = counts.get(e, 0) + 1
    assert min(counts.values()) > 800
