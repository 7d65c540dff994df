"""What an HTTP/2 session reports after `feed()` (and `pop_events()` after `data_to_send()`).

One class per event, plain slotted dataclasses so that the adapter can `match` on them.
Headers are lists of (name, value) bytes pairs in wire order, pseudo-headers first.
For every stream the adapter knows (its own requests; on a server, each RequestReceived or
HeaderListTooLarge), exactly one of StreamClosed / StreamReset is its last event; a stream
refused before its request was complete produces only a PeerMisbehaved.
"""
from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class RequestReceived:
    """Server side: a request's header section (HEADERS + CONTINUATION) arrived."""
    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(slots=True)
class InformationalResponseReceived:
    """Client side: a 1xx response (e.g. 100 Continue); the final response follows."""
    stream_id: int
    headers: Headers


@dataclass(slots=True)
class ResponseReceived:
    """Client side: the final response's header section arrived."""
    stream_id: int
    headers: Headers
    end_stream: bool


@dataclass(slots=True)
class DataReceived:
    """A DATA frame's payload (padding removed). `len(data)` bytes count against the stream's
    and the connection's receive windows until the consumer calls `consume(stream_id, n)`."""
    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class TrailersReceived:
    """The trailer section; it always ends the peer's side of the stream."""
    stream_id: int
    headers: Headers


@dataclass(slots=True)
class HeaderListTooLarge:
    """A header or trailer section was larger than max_header_list_size (name + value + 32 per
    field, RFC 9113 §6.5.2). Its fields were decoded (HPACK state must stay in step) and
    dropped. The stream stays open: a server answers 431 (then resets the stream if the request
    is unfinished), a client resets the stream and answers 502. Count as
    `header_list_too_large`."""
    stream_id: int
    end_stream: bool
    trailers: bool
    reason: str = "header_list_too_large"


@dataclass(slots=True)
class StreamReset:
    """The stream ended abnormally: the peer sent RST_STREAM (`remote`), or this side reset it
    (`reset()`, or a stream error the codec detected, which a PeerMisbehaved event names), or
    GOAWAY refused it (error_code REFUSED_STREAM: not processed, safe to retry)."""
    stream_id: int
    error_code: int
    remote: bool


@dataclass(slots=True)
class StreamClosed:
    """Both sides ended the stream cleanly; its state is gone."""
    stream_id: int


@dataclass(slots=True)
class StreamWritable:
    """`send_data` returned False for this stream earlier; its queued bytes have since drained
    below max_send_buffer, so the caller may send more."""
    stream_id: int


@dataclass(slots=True)
class PeerMisbehaved:
    """The codec refused something the peer did. `reason` is one of REASONS (a bounded metric
    label). stream_id 0 means the connection is being closed with GOAWAY(error_code): send
    `data_to_send()` and close once `session.closed`. Otherwise the stream was reset with
    RST_STREAM(error_code), and a StreamReset follows if the stream had been reported.
    Reported when the refusing frame is sent, so mostly from pop_events() after
    data_to_send(); floods and CONTINUATION abuse, which stop reading at once, from feed()."""
    reason: str
    stream_id: int
    error_code: int


@dataclass(slots=True)
class GoAwayReceived:
    """The peer will not process streams above last_stream_id; this side's streams above it end
    with StreamReset(REFUSED_STREAM) and may be retried elsewhere."""
    error_code: int
    last_stream_id: int
    debug_data: bytes


@dataclass(slots=True)
class SettingsAcked:
    """The peer acknowledged this side's SETTINGS: its limits are now in force."""


@dataclass(slots=True)
class RemoteSettingsChanged:
    """The peer's SETTINGS frame: {setting id: value} (see _ffi.SETTINGS_*)."""
    changes: dict[int, int]


@dataclass(slots=True)
class PingAcked:
    """An answer to `ping()` (keepalive): the 8 opaque bytes sent."""
    data: bytes


# The bounded set of PeerMisbehaved.reason values (plus HeaderListTooLarge.reason).
REASONS = (
    "refused_stream",          # a stream beyond max_concurrent_streams before the peer acked it
    "max_concurrent_streams",  # beyond the limit the peer had acknowledged (connection error)
    "header_list_too_large",
    "continuation_flood",      # more CONTINUATION frames after one HEADERS than max_continuations
    "rapid_reset",             # CVE-2023-44487: too many peer resets (ENHANCE_YOUR_CALM)
    "ping_flood",              # PING ACKs the peer does not read piled past max_outbound_ack
    "settings_flood",          # the same for SETTINGS ACKs
    "too_many_settings",       # more entries in one SETTINGS frame than max_settings
    "hpack",                   # HPACK decoding failed or table size update above our setting
    "flow_control",            # DATA beyond the window, or a window pushed past 2^31-1
    "stream_closed",           # frames on a stream the peer had ended (DATA after END_STREAM)
    "protocol_error",          # other RFC 9113 violations (stream-id reuse, bad frame order, ...)
    "malformed_message",       # RFC 9113 §8.1.1: bad pseudo-headers, connection headers, length
    "frame_size",
    "bad_preface",
)
