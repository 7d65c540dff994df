"""Accepting connections ourselves, so their first bytes can be peeked at before anything
reads them (a TLS handshake must find the ClientHello still in the kernel buffer).

`Listener` accepts on a non-blocking socket from the loop's reader callback, at most
`max_connections` open at once (`OpenSockets`): one more is accepted and closed at once,
and counted. `Peeker`
waits for enough bytes with MSG_PEEK: readiness is level-triggered, so once a partial
prefix is there it polls with a short, growing delay instead of spinning. `adopt` hands
the socket to the loop (`connect_accepted_socket`, with TLS when asked).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections import OrderedDict
from typing import Any, Callable

from tulle.log import get_logger

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; the IPv6 one (IP6T_SO_ORIGINAL_DST) has the same value
PEEK_SIZE = 16384
EOF = object()
TIMEOUT = object()

log = get_logger(part="listener")


def original_dst(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client meant to connect before iptables redirected it (None when unknown)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntoa(raw[4:8]), port
    except OSError:
        return None  # no conntrack entry: the connection was not redirected


class OpenSockets:
    """Which accepted connections are still open, whatever became of them.

    An accepted socket goes many ways (detection, TLS, HTTP, a splice, a tunnel, an
    upgrade, closed at once), so instead of a hook in each, the listener remembers each
    socket's descriptor and inode and asks the kernel: a connection is open while its
    descriptor still refers to the same socket. Checked a few at a time on every accept,
    and all of them — at most every `full_check_s` — when the cap seems reached.
    """

    __slots__ = ("limit", "full_check_s", "open", "last_full", "clock")

    def __init__(self, limit: int, clock: Callable[[], float], full_check_s: float = 0.1):
        self.limit = limit
        self.full_check_s = full_check_s
        self.open: OrderedDict[int, int] = OrderedDict()  # fd -> inode, oldest first
        self.last_full = -1e9
        self.clock = clock

    def admit(self, sock: socket.socket) -> bool:
        """Count `sock` in, or False when `limit` connections are open already."""
        self._check(2)
        if len(self.open) >= self.limit:
            now = self.clock()
            if now - self.last_full >= self.full_check_s:
                self.last_full = now
                self._check(len(self.open))
            if len(self.open) >= self.limit:
                return False
        fd = sock.fileno()
        self.open.pop(fd, None)
        self.open[fd] = os.fstat(fd).st_ino
        return True

    def count(self) -> int:
        self._check(len(self.open))
        return len(self.open)

    def _check(self, n: int) -> None:
        """Look at the `n` oldest: forget the closed ones, move the open ones to the back."""
        opened = self.open
        for _ in range(min(n, len(opened))):
            fd, ino = opened.popitem(last=False)
            try:
                alive = os.fstat(fd).st_ino == ino
            except OSError:
                alive = False
            if alive:
                opened[fd] = ino


class Listener:
    def __init__(self, addr: tuple[str, int], on_socket: Callable[[socket.socket, tuple], None], *,
                 backlog: int = 1024, name: str = "", max_connections: int = 0,
                 on_refused: Callable[[], None] | None = None):
        self.addr = addr
        self.on_socket = on_socket
        self.backlog = backlog
        self.name = name
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_connections = max_connections  # 0: no cap
        self.on_refused = on_refused
        self.accepted: OpenSockets | None = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def start(self) -> None:
        host, port = self.addr
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        if self.max_connections:
            self.accepted = OpenSockets(self.max_connections, self._loop.time)
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        sock = self.sock
        for _ in range(64):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting for a moment instead of spinning.
                    log.warning("cannot accept", listener=self.name, error=e.strerror)
                    self._loop.remove_reader(sock.fileno())
                    self._loop.call_later(0.1, self._resume)
                return
            if self.accepted is not None and not self.accepted.admit(conn):
                # Over the cap: accepted and closed at once, so the client learns now rather
                # than waiting in the backlog.
                conn.close()
                if self.on_refused is not None:
                    self.on_refused()
                continue
            conn.setblocking(False)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            try:
                self.on_socket(conn, peer)
            except Exception:
                log.exception("accept handler failed", listener=self.name)
                conn.close()

    def _resume(self) -> None:
        if self.sock is not None:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting (connections already accepted go on)."""
        if self.sock is not None:
            try:
                self._loop.remove_reader(self.sock.fileno())
            except Exception:
                pass
            self.sock.close()
            self.sock = None


class Side:
    """What the inbound and outbound sides share: a listener and the connections it
    accepted, so that a graceful shutdown stops accepting, drains the HTTP connections
    and waits for the rest."""

    def __init__(self, addr: tuple[str, int], on_socket: Callable[[socket.socket, tuple], None], name: str, *,
                 max_connections: int = 0, on_refused: Callable[[], None] | None = None):
        self.listener = Listener(addr, on_socket, name=name, max_connections=max_connections, on_refused=on_refused)
        self.conns: set = set()  # HTTP/1 server connections (for timers and draining)
        self.splices: set = set()  # opaque pairs (tunnels, upgrades, TCP)
        self.tunnels = 0  # opaque connections being set up

    def start(self) -> None:
        self.listener.start()

    @property
    def busy(self) -> int:
        """Connections still open or being set up (graceful shutdown waits for them)."""
        return len(self.conns) + len(self.splices) + self.tunnels

    def stop_accepting(self) -> None:
        self.listener.close()

    def drain(self) -> None:
        for s in list(self.conns):
            s.drain()


class Peeker:
    """Peek at a socket until `judge(data)` returns a verdict (not None), EOF, or timeout.

    `done(verdict, data)` is called once: verdict is the judge's answer, EOF, or TIMEOUT.
    """

    __slots__ = ("loop", "sock", "fd", "judge", "done", "timer", "backoff", "reading", "finished")

    def __init__(self, sock: socket.socket, judge: Callable[[bytes], Any], done: Callable[[Any, bytes], None],
                 timeout: float):
        self.loop = asyncio.get_event_loop()
        self.sock = sock
        self.fd = sock.fileno()
        self.judge = judge
        self.done = done
        self.backoff = 0.001
        self.reading = False
        self.finished = False
        self.timer = self.loop.call_later(timeout, self._timeout)
        self._try()

    def _try(self) -> None:
        if self.finished:
            return
        try:
            data = self.sock.recv(PEEK_SIZE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            if not self.reading:
                self.reading = True
                self.loop.add_reader(self.fd, self._try)
            return
        except OSError:
            self._finish(EOF, b"")
            return
        if not data:
            self._finish(EOF, b"")
            return
        verdict = self.judge(data)
        if verdict is not None:
            self._finish(verdict, data)
            return
        # A prefix that cannot be judged yet: poll, since the socket stays readable.
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
        self.loop.call_later(self.backoff, self._try)
        self.backoff = min(self.backoff * 2, 0.05)

    def _timeout(self) -> None:
        if self.finished:
            return
        try:
            data = self.sock.recv(PEEK_SIZE, socket.MSG_PEEK)
        except OSError:
            data = b""
        self._finish(TIMEOUT, data)

    def _finish(self, verdict: Any, data: bytes) -> None:
        self.finished = True
        self.timer.cancel()
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.fd)
        self.done(verdict, data)


def adopt(sock: socket.socket, factory: Callable[[], asyncio.Protocol], *, ssl=None,
          handshake_timeout: float | None = None, on_error: Callable[[BaseException], None] | None = None) -> None:
    """Give an accepted socket to the loop as a transport (TLS server side when `ssl`)."""
    loop = asyncio.get_event_loop()
    kwargs = {"ssl": ssl, "ssl_handshake_timeout": handshake_timeout} if ssl is not None else {}
    task = loop.create_task(loop.connect_accepted_socket(factory, sock, **kwargs))

    def _done(t: asyncio.Task) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None and on_error is not None:
            on_error(exc)

    task.add_done_callback(_done)
