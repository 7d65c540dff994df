"""`kubectl port-forward`, in-process: a listener on 127.0.0.1 whose every connection is
carried to a pod's port through the API server's `pods/portforward` subresource, over the
official client's WebSocket transport (`kubernetes.stream.portforward`).

How linkerd's CLI reaches its control plane, and how ours reaches the cluster's NATS: no
Service needs exposing, and only someone the API server lets port-forward into the
control-plane namespace gets there.

    forward = PortForward(core_v1_api, "tulle", "tulle-nats-0", 4222).open()
    ... connect to 127.0.0.1:forward.port ...
    forward.close()

One WebSocket per connection (each carries one stream). The first is opened by `open()`
itself, so that a refusal (no such pod, not allowed) is an exception there rather than a
connection that silently closes later. Threads, because the client's port-forward is
blocking; the CLI's asyncio loop only sees a local TCP socket.
"""

from __future__ import annotations

import select
import socket
import threading
from typing import Any, Callable, Optional

BUFFER = 256 * 1024


class PortForwardError(Exception):
    """The API server refused the port-forward (the message says why, in one line)."""


class PortForward:
    def __init__(self, core_api: Any, namespace: str, pod: str, remote_port: int,
                 on_error: Optional[Callable[[str], None]] = None):
        self.api, self.namespace, self.pod, self.remote_port = core_api, namespace, pod, remote_port
        self.port = 0  # the local port, once open
        self.last_error = ""  # what the kubelet said when a stream could not reach the pod's port
        self.on_error = on_error  # called (from a thread) with last_error when a stream fails
        self._listener: Optional[socket.socket] = None
        self._spare: Any = None  # the first stream, opened by open() to surface refusals
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()

    def __str__(self) -> str:
        return f"pod {self.namespace}/{self.pod} port {self.remote_port}"

    def _dial(self) -> Any:
        from kubernetes.client import ApiException
        from kubernetes.stream import portforward

        try:
            return portforward(self.api.connect_get_namespaced_pod_portforward, self.pod, self.namespace,
                               ports=str(self.remote_port))
        except ApiException as e:
            raise PortForwardError(f"cannot port-forward to {self}: {_why(e)}") from None

    def open(self) -> "PortForward":
        self._spare = self._dial()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self._listener, self.port = listener, listener.getsockname()[1]
        threading.Thread(target=self._accept, name=f"port-forward {self}", daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                stream, self._spare = self._spare, None
            if stream is None:
                try:
                    stream = self._dial()
                except PortForwardError as e:
                    self._failed(str(e))
                    conn.close()
                    continue
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._bridge, args=(conn, stream), daemon=True).start()

    def _bridge(self, conn: socket.socket, stream: Any) -> None:
        """Copy bytes both ways until either side ends; then end both."""
        remote = stream.socket(self.remote_port)
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select([conn, remote], [], [], 1.0)
                for src in readable:
                    data = src.recv(BUFFER)
                    if not data:
                        return
                    (remote if src is conn else conn).sendall(data)
        except OSError:
            pass
        finally:
            error = (stream.error(self.remote_port) or "").strip()
            if error:
                self._failed(error.splitlines()[0])
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass
            _close_stream_end(remote)

    def _failed(self, why: str) -> None:
        self.last_error = why
        if self.on_error is not None:
            self.on_error(why)

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
            spare, self._spare = self._spare, None
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if spare is not None:
            _close_stream_end(spare.socket(self.remote_port))


def _close_stream_end(sock: Any) -> None:
    """Close our end of a stream's socket pair the way the client's proxy thread expects:
    say we are done writing, let it see that and close its end, then read what is left. A
    plain close() with unread bytes (the pod's greeting, e.g. NATS's INFO) resets the pair,
    and the client's thread dies on that with a traceback on stderr."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(2)
        while sock.recv(BUFFER):
            pass
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _why(e: Any) -> str:
    """The API server's reason from the client's ApiException (a refused WebSocket upgrade
    reads `Handshake status 403 Forbidden -+-+- {headers} -+-+- {Status JSON}`)."""
    import json
    import re

    text = str(getattr(e, "reason", "") or e)
    parts = [p.strip() for p in text.split("-+-+-")]
    m = re.match(r"Handshake status (\d+(?: [A-Za-z ]+)?)", parts[0])
    if m:
        body = parts[-1] if len(parts) > 2 else ""
        if body.startswith(("b'", 'b"')):
            body = body[2:-1].encode().decode("unicode_escape")
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        return m.group(1).strip() + (f": {message}" if message else "")
    m = re.search(r"\[Errno -?\d+\] ([^')\]]+)", text)
    return m.group(1) if m else (text.splitlines()[0] if text else type(e).__name__)
