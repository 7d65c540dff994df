"""python -m proxy — the data-plane proxy, configured by environment (proxy/config.py)."""

import sys

# Optional extras that libraries import when they are installed and the proxy never uses
# (nats-py's websocket transport needs aiohttp; structlog's pretty tracebacks use rich).
# Together they are ~20 MB of memory in every proxy; without them both libraries fall back.
for _name in ("aiohttp", "rich"):
    sys.modules.setdefault(_name, None)

from proxy.app import main  # noqa: E402

if __name__ == "__main__":
    main()
