"""Helpers shared by the identity tests: issuer folders, token files, the identity service
in-process or as a real `python -m services.identity` process, and TLS echo endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509

from services.identity.ca import CertificateAuthority
from services.identity.server import IdentityServer
from services.identity.sources import DirIssuerSource
from services.identity.tokens import LocalTokenVerifier
from tests.bus_support import AUDIENCE, bus_for, server_for
from tests.conftest import eventually
from tests.service_process import ServiceProcess
from tulle import pki, schemas
from tulle.bus import Bus
from tulle.metrics import Registry


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


@dataclass
class IssuerDir:
    path: Path
    anchor: pki.CA
    issuer: pki.CA

    def rotate(self, issuer: Optional[pki.CA] = None) -> pki.CA:
        """A new issuer under the same anchor, written over the old files."""
        self.issuer = issuer or pki.new_issuer(self.anchor)
        atomic_write(self.path / "issuer.key", self.issuer.key_pem, 0o600)
        atomic_write(self.path / "issuer.crt", self.issuer.cert_pem)
        return self.issuer


def make_issuer_dir(path: Path, anchor: Optional[pki.CA] = None, *, extra_anchors: tuple[pki.CA, ...] = ()) -> IssuerDir:
    path.mkdir(parents=True, exist_ok=True)
    anchor = anchor or pki.new_trust_anchor()
    issuer = pki.new_issuer(anchor)
    atomic_write(path / "ca.crt", anchor.cert_pem + b"".join(a.cert_pem for a in extra_anchors))
    atomic_write(path / "issuer.key", issuer.key_pem, 0o600)
    atomic_write(path / "issuer.crt", issuer.cert_pem)
    return IssuerDir(path, anchor, issuer)


def token_secret(path: Path, secret: Optional[bytes] = None) -> bytes:
    """Write a token secret (a new one, or `secret`: pass the test NATS server's so that
    the same workload token logs a proxy onto the bus and certifies it)."""
    secret = secret or pki.new_token_secret()
    atomic_write(path, secret, 0o600)
    return secret


def local_token(secret: bytes, namespace: str, serviceaccount: str, workload: Optional[str] = None, *,
                audience: str = AUDIENCE, lifetime_s: float = 3600) -> str:
    """A local-mode workload token (the workload defaults to the service account's name)."""
    return pki.make_local_token(secret, namespace, serviceaccount, workload or serviceaccount, audience,
                                lifetime_s=lifetime_s)


def token_file(path: Path, secret: bytes, namespace: str, serviceaccount: str, workload: Optional[str] = None) -> str:
    atomic_write(path, local_token(secret, namespace, serviceaccount, workload).encode(), 0o600)
    return str(path)


@contextlib.asynccontextmanager
async def identity_in_process(nats_url: str, issuer_dir: Optional[Path] = None, secret: Optional[bytes] = None, *,
                              verifier=None, source=None, concurrency: int = 1,
                              lifetime: dt.timedelta = dt.timedelta(hours=24),
                              clock_skew: dt.timedelta = dt.timedelta(seconds=20), watch_interval_s: float = 0.05,
                              limiter=None):
    """An IdentityServer with its own bus and registry, ready (trust bundle published).

    Local mode by default (issuer folder + HMAC secret); `verifier` / `source` replace either.
    """
    bus = bus_for(nats_url, "identity")
    await bus.start()
    ca = CertificateAuthority(None, lifetime=lifetime, clock_skew=clock_skew)
    if secret is None and verifier is None:
        secret = server_for(nats_url).token_secret  # the proxies' bus tokens then certify too
    server = IdentityServer(bus, ca, verifier or LocalTokenVerifier(secret, AUDIENCE),
                            source or DirIssuerSource(issuer_dir, interval_s=watch_interval_s),
                            concurrency=concurrency, registry=Registry(), limiter=limiter)
    task = asyncio.ensure_future(server.run())
    try:
        await eventually(lambda: server.ready or task.done(), what="identity server ready")
        if task.done():
            task.result()
        yield server
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()


def certified(server: IdentityServer, result: str = "ok") -> float:
    return server.m_certify[result].value


class IdentityProcess(ServiceProcess):
    """`python -m services.identity` as a real process, with its admin port."""

    def __init__(self, nats_url: str, issuer_dir: Optional[Path], secret_file: Optional[Path], log_file: Path, *extra: str,
                 env: Optional[dict] = None):
        args = list(extra)
        if issuer_dir is not None:
            args += ["--issuer-dir", str(issuer_dir), "--watch-interval", "0.1s"]
        if secret_file is not None:
            args += ["--token-secret-file", str(secret_file)]
        super().__init__("identity", nats_url, args, log_file, env)
        self.log_file = log_file


async def certify(bus: Bus, identity: str, token: str, csr: Optional[str] = None, *,
                  key=None, timeout: float = 5.0) -> schemas.CertifyResponse:
    if csr is None:
        csr = pki.new_csr(identity, key or pki.new_key()).decode()
    return await bus.request(schemas.CERTIFY_SUBJECT, schemas.CertifyRequest(identity, token, csr),
                             schemas.CertifyResponse, timeout=timeout)


def leaf_of(resp: schemas.CertifyResponse) -> x509.Certificate:
    return pki.load_certs(resp.leaf)[0]


# --- TLS endpoints ---------------------------------------------------------------------------


class EchoServer:
    """A TLS server that answers each line with `<peer identity or '-'> <line>`.

    Records handshakes it completed; a refused handshake never reaches the handler.
    """

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.accepted: list[Optional[str]] = []
        self.server: Optional[asyncio.AbstractServer] = None
        self.port = 0

    async def start(self) -> "EchoServer":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx,
                                                 ssl_handshake_timeout=5)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = pki.peer_identity(writer.get_extra_info("ssl_object"))
        self.accepted.append(peer)
        try:
            while line := await reader.readline():
                writer.write(f"{peer or '-'} ".encode() + line)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


async def tls_connect(port: int, ctx: ssl.SSLContext, expected_identity: str):
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=expected_identity), 5)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes = b"ping\n") -> bytes:
    """Send one line, return the answer (b'' when the peer closed instead)."""
    writer.write(line)
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), 5)


def server_cert(writer: asyncio.StreamWriter) -> x509.Certificate:
    return x509.load_der_x509_certificate(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
