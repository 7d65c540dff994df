"""Protocol detection from the first bytes of a connection — pure, no I/O.

The listener peeks at the kernel buffer (MSG_PEEK) and calls `classify` each time more
bytes arrive, until it answers something other than NEED_MORE (or the detection timeout
fires: then the connection is opaque). For TLS, `client_hello` reads the SNI and the
offered ALPN protocols so the inbound proxy can tell a peer proxy (SNI = its own
identity) from the app's own TLS. Both functions accept any bytes and never raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# The longest request line we wait for before deciding; a longer one is still HTTP if it
# starts with a method (the HTTP server then refuses it with 414/431).
MAX_REQUEST_LINE = 8192
# How much a ClientHello may span before we give up and call the connection opaque TLS.
MAX_CLIENT_HELLO = 64 * 1024

_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")


class Kind(IntEnum):
    NEED_MORE = 0
    TLS = 1
    HTTP1 = 2
    H2 = 3
    OPAQUE = 4


def classify(data: bytes) -> Kind:
    """What the connection speaks, judged from its first bytes (a prefix of the stream)."""
    if not data:
        return Kind.NEED_MORE
    first = data[0]
    if first == 0x16:  # TLS handshake record
        if len(data) < 3:
            return Kind.NEED_MORE
        return Kind.TLS if data[1] == 0x03 and data[2] <= 0x04 else Kind.OPAQUE
    if first == 0x50:  # 'P': maybe the HTTP/2 preface (or a PUT/POST/PATCH request)
        n = min(len(data), len(H2_PREFACE))
        if data[:n] == H2_PREFACE[:n]:
            return Kind.H2 if n == len(H2_PREFACE) else Kind.NEED_MORE
    return _http1(data)


def _http1(data: bytes) -> Kind:
    """HTTP/1.x iff the first line is `METHOD SP target SP HTTP/1.x`.

    Empty lines before it are skipped, as RFC 9112 §2.2 lets servers do (and many do): a
    request behind them is still HTTP, or its headers would reach the app unparsed.
    """
    if data[:1] in (b"\r", b"\n"):
        data = data.lstrip(b"\r\n")
        if not data:
            return Kind.NEED_MORE
    end = data.find(b"\n", 0, MAX_REQUEST_LINE)
    if end < 0:
        # Incomplete line: keep waiting while it can still be a request line.
        sp = data.find(b" ", 0, 24)
        head = data[:sp] if sp >= 0 else data[:24]
        if not head or any(c not in _METHOD_CHARS for c in head):
            return Kind.OPAQUE
        if sp < 0 and len(data) >= 24:
            return Kind.OPAQUE  # no method is that long
        if len(data) >= MAX_REQUEST_LINE:
            return Kind.HTTP1  # an over-long request line: let the HTTP server refuse it
        return Kind.NEED_MORE
    line = data[:end]
    if line.endswith(b"\r"):
        line = line[:-1]
    parts = line.split(b" ")
    if len(parts) != 3:
        return Kind.OPAQUE
    method, target, version = parts
    # The same test as for an incomplete line above: the verdict must not depend on how
    # the first bytes were split into reads (llhttp knows only upper-case methods anyway).
    if not 0 < len(method) < 24 or any(c not in _METHOD_CHARS for c in method) or not target:
        return Kind.OPAQUE
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        return Kind.OPAQUE
    return Kind.HTTP1


@dataclass
class ClientHello:
    """What a TLS ClientHello tells before any key exchange."""

    complete: bool  # False: more bytes are needed to read it
    valid: bool = True  # False: not a parseable ClientHello (treat as opaque TLS)
    sni: str | None = None
    alpn: list[str] = field(default_factory=list)


_INCOMPLETE = ClientHello(complete=False)


def client_hello(data: bytes) -> ClientHello:
    """Parse the ClientHello at the start of `data` (one or more TLS records)."""
    try:
        return _client_hello(data)
    except (IndexError, ValueError, UnicodeDecodeError):
        return ClientHello(complete=True, valid=False)


def _client_hello(data: bytes) -> ClientHello:
    # Gather handshake bytes from consecutive handshake records until the first
    # handshake message is whole.
    hs = bytearray()
    pos = 0
    need = None
    while True:
        if len(data) < pos + 5:
            return _INCOMPLETE if len(data) < MAX_CLIENT_HELLO else ClientHello(True, False)
        ctype, major = data[pos], data[pos + 1]
        rlen = int.from_bytes(data[pos + 3:pos + 5], "big")
        if ctype != 0x16 or major != 0x03 or rlen == 0 or rlen > 16384 + 2048:
            return ClientHello(True, False)
        if len(data) < pos + 5 + rlen:
            return _INCOMPLETE if len(data) < MAX_CLIENT_HELLO else ClientHello(True, False)
        hs += data[pos + 5:pos + 5 + rlen]
        pos += 5 + rlen
        if need is None and len(hs) >= 4:
            if hs[0] != 0x01:  # not a ClientHello
                return ClientHello(True, False)
            need = 4 + int.from_bytes(hs[1:4], "big")
            if need > MAX_CLIENT_HELLO:
                return ClientHello(True, False)
        if need is not None and len(hs) >= need:
            break
    body = memoryview(bytes(hs[4:need]))
    p = 2 + 32  # legacy version, random
    sid_len = body[p]
    p += 1 + sid_len
    cs_len = int.from_bytes(body[p:p + 2], "big")
    p += 2 + cs_len
    comp_len = body[p]
    p += 1 + comp_len
    if p > len(body):
        return ClientHello(True, False)
    if p == len(body):
        return ClientHello(True)  # no extensions
    ext_total = int.from_bytes(body[p:p + 2], "big")
    p += 2
    end = p + ext_total
    if end > len(body):
        return ClientHello(True, False)
    sni = None
    alpn: list[str] = []
    while p + 4 <= end:
        etype = int.from_bytes(body[p:p + 2], "big")
        elen = int.from_bytes(body[p + 2:p + 4], "big")
        p += 4
        ext = body[p:p + elen]
        if len(ext) != elen:
            return ClientHello(True, False)
        p += elen
        if etype == 0:  # server_name
            q = 2
            list_end = 2 + int.from_bytes(ext[0:2], "big")
            while q + 3 <= min(list_end, len(ext)):
                ntype = ext[q]
                nlen = int.from_bytes(ext[q + 1:q + 3], "big")
                name = bytes(ext[q + 3:q + 3 + nlen])
                q += 3 + nlen
                if ntype == 0 and len(name) == nlen:
                    sni = name.decode("ascii").lower().rstrip(".")
                    break
        elif etype == 16:  # application_layer_protocol_negotiation
            q = 2
            list_end = min(2 + int.from_bytes(ext[0:2], "big"), len(ext))
            while q < list_end:
                plen = ext[q]
                alpn.append(bytes(ext[q + 1:q + 1 + plen]).decode("latin-1"))
                q += 1 + plen
    return ClientHello(True, True, sni, alpn)
