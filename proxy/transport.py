"""The proxy-to-proxy transport header (docs/ARCHITECTURE.md, "Between proxies") — pure.

After a TLS handshake that negotiated ALPN `tulle/1`, the client proxy's first 8 bytes are
`b"TLT1"`, the target port (u16, big endian), the protocol (u8) and a reserved byte (0).
The inbound proxy forwards to the app on that port and skips protocol detection.
"""

from __future__ import annotations

import struct

MAGIC = b"TLT1"
SIZE = 8
OPAQUE, HTTP1, HTTP2 = 0, 1, 2
PROTOCOLS = (OPAQUE, HTTP1, HTTP2)

_STRUCT = struct.Struct(">4sHBB")


class TransportHeaderError(ValueError):
    """The first bytes after the handshake are not a valid transport header."""


def encode(port: int, protocol: int) -> bytes:
    if not 1 <= port <= 65535 or protocol not in PROTOCOLS:
        raise ValueError(f"bad transport header: port={port} protocol={protocol}")
    return _STRUCT.pack(MAGIC, port, protocol, 0)


def decode(data: bytes) -> tuple[int, int]:
    """(port, protocol) from the first SIZE bytes of `data`."""
    if len(data) < SIZE:
        raise TransportHeaderError("short transport header")
    magic, port, protocol, _reserved = _STRUCT.unpack_from(data)
    if magic != MAGIC:
        raise TransportHeaderError("not a tulle transport header")
    if port == 0:
        raise TransportHeaderError("target port 0")
    if protocol not in PROTOCOLS:
        raise TransportHeaderError(f"unknown protocol {protocol}")
    return port, protocol
