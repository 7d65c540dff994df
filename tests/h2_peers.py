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
        conn.send_headers(stream_id, headers, end_stream=not body and not trailers)
        if body:
            conn.send_data(stream_id, body, end_stream=not trailers)
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
            self.conn.send_data(sid, body, end_stream=not trailers)
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


SPOOFED_ID = [(b"tulle-client-id", b"admin.kube-system.serviceaccount.identity.tulle.cluster.local"),
              (b"tulle_client_id", b"admin"), (b"tulle.client.id", b"admin")]


def client_id_fields(seen: H2Seen) -> list[bytes]:
    """Every value of any spelling an app server folds into tulle-client-id."""
    return [v for k, v in seen.headers if k.replace(b"_", b"-").replace(b".", b"-") == b"tulle-client-id"]
