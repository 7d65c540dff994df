"""Where a connection goes, and how to open it: plain TCP, or mTLS to a peer proxy.

A `Dest` is one dialable place: an address and port, the identity the server must
present ("" = plain TCP) and, for mTLS, the transport header to send first (target port
and protocol). Dialing mTLS uses the identity's *current* client context, so a renewed
certificate applies to new connections without a restart while old ones keep theirs.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Callable

from proxy import transport as tph
from tulle.pki import ALPN_PROXY, peer_identity


class DialError(Exception):
    """A connection that could not be opened; `reason` goes into tulle-proxy-error and metrics."""

    def __init__(self, reason: str, error: str = "connect"):
        super().__init__(reason)
        self.reason = reason
        self.error = error  # bounded metric label


class Dest:
    __slots__ = ("host", "port", "identity", "target_port", "protocol", "header", "key")

    def __init__(self, host: str, port: int, identity: str = "", target_port: int = 0, protocol: int = tph.HTTP1):
        self.host = host
        self.port = port
        self.identity = identity
        self.target_port = target_port or port
        self.protocol = protocol
        self.header = tph.encode(self.target_port, protocol) if identity else b""
        self.key = (host, port, identity, self.target_port, protocol)

    def __repr__(self) -> str:
        via = f" identity={self.identity} target_port={self.target_port}" if self.identity else ""
        return f"Dest({self.host}:{self.port}{via})"


class Buffering(asyncio.Protocol):
    """Holds what a fresh connection receives until its real protocol takes over."""

    def __init__(self):
        self.transport = None
        self.data = bytearray()
        self.eof = False
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data
        if len(self.data) > 65536:
            self.transport.pause_reading()

    def eof_received(self):
        self.eof = True
        return True

    def connection_lost(self, exc):
        self.lost = True


async def dial(dest: Dest, factory: Callable[[], asyncio.Protocol], client_context: Callable[[], ssl.SSLContext | None],
               timeout: float):
    """Open a connection to `dest`; with an identity, mTLS verified against exactly that identity.

    Returns (transport, protocol). Raises DialError.
    """
    loop = asyncio.get_running_loop()
    try:
        if not dest.identity:
            resolving = [False]
            try:
                return await asyncio.wait_for(_connect_plain(loop, factory, dest.host, dest.port, resolving), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                if resolving[0]:
                    raise DialError(f"cannot resolve {dest.host}: no answer in {timeout:g}s", "dns") from None
                raise
        ctx = client_context()
        if ctx is None:
            raise DialError("no client certificate yet", "no_identity")
        transport, protocol = await asyncio.wait_for(loop.create_connection(
            factory, dest.host, dest.port, ssl=ctx, server_hostname=dest.identity, ssl_handshake_timeout=timeout),
            timeout * 2)
    except DialError:
        raise
    except ssl.SSLCertVerificationError as e:
        raise DialError(f"server certificate not valid for {dest.identity}: {e.verify_message}", "tls_verify") from None
    except ssl.SSLError as e:
        raise DialError(f"tls handshake with {dest.host}:{dest.port} failed: {e.reason or e}", "tls") from None
    except ConnectionRefusedError:
        raise DialError(f"connection refused by {dest.host}:{dest.port}", "connect_refused") from None
    except (asyncio.TimeoutError, TimeoutError):
        raise DialError(f"connect to {dest.host}:{dest.port} timed out", "connect_timeout") from None
    except OSError as e:
        raise DialError(f"connect to {dest.host}:{dest.port} failed: {e.strerror or e}", "connect") from None
    ssl_object = transport.get_extra_info("ssl_object")
    got = peer_identity(ssl_object)
    if got != dest.identity:
        transport.abort()
        raise DialError(f"server presented {got!r}, expected {dest.identity}", "tls_identity")
    if ssl_object.selected_alpn_protocol() != ALPN_PROXY:
        transport.abort()
        raise DialError(f"{dest.host}:{dest.port} is not a tulle proxy (no ALPN {ALPN_PROXY})", "tls_alpn")
    transport.write(dest.header)  # first thing on the wire: target port and protocol
    return transport, protocol


async def _connect_plain(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], host: str,
                         port: int, resolving: list[bool]):
    """Resolve (when `host` is a name), then connect to each address in turn.

    The loop's own create_connection waits on its name lookup in a way that, when the
    connect timeout cancels it, leaves the lookup's failure unretrieved ("Future exception
    was never retrieved ... gaierror" in the log). Resolving here, as a task of our own whose
    outcome is always collected, keeps a slow or failing DNS a clean DialError.
    """
    if _is_address(host):
        return await loop.create_connection(factory, host, port)
    lookup = asyncio.ensure_future(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    lookup.add_done_callback(_collect)
    resolving[0] = True
    try:
        infos = await lookup
    except socket.gaierror as e:
        raise DialError(f"cannot resolve {host}: {e.strerror or e}", "dns") from None
    resolving[0] = False
    error: OSError | None = None
    for *_, addr in infos:
        try:
            return await loop.create_connection(factory, addr[0], port)
        except OSError as e:
            error = e
    raise error or DialError(f"cannot resolve {host}: no address", "dns")


def _is_address(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return True
    except OSError:
        return False


def _collect(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
