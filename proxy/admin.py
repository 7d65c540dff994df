"""The proxy's admin server (port 4191): /live, /ready, /metrics, and /shutdown.

/shutdown follows Linkerd (linkerd-facts §7): it exists only when enabled by
configuration (TULLE_PROXY_SHUTDOWN_ENDPOINT), answers only requests from loopback, and
only POST. A Job's last container calls it so the proxy exits with the job.
"""

from __future__ import annotations

from typing import Callable

from tulle.admin import AdminRequest, AdminResponse, AdminServer
from tulle.metrics import Registry


def make_admin(host: str, port: int, *, ready: Callable[[], bool], registry: Registry, shutdown_enabled: bool,
               on_shutdown: Callable[[], None], max_connections: int = 64) -> AdminServer:
    admin = AdminServer(host, port, ready=ready, registry=registry, max_connections=max_connections)

    async def shutdown(req: AdminRequest) -> AdminResponse:
        if not shutdown_enabled:
            return AdminResponse(404, b"shutdown endpoint is not enabled\n")
        if not req.from_loopback:
            return AdminResponse(403, b"Requests are only permitted from localhost.\n")
        if req.method != "POST":
            return AdminResponse(405, b"method not allowed\n", headers={"allow": "POST"})
        on_shutdown()
        return AdminResponse(200, b"shutdown\n")

    admin.route("/shutdown", shutdown)
    return admin
