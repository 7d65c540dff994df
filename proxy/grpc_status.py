"""gRPC answers the proxy gives itself (pure): a trailers-only response.

A gRPC client reads a refusal from `grpc-status` / `grpc-message`, not from the HTTP
status: the proxy answers HTTP 200 with one HEADERS frame that ends the stream and
carries the status (the gRPC spec's "Trailers-Only" response). Linkerd maps its own
refusals this way (403 → PERMISSION_DENIED 7, 502/503 → UNAVAILABLE 14, 504 →
DEADLINE_EXCEEDED 4, 429 → RESOURCE_EXHAUSTED 8).

The HTTP/2 wire adapter (proxy/http2/server.py) sends `trailers_only(...)` as the
headers of a HEADERS frame with END_STREAM whenever it answers a request whose
content-type `is_grpc` with the proxy's own error (`code_for_http_status`).
"""

from __future__ import annotations

from typing import Optional

OK = 0
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
ABORTED = 10
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# The gRPC code for each HTTP status the proxy refuses with (Linkerd's mapping).
FOR_HTTP_STATUS = {403: PERMISSION_DENIED, 429: RESOURCE_EXHAUSTED, 502: UNAVAILABLE, 503: UNAVAILABLE,
                   504: DEADLINE_EXCEEDED, 500: INTERNAL, 508: ABORTED}
# Other statuses as the gRPC spec maps an HTTP status that is not gRPC's (http-grpc-status-mapping).
_SPEC = {400: INTERNAL, 401: UNAUTHENTICATED, 404: UNIMPLEMENTED, 431: INTERNAL}


def code_for_http_status(status: int) -> int:
    return FOR_HTTP_STATUS.get(status) or _SPEC.get(status, UNKNOWN)

_PROXY_ERROR = b"tulle-proxy-error"


def is_grpc(content_type: Optional[bytes]) -> bool:
    """`application/grpc`, `application/grpc+proto`, `application/grpc;...` (not grpc-web)."""
    if not content_type:
        return False
    ct = content_type.strip().lower()
    return ct.startswith(b"application/grpc") and ct[16:17] in (b"", b"+", b";")


def percent_encode(message: str) -> bytes:
    """grpc-message encoding: UTF-8, with '%' and bytes outside 0x20..0x7E as %XX."""
    out = bytearray()
    for b in message.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def trailers_only(code: int, message: str, *, proxy_error: Optional[str] = None) -> list[tuple[bytes, bytes]]:
    """The header list of a trailers-only gRPC response (send with END_STREAM)."""
    headers = [(b":status", b"200"), (b"content-type", b"application/grpc"),
               (b"grpc-status", str(code).encode()), (b"grpc-message", percent_encode(message))]
    if proxy_error is not None:
        headers.append((_PROXY_ERROR, proxy_error.encode("ascii", "replace").replace(b"\r", b" ").replace(b"\n", b" ")))
    return headers


def permission_denied(message: str) -> list[tuple[bytes, bytes]]:
    """What a denied gRPC call gets: grpc-status 7, the reason also in tulle-proxy-error."""
    return trailers_only(PERMISSION_DENIED, message, proxy_error=message)
