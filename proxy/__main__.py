"""python -m proxy — the data-plane proxy, configured by environment (proxy/config.py)."""

import sys

# Optional extras that libraries import when they are installed and the proxy never uses
# (nats-py's websocket transport needs aiohttp; structlog's pretty tracebacks use rich, its
# thread-local shim greenlet). Together they are ~20 MB of memory in every proxy; without
# them the libraries fall back.
OPTIONAL_EXTRAS = ("aiohttp", "rich", "greenlet")
for _name in OPTIONAL_EXTRAS:
    sys.modules.setdefault(_name, None)

from tulle.errors import UserError  # noqa: E402

try:
    from proxy.app import main  # loads libnghttp2: a missing library is one line, not a traceback
except UserError as e:
    print(f"tulle proxy: {e}", file=sys.stderr)
    sys.exit(e.exit_code)

if __name__ == "__main__":
    main()
