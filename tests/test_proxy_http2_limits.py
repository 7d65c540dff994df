"""HTTP/2 limits and attacks against a real proxy, from a raw client on a real socket (the h2
library for the handshake and HPACK, frames crafted by hand), at its inbound port (h2c from
outside the mesh) and its outbound port (h2c from an app). Each is refused as RFC 9113 says
(GOAWAY or RST_STREAM with the prescribed code, or 431), counted by reason in
`http2_errors_total{direction, peer="src"}`, and a well-behaved connection with a request in
flight meanwhile gets its whole answer.

(The codec's own limits, frame by frame without sockets: tests/test_http2_codec_limits.py.)
"""

from __future__ import annotations

import pytest
from hyperframe.frame import GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame, WindowUpdateFrame

from proxy.http2.session import (
    COMPRESSION_ERROR, ENHANCE_YOUR_CALM, FLOW_CONTROL_ERROR, PROTOCOL_ERROR, STREAM_CLOSED,
)
from tests.conftest import wait_until
from tests.h2_peers import H2App, InFlight, RawH2, echo_answer
from tests.proxy_support import Mesh, Proxy, proxy_config, unique_ns

TARGETS = ("inbound", "outbound")


@pytest.fixture(scope="module")
def app():
    a = H2App(answer=echo_answer())
    yield a
    a.close()


@pytest.fixture(scope="module")
def proxy(lt, nats_server, app):
    ns = unique_ns()
    p = Proxy(lt, proxy_config(nats_server.url, ns, "srv", "srv", app_default_port=app.port), Mesh().identity("srv", ns))
    yield p
    p.stop()


class Target:
    """One of the proxy's ports as an HTTP/2 client reaches it."""

    def __init__(self, proxy: Proxy, app: H2App, which: str):
        self.proxy = proxy
        self.which = which
        self.port = proxy.inbound if which == "inbound" else proxy.outbound
        # Outbound: an app's request to a server outside the mesh, forwarded as h2c.
        self.authority = b"app" if which == "inbound" else b"127.0.0.1:%d" % app.port

    def request(self, path: bytes = b"/", method: bytes = b"GET", extra=()) -> list:
        return [(b":method", method), (b":scheme", b"http"), (b":authority", self.authority), (b":path", path),
                *extra]

    def errors(self, reason: str) -> float:
        return self.proxy.metric("http2_errors_total", direction=self.which, peer="src", reason=reason)

    def raw(self, **kw) -> RawH2:
        return RawH2(self.port, **kw)

    def bystander(self) -> InFlight:
        return InFlight(self.port, self.authority)


@pytest.fixture(params=TARGETS)
def target(request, proxy, app):
    return Target(proxy, app, request.param)


def closed_with(raw: RawH2, code: int) -> None:
    goaway = raw.goaway()
    assert goaway.error_code == code, goaway
    raw.until(lambda f: False, fail=False)  # then the proxy closes the connection
    assert raw.closed


# --- streams ----------------------------------------------------------------------------------------


def test_a_101st_concurrent_stream_after_the_limit_was_acknowledged_ends_the_connection(target):
    by = target.bystander()
    before = target.errors("max_concurrent_streams")
    raw = target.raw()
    frames = b"".join(raw.headers_frame(2 * i + 1, target.request(b"/open", b"POST"), end_stream=False)
                      for i in range(100))
    raw.send(frames)
    raw.send(raw.headers_frame(201, target.request(b"/one-too-many", b"POST"), end_stream=False))
    closed_with(raw, PROTOCOL_ERROR)
    wait_until(lambda: target.errors("max_concurrent_streams") == before + 1, what="the refusal counted")
    by.finish()


def test_a_header_section_over_16_kib_is_answered_431_and_the_connection_goes_on(target):
    by = target.bystander()
    before = target.errors("header_list_too_large")
    raw = target.raw()
    raw.send(raw.headers_frame(1, target.request(extra=[(b"x-big", b"b" * 17000)])))
    assert raw.status(1) == 431
    raw.send(raw.headers_frame(3, target.request(b"/next")))
    assert raw.status(3) == 200
    assert target.errors("header_list_too_large") == before + 1
    by.finish()


def test_a_continuation_flood_ends_the_connection_with_enhance_your_calm(target):
    by = target.bystander()
    before = target.errors("continuation_flood")
    raw = target.raw()
    block = raw.conn.encoder.encode(target.request(extra=[(b"x-%d" % i, b"a" * 50) for i in range(10)]))
    pieces = [block[i:i + 8] for i in range(0, len(block), 8)]
    raw.send(raw.headers_frame(1, [], end_headers=False, block=pieces[0]))
    raw.send(b"".join(raw.continuation_frame(1, p) for p in pieces[1:20]))
    closed_with(raw, ENHANCE_YOUR_CALM)
    assert target.errors("continuation_flood") == before + 1
    by.finish()


def test_rapid_reset_ends_the_connection_with_enhance_your_calm(target):
    """CVE-2023-44487: streams opened and reset at once, by the hundred."""
    by = target.bystander()
    before = target.errors("rapid_reset")
    raw = target.raw()
    for batch in range(12):
        frames = b""
        for i in range(50):
            sid = 2 * (batch * 50 + i) + 1
            frames += raw.headers_frame(sid, target.request(b"/cancelled"), end_stream=False) + raw.rst_frame(sid)
        if not raw.send(frames):
            break
    closed_with(raw, ENHANCE_YOUR_CALM)
    assert target.errors("rapid_reset") == before + 1
    by.finish()


def test_reusing_a_closed_stream_id_ends_the_connection_with_protocol_error(target):
    by = target.bystander()
    before = target.errors("protocol_error")
    raw = target.raw()
    raw.send(raw.headers_frame(1, target.request()))
    assert raw.status(1) == 200
    raw.until(lambda f: f.stream_id == 1 and "END_STREAM" in f.flags)  # stream 1 closed both ways
    raw.send(raw.headers_frame(1, target.request(b"/again")))
    closed_with(raw, PROTOCOL_ERROR)
    assert target.errors("protocol_error") == before + 1
    by.finish()


def test_data_after_end_stream_ends_the_connection_with_stream_closed(target):
    by = target.bystander()
    before = target.errors("stream_closed")
    raw = target.raw()
    raw.send(raw.headers_frame(1, target.request()) + raw.data_frame(1, b"late"))
    closed_with(raw, STREAM_CLOSED)
    assert target.errors("stream_closed") == before + 1
    by.finish()


# --- HPACK, flow control --------------------------------------------------------------------------------


def test_an_hpack_table_larger_than_advertised_ends_the_connection_with_compression_error(target):
    by = target.bystander()
    before = target.errors("hpack")
    raw = target.raw()
    raw.conn.encoder.header_table_size = 1 << 20  # the proxy advertised 4096
    raw.send(raw.headers_frame(1, target.request()))
    closed_with(raw, COMPRESSION_ERROR)
    assert target.errors("hpack") == before + 1
    by.finish()


def test_a_window_pushed_past_2_31_minus_1_ends_the_connection_with_flow_control_error(target):
    by = target.bystander()
    before = target.errors("flow_control")
    raw = target.raw()
    f = WindowUpdateFrame(0)
    f.window_increment = 2**31 - 1
    raw.send(f.serialize())
    closed_with(raw, FLOW_CONTROL_ERROR)
    assert target.errors("flow_control") == before + 1
    by.finish()


def test_data_beyond_the_stream_window_resets_that_stream_only(target):
    by = target.bystander()
    before = target.errors("flow_control")
    raw = target.raw()
    raw.send(raw.headers_frame(1, target.request(b"/echo", b"POST"), end_stream=False))
    raw.send(b"".join(raw.data_frame(1, b"d" * 16384) for _ in range(5)))  # 81,920 > 65,535
    assert raw.reset(1).error_code == FLOW_CONTROL_ERROR
    raw.send(raw.headers_frame(3, target.request(b"/next")))
    assert raw.status(3) == 200  # the connection's other streams go on
    assert target.errors("flow_control") == before + 1
    by.finish()


# --- floods from a client that does not read ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_a_flood_from_a_client_that_reads_nothing_ends_with_enhance_your_calm(target, kind):
    """Each PING or SETTINGS asks for an ACK; the client never reads them. Once the socket is
    full the proxy stops writing, nghttp2 holds at most 1000 unsent ACKs, then says
    ENHANCE_YOUR_CALM — memory stays bounded."""
    by = target.bystander()
    reason = f"{kind}_flood"
    before = target.errors(reason)
    raw = target.raw(rcvbuf=4096)
    if kind == "ping":
        f = PingFrame(0)
        f.opaque_data = b"12345678"
    else:
        f = SettingsFrame(0)
        f.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 65535}
    batch = f.serialize() * 1000
    for _ in range(400):  # up to 400,000 frames; the proxy gives up long before
        if not raw.send(batch) or target.errors(reason) > before:
            break
    wait_until(lambda: target.errors(reason) == before + 1, what=f"the {kind} flood counted")
    # The GOAWAY goes behind the ACKs already in the socket, and the proxy does not wait for a
    # client that reads nothing: it closes (and soon aborts) the connection.
    goaway = raw.until(lambda x: isinstance(x, GoAwayFrame), fail=False)
    assert goaway is None or goaway.error_code == ENHANCE_YOUR_CALM, goaway
    raw.until(lambda f: False, fail=False)
    assert raw.closed
    by.finish()
