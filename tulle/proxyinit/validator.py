"""The network validator (CNI mode's init container, as linkerd-network-validator):
before the app starts, prove that the pod's outgoing connections are redirected to
the proxy's outbound port. It listens on that port itself (the proxy is not running
yet), connects to an address nothing answers on, and expects the connection to land
on its own listener with that address as the original destination."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass

SO_ORIGINAL_DST = 80


@dataclass(frozen=True)
class Result:
    ok: bool
    message: str


def _addr(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag}: expected host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def validate(connect_addr: str, listen_addr: str, timeout_s: float) -> Result:
    target = _addr(connect_addr, "--connect-addr")
    listen = _addr(listen_addr, "--listen-addr")
    token = os.urandom(16)
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(listen)
        except OSError as e:
            return Result(False, f"cannot listen on {listen_addr}: {e.strerror or e}")
        server.listen(4)
        server.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        deadline = time.monotonic() + timeout_s
        try:
            client.connect_ex(target)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return Result(False, f"connections to {connect_addr} were not redirected to {listen_addr} "
                                         f"within {timeout_s:g}s: the pod's iptables rules are missing "
                                         "(is the tulle-cni plugin installed and chained on this node?)")
                readable, _, _ = select.select([server], [], [], min(left, 0.2))
                if not readable:
                    continue
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(max(deadline - time.monotonic(), 0.5))
                    try:
                        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
                        port, ip = struct.unpack("!2xH4s8x", raw)
                        original = (socket.inet_ntoa(ip), port)
                    except OSError:
                        original = None
                    if original != target:
                        continue  # something else reached the port: keep waiting for ours
                    client.setblocking(True)
                    client.settimeout(max(deadline - time.monotonic(), 0.5))
                    client.sendall(token)
                    if conn.recv(len(token)) != token:
                        return Result(False, "a connection reached the listener but carried other bytes")
                    return Result(True, f"connections to {connect_addr} are redirected to {listen_addr}")
        except OSError as e:
            return Result(False, f"connecting to {connect_addr} failed ({e.strerror or e}) instead of being "
                                 f"redirected to {listen_addr}: the pod's iptables rules are missing")
        finally:
            client.close()
