"""HTTP/1 header rules — pure: framing, smuggling refusals, hop-by-hop removal, heads.

httptools (llhttp) already refuses most malformed input (CL+TE, duplicate or non-numeric
Content-Length, obs-fold, CR/LF/NUL in fields, chunk-size overflow). On top of it a
proxy must refuse what a parser may accept but a backend could read differently: any
Transfer-Encoding other than exactly `chunked`, repeated Host, Transfer-Encoding on
HTTP/1.0. Everything here works on the raw (name, value) byte pairs the parser gives.
"""

from __future__ import annotations

from http import HTTPStatus

# Framing of a message body.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3

# Hop-by-hop headers (RFC 9110 §7.6.1) and the proxy-only ones a client may not send on.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
CLIENT_ID = b"tulle-client-id"
PROXY_ERROR = b"tulle-proxy-error"


def folded_name(name: bytes) -> bytes:
    """A lowercase header name as app servers may fold it: WSGI, CGI and PHP read
    `tulle_client_id` (and `tulle.client.id`) as the same variable as `tulle-client-id`, so a
    header the proxy strips must go in every spelling."""
    return name.replace(b"_", b"-").replace(b".", b"-")


class HeadError(Exception):
    """A request the proxy refuses: (status, reason for tulle-proxy-error and the error metric)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _connection_tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def request_head(headers: list[tuple[bytes, bytes]], version: str, strip: frozenset[bytes] = frozenset()
                 ) -> tuple[list[tuple[bytes, bytes]], bytes | None, int, int, bytes | None, bool]:
    """Check and sanitise a request's headers.

    Returns (forwarded headers, Host value, framing, content length, Upgrade value or None,
    client asked to close). Raises HeadError for anything a proxy must not forward.
    `strip` names headers removed as well (e.g. tulle-client-id on inbound).
    """
    fwd: list[tuple[bytes, bytes]] = []
    host = None
    framing = NO_BODY
    length = 0
    upgrade = None
    conn_tokens: list[bytes] | None = None
    te_seen = False
    for item in headers:
        name = item[0].lower()
        if name in HOP_BY_HOP:
            value = item[1]
            if name == b"transfer-encoding":
                if te_seen or value.strip().lower() != b"chunked":
                    raise HeadError(400, "unsupported transfer-encoding")
                te_seen = True
                framing = CHUNKED
            elif name == b"connection":
                conn_tokens = (conn_tokens or []) + _connection_tokens(value)
            elif name == b"upgrade":
                upgrade = value
            continue
        if name == b"content-length":
            # llhttp has refused duplicates and non-digits already; be sure anyway.
            value = item[1].strip()
            if not value.isdigit() or framing == LENGTH:
                raise HeadError(400, "invalid content-length")
            length = int(value)
            framing = LENGTH
            fwd.append(item)
            continue
        if name == b"host":
            if host is not None:
                raise HeadError(400, "more than one host header")
            host = item[1]
        elif strip and (name in strip or folded_name(name) in strip):
            continue
        fwd.append(item)
    if te_seen:
        if length or any(n.lower() == b"content-length" for n, _ in fwd):
            raise HeadError(400, "content-length with transfer-encoding")
        if version == "1.0":
            raise HeadError(400, "transfer-encoding in an HTTP/1.0 request")
        framing = CHUNKED
    fwd, close = _drop_connection_named(fwd, conn_tokens)
    if not conn_tokens or b"upgrade" not in conn_tokens:
        upgrade = None  # Upgrade without `Connection: upgrade` is not an upgrade
    return fwd, host, framing, length, upgrade, close


def _drop_connection_named(fwd: list[tuple[bytes, bytes]], conn_tokens: list[bytes] | None):
    """(`fwd` without the headers the Connection header names as hop-by-hop, whether it
    says `close`) — RFC 9110 7.6.1."""
    if not conn_tokens:
        return fwd, False
    named = frozenset(conn_tokens) - {b"close", b"keep-alive", b"upgrade"}
    if named:
        fwd = [h for h in fwd if h[0].lower() not in named]
    return fwd, b"close" in conn_tokens


def response_head(headers: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], int, int, bytes | None, bool]:
    """Sanitise a response's headers: (forwarded, framing, length, Upgrade value, server asked to close).

    Framing here is what the upstream used; the caller turns it into what the client gets.
    """
    fwd: list[tuple[bytes, bytes]] = []
    framing = UNTIL_CLOSE
    length = 0
    upgrade = None
    conn_tokens: list[bytes] | None = None
    for item in headers:
        name = item[0].lower()
        if name in HOP_BY_HOP:
            if name == b"transfer-encoding":
                framing = CHUNKED
            elif name == b"connection":
                conn_tokens = (conn_tokens or []) + _connection_tokens(item[1])
            elif name == b"upgrade":
                upgrade = item[1]
            continue
        if name == b"content-length":
            if framing != CHUNKED:
                framing = LENGTH
                v = item[1].strip()
                length = int(v) if v.isdigit() else 0
            fwd.append(item)
            continue
        fwd.append(item)
    if framing == CHUNKED:
        fwd = [h for h in fwd if h[0].lower() != b"content-length"]
    fwd, close = _drop_connection_named(fwd, conn_tokens)
    return fwd, framing, length, upgrade, close


def response_has_body(status: int, method: bytes) -> bool:
    return not (status < 200 or status in (204, 304) or method == b"HEAD")


_STATUS_LINES: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode()
    return line


def serialize(first_line: bytes, headers: list[tuple[bytes, bytes]], extra: bytes = b"") -> bytes:
    """A head: first line (with CRLF), headers, `extra` (pre-built header lines), blank line."""
    parts = [first_line]
    for n, v in headers:
        parts += (n, b": ", v, b"\r\n")
    parts.append(extra)
    parts.append(b"\r\n")
    return b"".join(parts)


def error_response(status: int, reason: str, *, close: bool = True) -> bytes:
    """A response the proxy itself generates: no body, the reason in tulle-proxy-error."""
    reason_b = reason.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    return b"".join((
        status_line(status), b"content-length: 0\r\n", PROXY_ERROR, b": ", reason_b, b"\r\n",
        b"connection: close\r\n" if close else b"", b"\r\n",
    ))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
