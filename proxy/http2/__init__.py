"""HTTP/2 for the proxy: nghttp2 through the project's own cffi bindings (`_ffi`), wrapped as a
sans-I/O session per connection side (`session.H2Session`) that reports `events`."""
from proxy.http2.events import *  # noqa: F401,F403
from proxy.http2.session import DEFAULT_CONFIG, H2Config, H2Error, H2Session  # noqa: F401
