"""The proxy-to-proxy transport header (proxy/transport.py): the first 8 bytes a peer proxy
sends after the mTLS handshake.

Invariants: `decode` answers (port, protocol) or raises TransportHeaderError, nothing else;
what it accepts is a header `encode` would write (same magic, port and protocol; the
reserved byte is ignored) with a port in 1..65535 and a known protocol.
"""

from __future__ import annotations

from proxy import transport

INSTRUMENT = ("proxy.transport",)


def test_one_input(data: bytes) -> None:
    try:
        port, protocol = transport.decode(data)
    except transport.TransportHeaderError:
        return
    assert 1 <= port <= 65535 and protocol in transport.PROTOCOLS, (port, protocol)
    assert transport.encode(port, protocol)[:7] == data[:7], data[:8]


def seeds() -> list[bytes]:
    return [transport.encode(8080, transport.HTTP1), transport.encode(1, transport.OPAQUE) + b"rest",
            transport.encode(65535, transport.HTTP2), b"TLT1\x00\x00\x01\x00", b"GET / HTTP/1.1\r\n"]
