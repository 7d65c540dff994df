"""cffi ABI-mode bindings to the system's libnghttp2.so.14: only the session API the proxy uses.

Declarations follow nghttp2.h of 1.52 (Debian bookworm's libnghttp2-14), written from the
header's documentation. ABI mode (ffi.dlopen) needs no compiler and no -dev package; struct
layouts below must match the header, so only structs whose fields we read are declared in
full. Pointer types differ from the header where it saves a conversion per call (`const char *`
for header names/values and DATA chunks, so `ffi.unpack` yields bytes); the ABI is the same.

Two limits arrived in Debian's security updates of 1.52 rather than upstream 1.52
(nghttp2_option_set_stream_reset_rate_limit: 1.52.0-1+deb12u1; set_max_continuations:
deb12u2); `HAS_*` say whether the loaded library has them, and session.py falls back to
its own counting when not.
"""
from __future__ import annotations

from cffi import FFI

from tulle.errors import UserError

SONAME = "libnghttp2.so.14"
DEBIAN_PACKAGE = "libnghttp2-14"
MIN_VERSION = 0x013400  # 1.52.0

ffi = FFI()
ffi.cdef(
    """
typedef struct nghttp2_session nghttp2_session;
typedef struct nghttp2_session_callbacks nghttp2_session_callbacks;
typedef struct nghttp2_option nghttp2_option;

typedef struct {
  int age;
  int version_num;
  const char *version_str;
  const char *proto_str;
} nghttp2_info;

typedef struct {
  uint8_t *name;
  uint8_t *value;
  size_t namelen;
  size_t valuelen;
  uint8_t flags;
} nghttp2_nv;

typedef struct {
  size_t length;
  int32_t stream_id;
  uint8_t type;
  uint8_t flags;
  uint8_t reserved;
} nghttp2_frame_hd;

typedef struct {
  int32_t stream_id;
  int32_t weight;
  uint8_t exclusive;
} nghttp2_priority_spec;

typedef struct { nghttp2_frame_hd hd; size_t padlen; } nghttp2_data;
typedef struct {
  nghttp2_frame_hd hd;
  size_t padlen;
  nghttp2_priority_spec pri_spec;
  nghttp2_nv *nva;
  size_t nvlen;
  int cat;
} nghttp2_headers;
typedef struct { nghttp2_frame_hd hd; nghttp2_priority_spec pri_spec; } nghttp2_priority;
typedef struct { nghttp2_frame_hd hd; uint32_t error_code; } nghttp2_rst_stream;
typedef struct { int32_t settings_id; uint32_t value; } nghttp2_settings_entry;
typedef struct { nghttp2_frame_hd hd; size_t niv; nghttp2_settings_entry *iv; } nghttp2_settings;
typedef struct {
  nghttp2_frame_hd hd;
  size_t padlen;
  nghttp2_nv *nva;
  size_t nvlen;
  int32_t promised_stream_id;
  uint8_t reserved;
} nghttp2_push_promise;
typedef struct { nghttp2_frame_hd hd; uint8_t opaque_data[8]; } nghttp2_ping;
typedef struct {
  nghttp2_frame_hd hd;
  int32_t last_stream_id;
  uint32_t error_code;
  uint8_t *opaque_data;
  size_t opaque_data_len;
  uint8_t reserved;
} nghttp2_goaway;
typedef struct { nghttp2_frame_hd hd; int32_t window_size_increment; uint8_t reserved; } nghttp2_window_update;
typedef struct { nghttp2_frame_hd hd; void *payload; } nghttp2_extension;

typedef union {
  nghttp2_frame_hd hd;
  nghttp2_data data;
  nghttp2_headers headers;
  nghttp2_priority priority;
  nghttp2_rst_stream rst_stream;
  nghttp2_settings settings;
  nghttp2_push_promise push_promise;
  nghttp2_ping ping;
  nghttp2_goaway goaway;
  nghttp2_window_update window_update;
  nghttp2_extension ext;
} nghttp2_frame;

typedef union { int fd; void *ptr; } nghttp2_data_source;
typedef ssize_t (*nghttp2_data_source_read_callback)(
    nghttp2_session *session, int32_t stream_id, char *buf, size_t length,
    uint32_t *data_flags, nghttp2_data_source *source, void *user_data);
typedef struct {
  nghttp2_data_source source;
  nghttp2_data_source_read_callback read_callback;
} nghttp2_data_provider;

typedef int (*nghttp2_on_frame_recv_callback)(nghttp2_session *session,
    const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_invalid_frame_recv_callback)(nghttp2_session *session,
    const nghttp2_frame *frame, int lib_error_code, void *user_data);
typedef int (*nghttp2_on_data_chunk_recv_callback)(nghttp2_session *session,
    uint8_t flags, int32_t stream_id, const char *data, size_t len, void *user_data);
typedef int (*nghttp2_on_frame_send_callback)(nghttp2_session *session,
    const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_frame_not_send_callback)(nghttp2_session *session,
    const nghttp2_frame *frame, int lib_error_code, void *user_data);
typedef int (*nghttp2_on_stream_close_callback)(nghttp2_session *session,
    int32_t stream_id, uint32_t error_code, void *user_data);
typedef int (*nghttp2_on_begin_headers_callback)(nghttp2_session *session,
    const nghttp2_frame *frame, void *user_data);
typedef int (*nghttp2_on_header_callback)(nghttp2_session *session,
    const nghttp2_frame *frame, const char *name, size_t namelen,
    const char *value, size_t valuelen, uint8_t flags, void *user_data);
typedef int (*nghttp2_on_begin_frame_callback)(nghttp2_session *session,
    const nghttp2_frame_hd *hd, void *user_data);
typedef int (*nghttp2_error_callback2)(nghttp2_session *session,
    int lib_error_code, const char *msg, size_t len, void *user_data);

int nghttp2_session_callbacks_new(nghttp2_session_callbacks **callbacks_ptr);
void nghttp2_session_callbacks_del(nghttp2_session_callbacks *callbacks);
void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *cbs, nghttp2_on_frame_recv_callback cb);
void nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(nghttp2_session_callbacks *cbs, nghttp2_on_invalid_frame_recv_callback cb);
void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *cbs, nghttp2_on_data_chunk_recv_callback cb);
void nghttp2_session_callbacks_set_on_frame_send_callback(nghttp2_session_callbacks *cbs, nghttp2_on_frame_send_callback cb);
void nghttp2_session_callbacks_set_on_frame_not_send_callback(nghttp2_session_callbacks *cbs, nghttp2_on_frame_not_send_callback cb);
void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *cbs, nghttp2_on_stream_close_callback cb);
void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *cbs, nghttp2_on_begin_headers_callback cb);
void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *cbs, nghttp2_on_header_callback cb);
void nghttp2_session_callbacks_set_on_begin_frame_callback(nghttp2_session_callbacks *cbs, nghttp2_on_begin_frame_callback cb);
void nghttp2_session_callbacks_set_error_callback2(nghttp2_session_callbacks *cbs, nghttp2_error_callback2 cb);

int nghttp2_option_new(nghttp2_option **option_ptr);
void nghttp2_option_del(nghttp2_option *option);
void nghttp2_option_set_no_auto_window_update(nghttp2_option *option, int val);
void nghttp2_option_set_peer_max_concurrent_streams(nghttp2_option *option, uint32_t val);
void nghttp2_option_set_max_reserved_remote_streams(nghttp2_option *option, uint32_t val);
void nghttp2_option_set_max_send_header_block_length(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_deflate_dynamic_table_size(nghttp2_option *option, size_t val);
void nghttp2_option_set_no_closed_streams(nghttp2_option *option, int val);
void nghttp2_option_set_max_outbound_ack(nghttp2_option *option, size_t val);
void nghttp2_option_set_max_settings(nghttp2_option *option, size_t val);
void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *option, uint64_t burst, uint64_t rate);
void nghttp2_option_set_max_continuations(nghttp2_option *option, size_t val);

int nghttp2_session_client_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data, const nghttp2_option *option);
int nghttp2_session_server_new2(nghttp2_session **session_ptr,
    const nghttp2_session_callbacks *callbacks, void *user_data, const nghttp2_option *option);
void nghttp2_session_del(nghttp2_session *session);

ssize_t nghttp2_session_mem_send(nghttp2_session *session, const char **data_ptr);
ssize_t nghttp2_session_mem_recv(nghttp2_session *session, const char *in, size_t inlen);
int nghttp2_session_resume_data(nghttp2_session *session, int32_t stream_id);
int nghttp2_session_want_read(nghttp2_session *session);
int nghttp2_session_want_write(nghttp2_session *session);
void *nghttp2_session_get_stream_user_data(nghttp2_session *session, int32_t stream_id);
int nghttp2_session_set_stream_user_data(nghttp2_session *session, int32_t stream_id, void *stream_user_data);
size_t nghttp2_session_get_outbound_queue_size(nghttp2_session *session);
int32_t nghttp2_session_get_stream_effective_recv_data_length(nghttp2_session *session, int32_t stream_id);
int32_t nghttp2_session_get_stream_local_window_size(nghttp2_session *session, int32_t stream_id);
int32_t nghttp2_session_get_effective_recv_data_length(nghttp2_session *session);
int32_t nghttp2_session_get_local_window_size(nghttp2_session *session);
int32_t nghttp2_session_get_stream_remote_window_size(nghttp2_session *session, int32_t stream_id);
int32_t nghttp2_session_get_remote_window_size(nghttp2_session *session);
int nghttp2_session_get_stream_local_close(nghttp2_session *session, int32_t stream_id);
int nghttp2_session_get_stream_remote_close(nghttp2_session *session, int32_t stream_id);
size_t nghttp2_session_get_hd_inflate_dynamic_table_size(nghttp2_session *session);
size_t nghttp2_session_get_hd_deflate_dynamic_table_size(nghttp2_session *session);
int nghttp2_session_terminate_session(nghttp2_session *session, uint32_t error_code);
int nghttp2_submit_shutdown_notice(nghttp2_session *session);
uint32_t nghttp2_session_get_remote_settings(nghttp2_session *session, int id);
uint32_t nghttp2_session_get_local_settings(nghttp2_session *session, int id);
int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *session);
uint32_t nghttp2_session_get_next_stream_id(nghttp2_session *session);
int nghttp2_session_check_request_allowed(nghttp2_session *session);
int nghttp2_session_consume(nghttp2_session *session, int32_t stream_id, size_t size);
int nghttp2_session_consume_connection(nghttp2_session *session, size_t size);
int nghttp2_session_set_local_window_size(nghttp2_session *session, uint8_t flags, int32_t stream_id, int32_t window_size);

int32_t nghttp2_submit_request(nghttp2_session *session, const nghttp2_priority_spec *pri_spec,
    const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd, void *stream_user_data);
int nghttp2_submit_response(nghttp2_session *session, int32_t stream_id,
    const nghttp2_nv *nva, size_t nvlen, const nghttp2_data_provider *data_prd);
int nghttp2_submit_trailer(nghttp2_session *session, int32_t stream_id, const nghttp2_nv *nva, size_t nvlen);
int32_t nghttp2_submit_headers(nghttp2_session *session, uint8_t flags, int32_t stream_id,
    const nghttp2_priority_spec *pri_spec, const nghttp2_nv *nva, size_t nvlen, void *stream_user_data);
int nghttp2_submit_data(nghttp2_session *session, uint8_t flags, int32_t stream_id, const nghttp2_data_provider *data_prd);
int nghttp2_submit_rst_stream(nghttp2_session *session, uint8_t flags, int32_t stream_id, uint32_t error_code);
int nghttp2_submit_settings(nghttp2_session *session, uint8_t flags, const nghttp2_settings_entry *iv, size_t niv);
int nghttp2_submit_ping(nghttp2_session *session, uint8_t flags, const uint8_t *opaque_data);
int nghttp2_submit_goaway(nghttp2_session *session, uint8_t flags, int32_t last_stream_id,
    uint32_t error_code, const uint8_t *opaque_data, size_t opaque_data_len);

nghttp2_info *nghttp2_version(int least_version);
const char *nghttp2_strerror(int lib_error_code);
int nghttp2_is_fatal(int lib_error_code);
"""
)


def _load():
    try:
        lib = ffi.dlopen(SONAME)
    except OSError:
        raise UserError(
            f"HTTP/2 needs {SONAME}, which is not installed: install the Debian package "
            f"{DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE})"
        ) from None
    info = lib.nghttp2_version(0)
    if info == ffi.NULL or info.version_num < MIN_VERSION:
        found = ffi.string(info.version_str).decode() if info != ffi.NULL else "unknown"
        raise UserError(
            f"HTTP/2 needs nghttp2 >= 1.52 but {SONAME} is {found}: upgrade the Debian package "
            f"{DEBIAN_PACKAGE}"
        )
    return lib, ffi.string(info.version_str).decode()


def _has(lib, name: str) -> bool:
    """True when the loaded library exports `name` (cffi raises on first use otherwise)."""
    try:
        getattr(lib, name)
    except AttributeError:
        return False
    return True


lib, VERSION = _load()
HAS_STREAM_RESET_RATE_LIMIT = _has(lib, "nghttp2_option_set_stream_reset_rate_limit")
HAS_MAX_CONTINUATIONS = _has(lib, "nghttp2_option_set_max_continuations")

# Frame types (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Frame flags.
FLAG_NONE = 0
FLAG_END_STREAM = 0x01
FLAG_ACK = 0x01
FLAG_END_HEADERS = 0x04
# nghttp2_headers_category.
HCAT_REQUEST, HCAT_RESPONSE, HCAT_PUSH_RESPONSE, HCAT_HEADERS = range(4)
# nghttp2_data_flag.
DATA_FLAG_EOF = 0x01
DATA_FLAG_NO_END_STREAM = 0x02
# SETTINGS identifiers (RFC 9113 §6.5.2).
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
# Library error codes (negative; nghttp2_error).
ERR_INVALID_ARGUMENT = -501
ERR_PROTO = -505
ERR_DEFERRED = -508
ERR_STREAM_ID_NOT_AVAILABLE = -509
ERR_STREAM_CLOSED = -510
ERR_STREAM_CLOSING = -511
ERR_STREAM_SHUT_WR = -512
ERR_INVALID_STREAM_ID = -513
ERR_INVALID_STREAM_STATE = -514
ERR_DATA_EXIST = -529
ERR_START_STREAM_NOT_ALLOWED = -516
ERR_GOAWAY_ALREADY_SENT = -517
ERR_INVALID_STATE = -519
ERR_TEMPORAL_CALLBACK_FAILURE = -521
ERR_FRAME_SIZE_ERROR = -522
ERR_HEADER_COMP = -523
ERR_FLOW_CONTROL = -524
ERR_SESSION_CLOSING = -530
ERR_HTTP_HEADER = -531
ERR_HTTP_MESSAGING = -532
ERR_REFUSED_STREAM = -533
ERR_SETTINGS_EXPECTED = -536
ERR_TOO_MANY_SETTINGS = -537
ERR_CALLBACK_FAILURE = -902
ERR_BAD_CLIENT_MAGIC = -903
ERR_FLOODED = -904
ERR_TOO_MANY_CONTINUATIONS = -905  # Debian's backport of the CVE-2024-28182 fix


def strerror(code: int) -> str:
    return ffi.string(lib.nghttp2_strerror(code)).decode()
