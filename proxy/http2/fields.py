"""Header sections between HTTP/2 and the request core — pure.

HTTP/2 carries the request line in pseudo-header fields and forbids connection-specific
fields (RFC 9113 §8.2.2); HTTP/1 names are case-insensitive and may be capitalised, HTTP/2
names must be lowercase. nghttp2 has already refused a malformed section it received;
what goes out is made valid here: names lowercased, hop-by-hop fields and the ones the
Connection field names dropped, `host` folded into `:authority`.
"""

from __future__ import annotations

from typing import Optional

from proxy.http1.headers import HOP_BY_HOP, folded_name

# The caller's protocol when a proxy carries an HTTP/1 request over HTTP/2 to its peer
# (Linkerd's l5d-orig-proto): the peer's inbound side restores it towards the app.
ORIG_PROTO = b"tulle-orig-proto"
ORIG_PROTOS = frozenset({b"HTTP/1.1", b"HTTP/1.0"})

_STATUS: dict[int, bytes] = {}


def status_bytes(status: int) -> bytes:
    b = _STATUS.get(status)
    if b is None:
        b = _STATUS[status] = str(status).encode()
    return b


class RequestHead:
    """A received request section, split: pseudo-headers, regular fields (what the proxy
    removes is gone), and what the proxy reads from it."""

    __slots__ = ("method", "scheme", "authority", "path", "fields", "content_type", "length", "orig_proto")

    def __init__(self):
        self.method = b""
        self.scheme = b""
        self.authority: Optional[bytes] = None
        self.path = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.content_type: Optional[bytes] = None
        self.length = -1
        self.orig_proto: Optional[bytes] = None


def request_head(headers: list[tuple[bytes, bytes]], strip: frozenset[bytes]) -> RequestHead:
    """Read a request section nghttp2 validated (pseudo-headers first, names lowercase).
    Fields named in `strip` go in every spelling app servers fold into the same name; the
    orig-proto field is always taken out (the caller decides whether to believe it)."""
    head = RequestHead()
    fields = head.fields
    host = None
    for item in headers:
        name = item[0]
        if name[:1] == b":":
            if name == b":method":
                head.method = item[1]
            elif name == b":path":
                head.path = item[1]
            elif name == b":authority":
                head.authority = item[1]
            elif name == b":scheme":
                head.scheme = item[1]
            continue  # :protocol (extended CONNECT) is not proxied
        if name == b"content-type":
            head.content_type = item[1]
        elif name == b"content-length":
            value = item[1]
            head.length = int(value) if value.isdigit() else -1
        elif name == b"host":
            host = item[1]
        elif name == ORIG_PROTO:
            value = item[1]
            head.orig_proto = value if value in ORIG_PROTOS else None
            continue
        if strip and (name in strip or folded_name(name) in strip):
            continue
        fields.append(item)
    if head.authority is None:
        head.authority = host
    return head


def response_fields(headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]], int]:
    """(status, regular fields, content-length or -1) of a received response section."""
    status = 0
    length = -1
    fields = []
    for item in headers:
        name = item[0]
        if name == b":status":
            v = item[1]
            status = int(v) if v.isdigit() else 0
            continue
        if name[:1] == b":":
            continue
        if name == b"content-length":
            v = item[1]
            length = int(v) if v.isdigit() else -1
        fields.append(item)
    return status, fields, length


def outgoing(fields: list[tuple[bytes, bytes]], skip: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    """Fields valid on HTTP/2 from any source: lowercase names, no hop-by-hop field (but
    `te: trailers`), nothing a Connection field named, nothing in `skip`."""
    out = []
    named: Optional[set[bytes]] = None
    for name, value in fields:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"te" and value.strip().lower() == b"trailers":
                out.append((b"te", b"trailers"))
            elif lname == b"connection":
                named = (named or set()) | {t.strip().lower() for t in value.split(b",")}
            continue
        if lname in skip:
            continue
        out.append((lname, value))
    if named:
        out = [f for f in out if f[0] not in named]
    return out


def is_lowercase_clean(fields: list[tuple[bytes, bytes]]) -> bool:
    """Fields that came from HTTP/2 already are valid HTTP/2 (nghttp2 checked them)."""
    return all(n == n.lower() for n, _ in fields)


def trailer_fields(fields: Optional[list[tuple[bytes, bytes]]]) -> list[tuple[bytes, bytes]]:
    """A trailer section to send: no pseudo-header may appear in it."""
    return [f for f in fields or () if f[0][:1] != b":"]
