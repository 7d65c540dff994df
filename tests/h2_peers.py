"""Real HTTP/2 peers for the proxy tests, on real sockets, built on the h2 library (the
pure-Python one; speed does not matter here): an h2c app server that records what reaches
it, and a raw client that speaks prior-knowledge h2c or h2 inside TLS — the way an attacker
or a plain HTTP/2 client would reach a proxy.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from tests import http2_support as frames
from tests.proxy_support import RawServer

Headers = list[tuple[bytes, bytes]]


@dataclass
class H2Seen:
    headers: Headers
    body: bytes = b""
    trailers: Headers = field(default_factory=list)

    def header(self, name: bytes) -> Optional[bytes]:
        return next((v for k, v in self.headers if k == name), None)

    def names(self) -> list[bytes]:
        return [k for k, _ in self.headers]


class H2App:
    """An h2c server. `answer(seen) -> (headers, body, trailers)` decides each response; the
    default answers 200 with the app's name and, when the request was gRPC, grpc-status 0."""

    def __init__(self, name: str = "h2app", answer: Callable[[H2Seen], tuple] | None = None):
        self.name = name
        self.seen: list[H2Seen] = []
        self.connections = 0
        self.answer = answer or self._default
        self.lock = threading.Lock()
        self.server = RawServer(self._serve)
        self.port = self.server.port

    def _default(self, seen: H2Seen):
        grpc = (seen.header(b"content-type") or b"").startswith(b"application/grpc")
        headers = [(b":status", b"200"), (b"x-served-by", self.name.encode())]
        if grpc:
            return headers + [(b"content-type", b"application/grpc")], seen.body, [(b"grpc-status", b"0")]
        return headers, self.name.encode(), []

    def _serve(self, sock: socket.socket) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        pending: dict[int, H2Seen] = {}
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                sock.sendall(conn.data_to_send())
                return
            for e in events:
                if isinstance(e, h2.events.RequestReceived):
                    pending[e.stream_id] = H2Seen(list(e.headers))
                    if e.stream_ended:
                        self._respond(conn, e.stream_id, pending.pop(e.stream_id))
                elif isinstance(e, h2.events.DataReceived):
                    pending[e.stream_id].body += e.data
                    conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    if e.stream_ended:
                        self._respond(conn, e.stream_id, pending.pop(e.stream_id))
                elif isinstance(e, h2.events.TrailersReceived):
                    seen = pending.pop(e.stream_id)
                    seen.trailers = list(e.headers)
                    self._respond(conn, e.stream_id, seen)
            sock.sendall(conn.data_to_send())

    def _respond(self, conn, stream_id: int, seen: H2Seen) -> None:
        with self.lock:
            self.seen.append(seen)
        headers, body, trailers = self.answer(seen)
        try:
            self._send(conn, stream_id, headers, body, trailers)
        except h2.exceptions.StreamClosedError:
            pass  # the proxy reset it meanwhile (its caller went away)

    @staticmethod
    def _send(conn, stream_id: int, headers, body: bytes, trailers) -> None:
        conn.send_headers(stream_id, headers, end_stream=not body and not trailers)
        if body:  # bodies of tests stay within the proxy's 64 KiB stream window
            send_body(conn, stream_id, body, end_stream=not trailers)
        if trailers:
            conn.send_headers(stream_id, trailers, end_stream=True)

    def close(self) -> None:
        self.server.close()


@dataclass
class H2Response:
    status: int
    headers: Headers
    body: bytes
    trailers: Headers
    reset: Optional[int] = None  # the RST_STREAM error code, when the stream was reset

    def header(self, name: bytes) -> Optional[bytes]:
        return next((v for k, v in self.headers if k == name), None)


class H2Client:
    """Prior-knowledge h2c (or h2 over `tls`) to a proxy port, on one connection."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, first: bytes = b"", timeout: float = 10.0):
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname)
        self.sock = sock
        if first:
            sock.sendall(first)  # e.g. a transport header before the preface
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.flush()
        self.events: list = []
        self.goaway: Optional[h2.events.ConnectionTerminated] = None

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: bytes = b"/", *, method: bytes = b"GET", authority: bytes = b"app", extra: Headers = (),
                body: bytes = b"", trailers: Headers = ()) -> H2Response:
        sid = self.conn.get_next_available_stream_id()
        headers = [(b":method", method), (b":scheme", b"http"), (b":authority", authority), (b":path", path),
                   *extra]
        self.conn.send_headers(sid, headers, end_stream=not body and not trailers)
        if body:
            send_body(self.conn, sid, body, end_stream=not trailers)
        if trailers:
            self.conn.send_headers(sid, list(trailers), end_stream=True)
        self.flush()
        return self.response(sid)

    def response(self, sid: int) -> H2Response:
        resp = H2Response(0, [], b"", [])
        while True:
            for e in self._events():
                if getattr(e, "stream_id", None) != sid:
                    continue
                if isinstance(e, h2.events.ResponseReceived):
                    resp.headers = list(e.headers)
                    resp.status = int(dict(e.headers)[b":status"])
                elif isinstance(e, h2.events.DataReceived):
                    resp.body += e.data
                    self.conn.acknowledge_received_data(e.flow_controlled_length, sid)
                elif isinstance(e, h2.events.TrailersReceived):
                    resp.trailers = list(e.headers)
                elif isinstance(e, h2.events.StreamReset):
                    resp.reset = e.error_code
                    return resp
                if isinstance(e, (h2.events.StreamEnded,)) or getattr(e, "stream_ended", None):
                    return resp
            self.flush()

    def _events(self) -> list:
        pending, self.events = self.events, []
        if pending:
            return pending
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        events = self.conn.receive_data(data)
        for e in events:
            if isinstance(e, h2.events.ConnectionTerminated):
                self.goaway = e
        return events

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def send_body(conn, sid: int, body: bytes, end_stream: bool = False) -> None:
    """DATA frames of at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE)."""
    for i in range(0, len(body), 16384):
        conn.send_data(sid, body[i:i + 16384], end_stream=end_stream and i + 16384 >= len(body))


SPOOFED_ID = [(b"tulle-client-id", b"admin.kube-system.serviceaccount.identity.tulle.cluster.local"),
              (b"tulle_client_id", b"admin"), (b"tulle.client.id", b"admin")]


def client_id_fields(seen: H2Seen) -> list[bytes]:
    """Every value of any spelling an app server folds into tulle-client-id."""
    return [v for k, v in seen.headers if k.replace(b"_", b"-").replace(b".", b"-") == b"tulle-client-id"]


class RawH2:
    """An attacker's HTTP/2 client on a real socket: the h2 library does the handshake and
    HPACK, frames are also crafted by hand (hyperframe); what comes back is read as frames."""

    def __init__(self, port: int, *, ack_settings: bool = True, rcvbuf: int | None = None, timeout: float = 10.0):
        import hpack

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # an attacker that reads nothing lets the proxy's answers pile up
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.frames: list = []
        self.closed = False
        self.send(self.conn.data_to_send())
        if ack_settings:
            from hyperframe.frame import SettingsFrame

            self.until(lambda f: isinstance(f, SettingsFrame) and "ACK" not in f.flags)
            ack = SettingsFrame(0)
            ack.flags.add("ACK")
            self.send(ack.serialize())

    def send(self, data: bytes) -> bool:
        """False once the proxy has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def headers_frame(self, stream_id: int, headers: Headers, end_stream: bool = True, end_headers: bool = True,
                      block: bytes | None = None) -> bytes:
        return frames.headers_frame(self.conn.encoder.encode(headers) if block is None else block, stream_id,
                                    end_stream, end_headers)

    data_frame = staticmethod(frames.data_frame)
    continuation_frame = staticmethod(frames.continuation_frame)

    @staticmethod
    def rst_frame(stream_id: int, code: int = 0x8) -> bytes:
        from hyperframe.frame import RstStreamFrame

        f = RstStreamFrame(stream_id)
        f.error_code = code
        return f.serialize()

    def _read(self) -> bool:
        from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame

        try:
            data = self.sock.recv(1 << 16)
        except socket.timeout:
            return False  # still open, silent
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        self.buf += data
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                break
            frame.parse_body(memoryview(self.buf[9:9 + length]))
            self.buf = self.buf[9 + length:]
            if isinstance(frame, (HeadersFrame, ContinuationFrame)):
                frame.headers = self.decoder.decode(frame.data, raw=True)  # keeps the HPACK table in step
            self.frames.append(frame)
        return True

    def until(self, pred, *, fail: bool = True):
        """The first frame (already read or arriving) for which pred is true."""
        i = 0
        while True:
            while i < len(self.frames):
                if pred(self.frames[i]):
                    return self.frames[i]
                i += 1
            if not self._read():
                if fail:
                    raise AssertionError(f"connection closed before the frame; got {self.frames[-5:]}")
                return None

    def goaway(self):
        """The GOAWAY the proxy sent before closing (read to the end of the connection)."""
        from hyperframe.frame import GoAwayFrame

        return self.until(lambda f: isinstance(f, GoAwayFrame))

    def reset(self, stream_id: int):
        from hyperframe.frame import RstStreamFrame

        return self.until(lambda f: isinstance(f, RstStreamFrame) and f.stream_id == stream_id)

    def status(self, stream_id: int) -> int:
        from hyperframe.frame import HeadersFrame

        f = self.until(lambda f: isinstance(f, HeadersFrame) and f.stream_id == stream_id)
        return int(dict(f.headers)[b":status"])

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class InFlight:
    """A well-behaved HTTP/2 connection with a request in flight (half its body sent) while an
    attack runs on another connection; `finish()` sends the rest and checks the whole answer."""

    def __init__(self, port: int, authority: bytes):
        self.client = H2Client(port)
        self.authority = authority
        c = self.client.conn
        self.sid = c.get_next_available_stream_id()
        c.send_headers(self.sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", authority),
                                  (b":path", b"/echo")], end_stream=False)
        send_body(c, self.sid, b"a" * 30000)
        self.client.flush()

    def finish(self) -> None:
        c = self.client.conn
        send_body(c, self.sid, b"b" * 30000, end_stream=True)
        self.client.flush()
        resp = self.client.response(self.sid)
        assert resp.status == 200 and resp.body == b"a" * 30000 + b"b" * 30000
        again = self.client.request(b"/after", method=b"GET", authority=self.authority)  # and it goes on
        assert again.status == 200, again
        self.client.close()


def echo_answer(name: str = "h2app"):
    """H2App answers: POST /echo returns the body; anything else the app's name."""
    def answer(seen: H2Seen):
        body = seen.body if seen.header(b":path") == b"/echo" else name.encode()
        return [(b":status", b"200")], body, []
    return answer
