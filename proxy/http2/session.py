"""One HTTP/2 connection side over nghttp2, sans-I/O: bytes in, events out, bytes to send.

    session = H2Session(client=False)           # or client=True
    events = session.feed(received_bytes)         # -> list of proxy.http2.events
    transport.write(session.data_to_send())
    events += session.pop_events()                # what sending caused (StreamWritable, closes)

Flow control is explicit both ways so that a proxy applies backpressure instead of buffering:
- Receiving: DATA counts against the stream window (initial_stream_window) and the connection
  window (connection_window) until the consumer calls `consume(stream_id, n)`; only then does
  nghttp2 send WINDOW_UPDATE. A stream whose consumer is slow stops at its own window while
  the others flow on within the connection window.
- Sending: `send_data` queues at most about max_send_buffer bytes per stream; when it returns
  False the caller stops reading that stream's source until a StreamWritable event. A stream
  whose queue is empty is deferred in nghttp2 (no busy polling) and resumed by the next
  send_data / send_trailers / end_stream.

The adapter must not pull `data_to_send()` while its transport is paused for writing: the
bytes then stay in nghttp2, which bounds the ACKs it queues for a peer that sends PING or
SETTINGS without reading (max_outbound_ack) and reports a flood instead of growing.

Protections (each reported as a PeerMisbehaved / HeaderListTooLarge event with a bounded
reason): nghttp2's own limits are switched on (max concurrent streams, CONTINUATION count,
outbound ACK queue, SETTINGS entries, HPACK table sizes, HTTP messaging checks, reset rate as a
backstop), and this class adds the header-list size limit and the rapid-reset rule below.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from proxy.http2 import _ffi
from proxy.http2._ffi import ffi, lib
from proxy.http2.events import (
    DataReceived,
    GoAwayReceived,
    HeaderListTooLarge,
    InformationalResponseReceived,
    PeerMisbehaved,
    PingAcked,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    SettingsAcked,
    StreamClosed,
    StreamReset,
    StreamWritable,
    TrailersReceived,
)

# RFC 9113 §7 error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD


@dataclass(frozen=True, slots=True)
class H2Config:
    """Limits of one connection side. Defaults follow Linkerd's proxy (windows, streams) and
    hyper (16 KiB header list)."""

    initial_stream_window: int = 65_535
    connection_window: int = 1 << 20
    max_concurrent_streams: int = 100        # streams the peer may open to us
    peer_max_concurrent_streams: int = 100   # streams we open before the peer's SETTINGS say
    max_header_list_size: int = 16 * 1024
    header_table_size: int = 4096            # HPACK table the peer's encoder may use (decoder)
    max_encoder_table_size: int = 4096       # our encoder's table, whatever the peer allows
    max_send_buffer: int = 64 * 1024         # bytes queued per stream before send_data says stop
    max_outbound_ack: int = 1000             # unsent SETTINGS/PING ACKs before "flood"
    max_settings: int = 32                   # entries in one SETTINGS frame
    max_continuations: int = 8               # CONTINUATION frames after one HEADERS
    # Rapid reset (CVE-2023-44487), Envoy's rule: once the peer has opened
    # premature_reset_min_streams streams, more than half of them reset by the peer within
    # premature_reset_lifetime seconds of opening ends the connection (ENHANCE_YOUR_CALM).
    premature_reset_min_streams: int = 500
    premature_reset_lifetime: float = 1.0
    # ...and a token bucket over the streams the peer resets or makes us reset (RST_STREAM
    # received, stream errors it caused): reset_burst at once, reset_rate per second after.
    reset_burst: int = 1000
    reset_rate: float = 33.0


DEFAULT_CONFIG = H2Config()


class H2Error(Exception):
    """A call the session cannot carry out (misuse, or nghttp2 refused it)."""


# Bound once: the out-of-line ffi's methods are C functions, the lookups are what costs.
_from_handle = ffi.from_handle
_unpack = ffi.unpack
_from_buffer = ffi.from_buffer
_memmove = ffi.memmove
_NULL = ffi.NULL
_DATA = _ffi.DATA
_HEADERS = _ffi.HEADERS
_CONTINUATION = _ffi.CONTINUATION
_END_STREAM = _ffi.FLAG_END_STREAM
_ERR_DEFERRED = _ffi.ERR_DEFERRED
_EOF = _ffi.DATA_FLAG_EOF
_EOF_NO_END = _ffi.DATA_FLAG_EOF | _ffi.DATA_FLAG_NO_END_STREAM

# Fields that must never enter an HPACK table (RFC 9113 §8.2.3 / RFC 7541 §7.1.3).
_NEVER_INDEX = frozenset({b"authorization", b"proxy-authorization"})

# nghttp2_nv is {uint8_t *name; uint8_t *value; size_t namelen; size_t valuelen; uint8_t flags}:
# packing the array with struct is several times cheaper than filling cdata fields one by one.
assert ffi.sizeof("nghttp2_nv") == 40 and ffi.offsetof("nghttp2_nv", "flags") == 32
_NV = struct.Struct("=QQQQB7x")
_ADDR = ffi.cast


_CHAR_ARRAY = ffi.typeof("char[]")
_NV_ARRAY = ffi.typeof("nghttp2_nv[]")


class _Nva:
    """An nghttp2_nv[] for a header list; keep the object alive across the submit call (nghttp2
    copies names and values before returning)."""

    __slots__ = ("blob", "array", "count")

    def __init__(self, headers: Iterable[tuple[bytes, bytes]]):
        if not isinstance(headers, list):
            headers = list(headers)
        self.blob = blob = _from_buffer(_CHAR_ARRAY, b"".join([b for pair in headers for b in pair]), False)
        addr = int(_ADDR("uintptr_t", blob))
        pack = _NV.pack
        parts = []
        for name, value in headers:
            nl = len(name)
            vl = len(value)
            parts.append(pack(addr, addr + nl, nl, vl, 1 if name in _NEVER_INDEX else 0))
            addr += nl + vl
        self.array = _from_buffer(_NV_ARRAY, b"".join(parts), False)
        self.count = len(headers)


class _Stream:
    __slots__ = (
        "id", "opened_at", "unconsumed", "send_buf", "send_end", "trailers", "deferred",
        "blocked", "reset_by_peer", "response_received", "can_send", "closing", "context",
        "remote_ended", "reported",
    )

    def __init__(self, stream_id: int, opened_at: float, can_send: bool, server_side: bool = False):
        self.id = stream_id
        self.opened_at = opened_at
        self.unconsumed = 0           # received DATA bytes not yet consume()d
        self.send_buf = bytearray()
        self.send_end = False         # the caller ended its side (end_stream or trailers)
        self.trailers = None          # an _Nva to submit once send_buf drains
        self.deferred = False         # our data provider answered DEFERRED; resume on new data
        self.blocked = False          # send_data returned False; StreamWritable when drained
        self.reset_by_peer = False
        self.response_received = False
        self.can_send = can_send      # a data provider is attached (headers without END_STREAM)
        self.closing = False          # reset() was called; the close event is on its way
        self.context = None           # the adapter's object for this stream (attach())
        self.remote_ended = False     # the peer sent END_STREAM: its message is complete
        self.reported = not server_side  # the adapter knows the stream (so gets its last event)


# ---- nghttp2 callbacks: one set for all sessions, user_data is a handle to the H2Session ----
# An exception inside a callback is a bug of ours: it makes nghttp2 fail the call with
# CALLBACK_FAILURE and feed()/data_to_send() re-raise it.
_callback_errors: list[BaseException] = []


def _onerror(exc_type, exc, tb):
    _callback_errors.append(exc)


def _cb(ctype):
    return lambda fn: ffi.callback(ctype, fn, error=_ffi.ERR_CALLBACK_FAILURE, onerror=_onerror)


@_cb("nghttp2_on_begin_headers_callback")
def _on_begin_headers(session, frame, ud):
    s = _from_handle(ud)
    s._hdrs = []
    s._hdr_size = 0
    if s._server and frame.headers.cat == _ffi.HCAT_REQUEST:
        sid = frame.hd.stream_id
        s._streams[sid] = _Stream(sid, s._clock(), False, True)
        s._streams_opened += 1
    return 0


@_cb("nghttp2_on_header_callback")
def _on_header(session, frame, name, namelen, value, valuelen, flags, ud):
    s = _from_handle(ud)
    size = s._hdr_size + namelen + valuelen + 32
    s._hdr_size = size
    if size <= s._max_header_list_size:
        s._hdrs.append((_unpack(name, namelen), _unpack(value, valuelen)))
    return 0


@_cb("nghttp2_on_data_chunk_recv_callback")
def _on_data_chunk(session, flags, sid, data, length, ud):
    s = _from_handle(ud)
    st = s._streams.get(sid)
    if st is not None:
        st.unconsumed += length
    if sid == s._chunk_sid:
        s._chunks.append(_unpack(data, length))
    else:
        s._chunk_sid = sid
        s._chunks = [_unpack(data, length)]
    return 0


@_cb("nghttp2_on_frame_recv_callback")
def _on_frame_recv(session, frame, ud):
    s = _from_handle(ud)
    hd = frame.hd
    t = hd.type
    if t == _DATA:
        sid = hd.stream_id
        if s._chunk_sid == sid:
            chunks = s._chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            s._chunk_sid = 0
            s._chunks = []
        else:
            data = b""
        end = bool(hd.flags & _END_STREAM)
        if end:
            st = s._streams.get(sid)
            if st is not None:
                st.remote_ended = True
        s._events.append(DataReceived(sid, data, end))
    elif t == _HEADERS:
        s._headers_frame(frame, hd.stream_id, bool(hd.flags & _END_STREAM))
    else:
        s._control_frame(frame, t, hd)
    return 0


@_cb("nghttp2_on_invalid_frame_recv_callback")
def _on_invalid_frame_recv(session, frame, lib_error_code, ud):
    _from_handle(ud)._invalid_frame(frame, lib_error_code)
    return 0


@_cb("nghttp2_on_stream_close_callback")
def _on_stream_close(session, sid, error_code, ud):
    s = _from_handle(ud)
    st = s._streams.pop(sid, None)
    if st is None:
        return 0
    if st.unconsumed:
        # Data the consumer will never consume: give the connection window back.
        s._credit += st.unconsumed
    if not st.reported:
        return 0  # refused before its request was complete (e.g. malformed): nothing to end
    if error_code or (st.reset_by_peer and not st.remote_ended):
        s._events.append(StreamReset(sid, error_code, st.reset_by_peer))
    else:
        s._events.append(StreamClosed(sid))
    return 0


@_cb("nghttp2_on_frame_send_callback")
def _on_frame_send(session, frame, ud):
    hd = frame.hd
    t = hd.type
    if t <= _HEADERS:
        if hd.flags & _END_STREAM:
            s = _from_handle(ud)
            if s._server:
                s._response_ended(hd.stream_id)
    elif t == _ffi.GOAWAY or t == _ffi.RST_STREAM:
        _from_handle(ud)._sent_error_frame(frame, t)
    return 0


@_cb("nghttp2_error_callback2")
def _on_error(session, lib_error_code, msg, length, ud):
    _from_handle(ud)._last_error = _unpack(msg, length).decode("ascii", "replace")
    return 0


@_cb("nghttp2_on_begin_frame_callback")
def _on_begin_frame(session, hd, ud):
    """Before nghttp2 reads a HEADERS or CONTINUATION frame: HEADERS reusing a closed stream's
    id, which nghttp2 silently ignores once closed streams are not retained (RFC 9113 §5.1.1
    asks for PROTOCOL_ERROR), and CONTINUATION counting when the library has no limit of its
    own. A violation fails the whole mem_recv call, and feed() answers with GOAWAY.
    (DATA on a closed stream never gets here: nghttp2 drops it first, which §5.1 allows, and
    answers DATA after END_STREAM on a half-closed stream with STREAM_CLOSED itself.)"""
    t = hd.type
    if t == _HEADERS:
        s = _from_handle(ud)
        s._continuations = 0
        sid = hd.stream_id
        if sid in s._streams:
            return 0  # trailers
        if s._server:
            if sid > s._last_peer_stream:
                s._last_peer_stream = sid  # a new stream (an even id: nghttp2 refuses it)
                return 0
        elif sid >= s._next_own_stream:
            return 0  # idle: nghttp2 answers PROTOCOL_ERROR itself
        if sid in s._reset_ids or sid > s._goaway_last_stream:
            return 0  # we reset or refused it: frames in flight are ignored (§5.1 "closed")
        s._violation = ("protocol_error", PROTOCOL_ERROR)
        return _ffi.ERR_CALLBACK_FAILURE
    if t == _CONTINUATION:
        s = _from_handle(ud)
        if s._count_continuations:
            s._continuations += 1
            if s._continuations > s._config.max_continuations:
                s._violation = ("continuation_flood", ENHANCE_YOUR_CALM)
                return _ffi.ERR_CALLBACK_FAILURE
    return 0


@ffi.callback("nghttp2_data_source_read_callback", error=_ffi.ERR_CALLBACK_FAILURE, onerror=_onerror)
def _read_data(session, sid, buf, length, data_flags, source, ud):
    s = _from_handle(ud)
    st = s._streams.get(sid)
    if st is None:
        data_flags[0] = _EOF
        return 0
    pending = st.send_buf
    n = len(pending)
    if n > length:
        n = length
        _memmove(buf, pending, n)
        del pending[:n]
    elif n:
        _memmove(buf, pending, n)
        pending.clear()
    elif not st.send_end:
        st.deferred = True
        return _ERR_DEFERRED
    if st.send_end and not pending:
        if st.trailers is not None:
            data_flags[0] = _EOF_NO_END
            nva = st.trailers
            st.trailers = None
            lib.nghttp2_submit_trailer(session, sid, nva.array, nva.count)
        else:
            data_flags[0] = _EOF
    if st.blocked and len(pending) < s._config.max_send_buffer:
        st.blocked = False
        s._events.append(StreamWritable(sid))
    return n


_CALLBACKS = ffi.new("nghttp2_session_callbacks **")
if lib.nghttp2_session_callbacks_new(_CALLBACKS) != 0:
    raise MemoryError("nghttp2_session_callbacks_new")
_CALLBACKS = ffi.gc(_CALLBACKS[0], lib.nghttp2_session_callbacks_del)
lib.nghttp2_session_callbacks_set_on_begin_headers_callback(_CALLBACKS, _on_begin_headers)
lib.nghttp2_session_callbacks_set_on_header_callback(_CALLBACKS, _on_header)
lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(_CALLBACKS, _on_data_chunk)
lib.nghttp2_session_callbacks_set_on_frame_recv_callback(_CALLBACKS, _on_frame_recv)
lib.nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(_CALLBACKS, _on_invalid_frame_recv)
lib.nghttp2_session_callbacks_set_on_stream_close_callback(_CALLBACKS, _on_stream_close)
lib.nghttp2_session_callbacks_set_on_frame_send_callback(_CALLBACKS, _on_frame_send)
lib.nghttp2_session_callbacks_set_error_callback2(_CALLBACKS, _on_error)
lib.nghttp2_session_callbacks_set_on_begin_frame_callback(_CALLBACKS, _on_begin_frame)

_PROVIDER = ffi.new("nghttp2_data_provider *")
_PROVIDER.read_callback = _read_data

# Library error (from on_invalid_frame_recv / error_callback2) -> PeerMisbehaved.reason.
_LIB_REASON = {
    _ffi.ERR_REFUSED_STREAM: "refused_stream",
    _ffi.ERR_FLOW_CONTROL: "flow_control",
    _ffi.ERR_STREAM_CLOSED: "stream_closed",
    _ffi.ERR_HEADER_COMP: "hpack",
    _ffi.ERR_FRAME_SIZE_ERROR: "frame_size",
    _ffi.ERR_HTTP_HEADER: "malformed_message",
    _ffi.ERR_HTTP_MESSAGING: "malformed_message",
    _ffi.ERR_PROTO: "protocol_error",
    _ffi.ERR_TOO_MANY_SETTINGS: "too_many_settings",
    _ffi.ERR_BAD_CLIENT_MAGIC: "bad_preface",
    _ffi.ERR_SETTINGS_EXPECTED: "bad_preface",
    _ffi.ERR_TOO_MANY_CONTINUATIONS: "continuation_flood",
}
# Library error -> the RFC 9113 code nghttp2 answers it with (its get_error_code_from_lib_error_code).
_LIB_CODE = {
    _ffi.ERR_STREAM_CLOSED: STREAM_CLOSED,
    _ffi.ERR_HEADER_COMP: COMPRESSION_ERROR,
    _ffi.ERR_FRAME_SIZE_ERROR: FRAME_SIZE_ERROR,
    _ffi.ERR_FLOW_CONTROL: FLOW_CONTROL_ERROR,
    _ffi.ERR_REFUSED_STREAM: REFUSED_STREAM,
    _ffi.ERR_PROTO: PROTOCOL_ERROR,
    _ffi.ERR_HTTP_HEADER: PROTOCOL_ERROR,
    _ffi.ERR_HTTP_MESSAGING: PROTOCOL_ERROR,
}
# Error code of a GOAWAY / RST_STREAM nghttp2 sent without telling us why -> reason.
_CODE_REASON = {
    PROTOCOL_ERROR: "protocol_error",
    FLOW_CONTROL_ERROR: "flow_control",
    STREAM_CLOSED: "stream_closed",
    FRAME_SIZE_ERROR: "frame_size",
    REFUSED_STREAM: "refused_stream",
    COMPRESSION_ERROR: "hpack",
    # nghttp2 answers ENHANCE_YOUR_CALM itself only to a SETTINGS frame over max_settings (our
    # rapid-reset GOAWAY is reported before it is sent), and INTERNAL_ERROR only from its own
    # reset-rate backstop.
    ENHANCE_YOUR_CALM: "too_many_settings",
    INTERNAL_ERROR: "rapid_reset",
}


class H2Session:
    """One side of one HTTP/2 connection. Not thread-safe; one per connection."""

    def __init__(self, client: bool, config: H2Config = DEFAULT_CONFIG,
                 clock: Callable[[], float] = time.monotonic):
        self._config = config
        self._server = not client
        self._clock = clock
        self._max_header_list_size = config.max_header_list_size
        self._events: list = []
        self._streams: dict[int, _Stream] = {}
        self._hdrs: list = []
        self._hdr_size = 0
        self._chunk_sid = 0
        self._chunks: list = []
        self._credit = 0                # connection-window bytes to give back after the call
        self._last_error = ""           # nghttp2's message about the last error, for logs
        self._invalid_streams: dict[int, str] = {}  # stream -> reason of its coming RST_STREAM
        self._last_invalid = None       # (reason, error code) of the last frame nghttp2 refused
        self._terminated = False        # a connection-level PeerMisbehaved was reported
        self._streams_opened = 0
        self._premature_resets = 0
        self._reset_tokens = float(config.reset_burst)
        self._reset_refilled_at = clock()
        self._pings_unsent = 0          # PING / SETTINGS received since the last data_to_send
        self._settings_unsent = 0
        self._continuations = 0
        self._violation = None          # (reason, error code) found by _on_begin_frame
        self._last_peer_stream = 0      # server: highest stream id the client opened
        self._next_own_stream = 1       # client: the id the next request gets
        self._reset_ids: dict[int, None] = {}  # streams this side reset, most recent last
        self._goaway_last_stream = 2**31 - 1   # streams above it were refused by our GOAWAY
        self._out = ffi.new("const char **")
        self._handle = ffi.new_handle(self)

        opt = ffi.new("nghttp2_option **")
        if lib.nghttp2_option_new(opt) != 0:
            raise MemoryError("nghttp2_option_new")
        opt = ffi.gc(opt[0], lib.nghttp2_option_del)
        lib.nghttp2_option_set_no_auto_window_update(opt, 1)
        lib.nghttp2_option_set_no_closed_streams(opt, 1)
        lib.nghttp2_option_set_max_deflate_dynamic_table_size(opt, config.max_encoder_table_size)
        lib.nghttp2_option_set_max_outbound_ack(opt, config.max_outbound_ack)
        lib.nghttp2_option_set_max_settings(opt, config.max_settings)
        lib.nghttp2_option_set_peer_max_concurrent_streams(opt, config.peer_max_concurrent_streams)
        if client:
            lib.nghttp2_option_set_max_reserved_remote_streams(opt, 0)
        if _ffi.HAS_STREAM_RESET_RATE_LIMIT:
            # A backstop at twice our own bucket: ours answers first, with ENHANCE_YOUR_CALM.
            lib.nghttp2_option_set_stream_reset_rate_limit(
                opt, 2 * config.reset_burst, max(1, int(2 * config.reset_rate)))
        self._count_continuations = not _ffi.HAS_MAX_CONTINUATIONS
        if not self._count_continuations:
            lib.nghttp2_option_set_max_continuations(opt, config.max_continuations)

        ptr = ffi.new("nghttp2_session **")
        new = lib.nghttp2_session_client_new2 if client else lib.nghttp2_session_server_new2
        rv = new(ptr, _CALLBACKS, self._handle, opt)
        if rv != 0:
            raise H2Error(f"nghttp2 session: {_ffi.strerror(rv)}")
        self._session = ffi.gc(ptr[0], lib.nghttp2_session_del)

        settings = [
            (_ffi.SETTINGS_MAX_HEADER_LIST_SIZE, config.max_header_list_size),
            (_ffi.SETTINGS_INITIAL_WINDOW_SIZE, config.initial_stream_window),
        ]
        if client:
            settings.append((_ffi.SETTINGS_ENABLE_PUSH, 0))
        else:
            settings.append((_ffi.SETTINGS_MAX_CONCURRENT_STREAMS, config.max_concurrent_streams))
        if config.header_table_size != 4096:
            settings.append((_ffi.SETTINGS_HEADER_TABLE_SIZE, config.header_table_size))
        iv = ffi.new("nghttp2_settings_entry[]", settings)
        self._check(lib.nghttp2_submit_settings(self._session, 0, iv, len(settings)))
        if config.connection_window > 65_535:
            self._check(lib.nghttp2_session_set_local_window_size(
                self._session, 0, 0, config.connection_window))

    # ---- bytes in, bytes out ----

    def feed(self, data: bytes | bytearray | memoryview) -> list:
        """Process bytes received from the peer; return the events they (and any earlier
        data_to_send) produced. H2Error means a bug of ours (an exception in a callback):
        close the connection."""
        if data:
            if data.__class__ is not bytes:  # bytearray / memoryview from a buffered protocol
                data = _from_buffer(_CHAR_ARRAY, data, False)
            rv = lib.nghttp2_session_mem_recv(self._session, data, len(data))
            if rv < 0:
                self._recv_failed(rv)
            if self._credit:
                self._give_back()
        events = self._events
        self._events = []
        return events

    def data_to_send(self) -> bytes:
        """Everything nghttp2 has to send now (frames, ACKs, WINDOW_UPDATEs)."""
        session = self._session
        out = self._out
        chunks = []
        while True:
            n = lib.nghttp2_session_mem_send(session, out)
            if n <= 0:
                if n < 0:
                    self._raise_callback_error(n)
                break
            chunks.append(ffi.buffer(out[0], n)[:])
        self._pings_unsent = self._settings_unsent = 0
        if self._credit:
            self._give_back()
            more = self.data_to_send() if lib.nghttp2_session_want_write(session) else b""
            chunks.append(more)
        return b"".join(chunks)

    def pop_events(self) -> list:
        """Events produced outside feed() (by data_to_send or calls): StreamWritable, closes."""
        events = self._events
        self._events = []
        return events

    # ---- starting streams ----

    def send_request(self, headers: Iterable[tuple[bytes, bytes]], end_stream: bool = True) -> int:
        """Client: open a stream with a request header section; return its stream id. Streams
        beyond the peer's SETTINGS_MAX_CONCURRENT_STREAMS wait in nghttp2 until one closes."""
        if self._server:
            raise H2Error("send_request on a server session")
        nva = _Nva(headers)
        sid = lib.nghttp2_submit_request(
            self._session, _NULL, nva.array, nva.count, _NULL if end_stream else _PROVIDER, _NULL)
        if sid < 0:
            raise H2Error(f"send_request: {_ffi.strerror(sid)}")
        st = _Stream(sid, 0.0, not end_stream)
        st.send_end = end_stream
        self._streams[sid] = st
        self._next_own_stream = sid + 2
        return sid

    def send_response(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]],
                      end_stream: bool = False) -> None:
        """Server: the final response header section of a received request."""
        st = self._stream_for_send(stream_id)
        if st is None:
            return
        nva = _Nva(headers)
        rv = lib.nghttp2_submit_response(
            self._session, stream_id, nva.array, nva.count, _NULL if end_stream else _PROVIDER)
        if rv < 0:
            raise H2Error(f"send_response on stream {stream_id}: {_ffi.strerror(rv)}")
        st.can_send = not end_stream
        st.send_end = end_stream

    def send_informational(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Server: a 1xx response (e.g. 100 Continue) before the final one."""
        if self._stream_for_send(stream_id) is None:
            return
        nva = _Nva(headers)
        rv = lib.nghttp2_submit_headers(self._session, 0, stream_id, _NULL, nva.array, nva.count, _NULL)
        if rv < 0:
            raise H2Error(f"send_informational on stream {stream_id}: {_ffi.strerror(rv)}")

    # ---- body, trailers, end ----

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> bool:
        """Queue body bytes. Returns True while the caller may send more; False when the
        stream's queue reached max_send_buffer (a StreamWritable event follows once it drains)
        or the stream is gone (its StreamReset / StreamClosed event says so)."""
        st = self._streams.get(stream_id)
        if st is None or st.closing:
            return False
        if not st.can_send or st.send_end:
            raise H2Error(f"send_data on stream {stream_id} whose sending side has ended")
        if data:
            st.send_buf += data
        if end_stream:
            st.send_end = True
        if st.deferred:
            st.deferred = False
            lib.nghttp2_session_resume_data(self._session, stream_id)
        if len(st.send_buf) >= self._config.max_send_buffer:
            st.blocked = True
            return False
        return True

    def end_stream(self, stream_id: int) -> None:
        """End this side of the stream (an empty DATA frame with END_STREAM once queued bytes
        are out)."""
        self.send_data(stream_id, b"", end_stream=True)

    def send_trailers(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """End this side of the stream with a trailer section, after the queued body."""
        st = self._streams.get(stream_id)
        if st is None or st.closing:
            return
        if not st.can_send or st.send_end:
            raise H2Error(f"send_trailers on stream {stream_id} whose sending side has ended")
        st.trailers = _Nva(headers)
        st.send_end = True
        if st.deferred:
            st.deferred = False
            lib.nghttp2_session_resume_data(self._session, stream_id)

    def reset(self, stream_id: int, error_code: int = CANCEL) -> None:
        """RST_STREAM: abandon the stream both ways (StreamReset(remote=False) follows)."""
        st = self._streams.get(stream_id)
        if st is not None:
            st.closing = True
            st.send_buf.clear()
            st.trailers = None
        self._note_reset(stream_id)
        rv = lib.nghttp2_submit_rst_stream(self._session, 0, stream_id, error_code)
        if rv < 0:
            raise H2Error(f"reset of stream {stream_id}: {_ffi.strerror(rv)}")

    # ---- receive flow control ----

    def consume(self, stream_id: int, n: int) -> None:
        """The consumer is done with n bytes of this stream's DATA: let the peer send n more
        (WINDOW_UPDATE goes out once half a window is consumed, nghttp2's rule)."""
        st = self._streams.get(stream_id)
        if st is None or n <= 0:
            return  # a closed stream's bytes were already given back to the connection
        if n > st.unconsumed:
            n = st.unconsumed
        st.unconsumed -= n
        rv = lib.nghttp2_session_consume(self._session, stream_id, n)
        if rv < 0:
            raise H2Error(f"consume on stream {stream_id}: {_ffi.strerror(rv)}")

    # ---- the adapter's per-stream state ----

    def attach(self, stream_id: int, context) -> None:
        """Keep the adapter's object for this stream (its request, its upstream call...); it is
        dropped with the stream, so the adapter needs no map of its own to clean up."""
        st = self._streams.get(stream_id)
        if st is not None:
            st.context = context

    def context(self, stream_id: int):
        """The object attach()ed to the stream, or None once the stream is gone."""
        st = self._streams.get(stream_id)
        return st.context if st is not None else None

    def unconsumed(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        return st.unconsumed if st is not None else 0

    # ---- connection ----

    def update_settings(self, settings: dict[int, int]) -> None:
        """Send new SETTINGS (e.g. a lower SETTINGS_MAX_CONCURRENT_STREAMS under load); they apply
        once the peer acknowledges them (SettingsAcked)."""
        iv = ffi.new("nghttp2_settings_entry[]", list(settings.items()))
        self._check(lib.nghttp2_submit_settings(self._session, 0, iv, len(settings)))

    def ping(self, data: bytes = b"\0" * 8) -> None:
        """Send PING (keepalive); PingAcked(data) follows when the peer answers."""
        if len(data) != 8:
            raise H2Error("PING carries exactly 8 bytes")
        self._check(lib.nghttp2_submit_ping(self._session, 0, data))

    def shutdown_notice(self) -> None:
        """Server: the first GOAWAY of a graceful shutdown (stream id 2^31-1): the client stops
        opening streams; follow with goaway() after about one round trip."""
        self._check(lib.nghttp2_submit_shutdown_notice(self._session))

    def goaway(self, error_code: int = NO_ERROR, debug_data: bytes = b"") -> None:
        """GOAWAY naming the last stream this side processed: those streams finish, later ones
        are refused; the session is `closed` once no stream remains."""
        last = lib.nghttp2_session_get_last_proc_stream_id(self._session)
        self._check(lib.nghttp2_submit_goaway(
            self._session, 0, last, error_code, debug_data or _NULL, len(debug_data)))

    def terminate(self, error_code: int = NO_ERROR) -> None:
        """GOAWAY and stop: nothing more is processed once it is sent."""
        self._goaway_last_stream = min(self._goaway_last_stream, self._last_peer_stream)
        self._check(lib.nghttp2_session_terminate_session(self._session, error_code))

    @property
    def closed(self) -> bool:
        """Nothing more to read or write: close the transport (after writing data_to_send)."""
        s = self._session
        return not lib.nghttp2_session_want_read(s) and not lib.nghttp2_session_want_write(s)

    @property
    def last_error(self) -> str:
        """nghttp2's own words about the last connection error it found (for a log line; the
        bounded reason is in PeerMisbehaved)."""
        return self._last_error

    @property
    def accepts_requests(self) -> bool:
        """Client: a new request may go out on this connection (no GOAWAY received, not
        closing, stream ids left). One sent anyway ends with StreamReset(REFUSED_STREAM)."""
        return bool(lib.nghttp2_session_check_request_allowed(self._session))

    @property
    def want_write(self) -> bool:
        return bool(lib.nghttp2_session_want_write(self._session))

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def stream_is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def remote_max_concurrent_streams(self) -> int:
        return lib.nghttp2_session_get_remote_settings(self._session, _ffi.SETTINGS_MAX_CONCURRENT_STREAMS)

    def send_window(self, stream_id: int = 0) -> int:
        """Bytes the peer lets us send now: on the connection (0), or on the stream, which is
        also bound by the connection window."""
        conn = lib.nghttp2_session_get_remote_window_size(self._session)
        if stream_id == 0:
            return conn
        return max(0, min(conn, lib.nghttp2_session_get_stream_remote_window_size(self._session, stream_id)))

    def send_buffered(self, stream_id: int) -> int:
        """Bytes queued by send_data and not yet framed."""
        st = self._streams.get(stream_id)
        return len(st.send_buf) if st is not None else 0

    def recv_window(self, stream_id: int = 0) -> int:
        """Bytes the peer may still send us: on the connection (0), or on the stream, which is
        also bound by the connection window."""
        conn = lib.nghttp2_session_get_local_window_size(self._session)
        if stream_id == 0:
            return conn
        return max(0, min(conn, lib.nghttp2_session_get_stream_local_window_size(self._session, stream_id)))

    @property
    def hpack_decoder_table_size(self) -> int:
        return lib.nghttp2_session_get_hd_inflate_dynamic_table_size(self._session)

    @property
    def hpack_encoder_table_size(self) -> int:
        return lib.nghttp2_session_get_hd_deflate_dynamic_table_size(self._session)

    # ---- inside callbacks ----

    def _headers_frame(self, frame, sid: int, end: bool) -> None:
        hdrs = self._hdrs
        self._hdrs = []
        if self._server:
            st = self._streams.get(sid)
            trailers = frame.headers.cat != _ffi.HCAT_REQUEST
            if end and st is not None:
                st.remote_ended = True
            if st is not None:
                st.reported = True
            if self._hdr_size > self._max_header_list_size:
                self._events.append(HeaderListTooLarge(sid, end, trailers))
            elif trailers:
                self._events.append(TrailersReceived(sid, hdrs))
            else:
                self._events.append(RequestReceived(sid, hdrs, end))
            return
        st = self._streams.get(sid)
        if st is None:
            return
        if end:
            st.remote_ended = True
        if self._hdr_size > self._max_header_list_size:
            self._events.append(HeaderListTooLarge(sid, end, st.response_received))
        elif st.response_received:
            self._events.append(TrailersReceived(sid, hdrs))
        elif hdrs and hdrs[0][1][:1] == b"1":
            self._events.append(InformationalResponseReceived(sid, hdrs))
        else:
            st.response_received = True
            self._events.append(ResponseReceived(sid, hdrs, end))

    def _response_ended(self, sid: int) -> None:
        """The response is complete while the request is not: ask the client to stop sending
        with RST_STREAM(NO_ERROR) (RFC 9113 §8.1), rather than hold the stream, and its share of
        the stream limit, open until the upload ends."""
        st = self._streams.get(sid)
        if st is not None and not st.remote_ended and not st.closing:
            st.closing = True
            self._note_reset(sid)
            lib.nghttp2_submit_rst_stream(self._session, 0, sid, NO_ERROR)

    def _control_frame(self, frame, t: int, hd) -> None:
        if t == _ffi.RST_STREAM:
            st = self._streams.get(hd.stream_id)
            if st is not None:
                st.reset_by_peer = True
            if self._server:
                self._peer_reset(st)
        elif t == _ffi.SETTINGS:
            if hd.flags & _ffi.FLAG_ACK:
                self._events.append(SettingsAcked())
            else:
                self._settings_unsent += 1
                iv = frame.settings.iv
                self._events.append(RemoteSettingsChanged(
                    {iv[i].settings_id: iv[i].value for i in range(frame.settings.niv)}))
        elif t == _ffi.PING:
            if hd.flags & _ffi.FLAG_ACK:
                self._events.append(PingAcked(bytes(ffi.buffer(frame.ping.opaque_data, 8))))
            else:
                self._pings_unsent += 1
        elif t == _ffi.GOAWAY:
            g = frame.goaway
            debug = ffi.buffer(g.opaque_data, g.opaque_data_len)[:] if g.opaque_data_len else b""
            self._events.append(GoAwayReceived(g.error_code, g.last_stream_id, debug))

    def _peer_reset(self, st: _Stream | None) -> None:
        """Rapid reset (CVE-2023-44487): Envoy's premature-reset ratio and a token bucket."""
        cfg = self._config
        now = self._clock()
        if st is not None and now - st.opened_at < cfg.premature_reset_lifetime:
            self._premature_resets += 1
        calm = (self._streams_opened >= cfg.premature_reset_min_streams
                and self._premature_resets * 2 > self._streams_opened)
        if not calm:
            calm = not self._take_reset_token(now)
        if calm:
            self._misbehaved("rapid_reset", 0, ENHANCE_YOUR_CALM)
            lib.nghttp2_session_terminate_session(self._session, ENHANCE_YOUR_CALM)

    def _take_reset_token(self, now: float) -> bool:
        cfg = self._config
        tokens = self._reset_tokens + (now - self._reset_refilled_at) * cfg.reset_rate
        self._reset_refilled_at = now
        tokens = min(tokens, float(cfg.reset_burst)) - 1.0
        self._reset_tokens = tokens
        return tokens >= 0.0

    def _invalid_frame(self, frame, lib_error: int) -> None:
        """nghttp2 refuses a frame: a stream error (RST_STREAM follows) or, when it then ends
        the session, a connection error (GOAWAY follows). Which one shows when the frame goes
        out, so the reason is kept until then (_sent_error_frame)."""
        sid = frame.hd.stream_id
        reason = _LIB_REASON.get(lib_error, "protocol_error")
        if (reason == "protocol_error" and self._server and frame.hd.type == _HEADERS
                and len(self._streams) >= lib.nghttp2_session_get_local_settings(
                    self._session, _ffi.SETTINGS_MAX_CONCURRENT_STREAMS)):
            reason = "max_concurrent_streams"
        self._last_invalid = (reason, _LIB_CODE.get(lib_error, INTERNAL_ERROR))
        if sid:
            pending = self._invalid_streams
            pending[sid] = reason
            if len(pending) > 1024:
                del pending[next(iter(pending))]
            self._note_reset(sid)
            # Stream errors the peer causes cost it a reset token, as in hyper's
            # max_local_error_reset_streams (RUSTSEC-2024-0003): they make us send RST_STREAM.
            if self._server and not self._terminated and not self._take_reset_token(self._clock()):
                self._misbehaved("rapid_reset", 0, ENHANCE_YOUR_CALM)
                lib.nghttp2_session_terminate_session(self._session, ENHANCE_YOUR_CALM)

    def _sent_error_frame(self, frame, t: int) -> None:
        """A GOAWAY or RST_STREAM goes out: report the refusal it carries, with its reason."""
        if t == _ffi.GOAWAY:
            g = frame.goaway
            if g.last_stream_id < self._goaway_last_stream:
                self._goaway_last_stream = g.last_stream_id
            code = g.error_code
            if code == NO_ERROR or self._terminated:
                return  # ours (goaway/terminate), or already reported
            last = self._last_invalid
            if last is not None and last[1] == code:
                reason = last[0]
            else:  # a connection error nghttp2 found without an invalid-frame callback
                reason = _CODE_REASON.get(code, "protocol_error")
            self._misbehaved(reason, 0, code)
            return
        code = frame.rst_stream.error_code
        sid = frame.hd.stream_id
        reason = self._invalid_streams.pop(sid, None)
        if reason is None:
            if sid in self._reset_ids or code not in _CODE_REASON:
                return  # reset() by the caller
            # A stream error nghttp2 found without an invalid-frame callback (e.g. DATA beyond
            # the stream window).
            reason = _CODE_REASON[code]
            self._note_reset(sid)
        if self._last_invalid is not None and self._last_invalid[0] == reason:
            self._last_invalid = None
        self._events.append(PeerMisbehaved(reason, sid, code))

    def _note_reset(self, sid: int) -> None:
        ids = self._reset_ids
        ids[sid] = None
        if len(ids) > 4096:
            del ids[next(iter(ids))]

    def _misbehaved(self, reason: str, sid: int, code: int) -> None:
        if sid == 0:
            if self._terminated:
                return
            self._terminated = True
        self._events.append(PeerMisbehaved(reason, sid, code))

    # ---- helpers ----

    def _recv_failed(self, rv: int) -> None:
        """mem_recv refused the input as a whole: floods and CONTINUATION abuse end here."""
        if self._violation is not None:
            reason, code = self._violation
        elif rv == _ffi.ERR_CALLBACK_FAILURE:
            self._raise_callback_error(rv)
        elif rv == _ffi.ERR_FLOODED:
            reason = "ping_flood" if self._pings_unsent >= self._settings_unsent else "settings_flood"
            code = ENHANCE_YOUR_CALM
        elif rv == _ffi.ERR_TOO_MANY_CONTINUATIONS:
            reason, code = "continuation_flood", ENHANCE_YOUR_CALM
        elif rv == _ffi.ERR_BAD_CLIENT_MAGIC:
            reason, code = "bad_preface", PROTOCOL_ERROR
        else:
            reason, code = _LIB_REASON.get(rv, "protocol_error"), PROTOCOL_ERROR
        self._misbehaved(reason, 0, code)
        # nghttp2 stops reading after a fatal error; say why on the wire when we still can.
        lib.nghttp2_session_terminate_session(self._session, code)

    def _give_back(self) -> None:
        credit, self._credit = self._credit, 0
        lib.nghttp2_session_consume_connection(self._session, credit)

    def _stream_for_send(self, stream_id: int) -> _Stream | None:
        if not self._server:
            raise H2Error("responses are sent by server sessions")
        return self._streams.get(stream_id)

    def _check(self, rv: int) -> None:
        if rv < 0:
            raise H2Error(_ffi.strerror(rv))

    def _raise_callback_error(self, rv: int) -> None:
        if _callback_errors:
            exc = _callback_errors.pop()
            _callback_errors.clear()
            raise H2Error(f"nghttp2 callback failed: {exc!r}") from exc
        raise H2Error(f"nghttp2: {_ffi.strerror(rv)}")
