"""What the demo apps share: JSON request logs, a small threaded HTTP/1.1 server, and
the `/debug/headers` endpoint that shows what a request arrived with (how you see the
`tulle-client-id` header the mesh adds).

Stdlib only, so the apps show that the mesh needs nothing from application code.
"""

from __future__ import annotations

import json
import os
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

APP = os.environ.get("TULLE_WORKLOAD") or os.path.splitext(os.path.basename(sys.argv[0]))[0]


def log(**fields) -> None:
    """One JSON line per event on stdout (the runner keeps it in the workload's log)."""
    line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "app": APP, **fields}
    print(json.dumps(line, separators=(",", ":")), flush=True)


def listen_address(port_name: str = "", default_port: int = 8080) -> tuple[str, int]:
    """HOST and PORT_<NAME> (or PORT) from the environment, as local mode sets them."""
    host = os.environ.get("HOST", "0.0.0.0")
    env = f"PORT_{port_name.upper().replace('-', '_')}" if port_name else "PORT"
    return host, int(os.environ.get(env) or os.environ.get("PORT") or default_port)


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive; subclasses implement `route(method, path) -> (status, body)`."""

    protocol_version = "HTTP/1.1"
    server_version = "demo"

    def route(self, method: str, path: str) -> tuple[int, object]:
        return 404, {"error": "not found"}

    def _handle(self) -> None:
        started = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        path = self.path.split("?", 1)[0]
        if path == "/ready":
            status, body = 200, {"ready": True}
        elif path == "/debug/headers":
            status, body = 200, {"app": APP, "headers": self.header_lists()}
        else:
            try:
                status, body = self.route(self.command, path)
            except Exception as e:  # a demo bug answers 500 and keeps serving
                status, body = 500, {"error": f"{type(e).__name__}: {e}"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        if path != "/ready":
            log(method=self.command, path=path, status=status, ms=round((time.monotonic() - started) * 1000, 1),
                client_id=self.headers.get("tulle-client-id"), peer=self.client_address[0])

    do_GET = do_POST = do_HEAD = _handle

    def header_lists(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            out.setdefault(name.lower(), []).append(value)
        return out

    def log_message(self, format, *args):  # the JSON line above replaces the default access log
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        # HTTPServer would look up its own name (getfqdn): a DNS query that hangs for
        # seconds where no resolver answers, as inside a local-mode namespace.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


def serve(handler: type[Handler], port_name: str = "", default_port: int = 8080) -> Server:
    host, port = listen_address(port_name, default_port)
    server = Server((host, port), handler)
    log(event="listening", address=f"{host}:{port}")
    return server
