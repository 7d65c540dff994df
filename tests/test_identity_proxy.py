"""The proxy's side of identity against a real nats-server and real TLS handshakes:
certify, the TLS contexts, peer identities, refusals, renewal and trust-bundle rotation."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time

import pytest
from cryptography import x509

from proxy.identity import IdentityClient, peer_identity
from tests.bus_support import TESTER, bus_for, server_for
from tests.conftest import eventually
from tests.identity_support import (
    EchoServer, atomic_write, exchange, identity_in_process, make_issuer_dir, server_cert, tls_connect, token_file,
    token_secret,
)
from tulle import pki, schemas
from tulle.bus import Bus
from tulle.metrics import Registry
from tulle.schemas import identity_name

WEB = identity_name("web", "demo")
API = identity_name("api", "demo")


class Mesh:
    """One identity service (in-process) and the proxies' identity clients of a test."""

    def __init__(self, nats_url, tmp_path, stack: contextlib.AsyncExitStack):
        self.nats_url = nats_url
        self.tmp = tmp_path
        self.stack = stack
        self.issuer_dir = make_issuer_dir(tmp_path / "issuer")
        self.secret = server_for(nats_url).token_secret  # tokens good for certify and the bus alike
        self.server = None
        self.tasks: list[asyncio.Task] = []

    async def start_identity(self, **kw):
        self.server = await self.stack.enter_async_context(
            identity_in_process(self.nats_url, self.issuer_dir.path, self.secret, **kw))
        return self.server

    async def proxy(self, ns: str, sa: str, *, min_refresh_s: float = 10.0, start: bool = True,
                    anchors_pem: bytes | None = None) -> IdentityClient:
        bus = bus_for(self.nats_url, f"proxy:{ns}/{sa}")
        await bus.start()
        self.stack.push_async_callback(bus.close)
        client = IdentityClient(bus, identity=identity_name(sa, ns), min_refresh_s=min_refresh_s, registry=Registry(),
                                token_file=token_file(self.tmp / f"token-{ns}-{sa}", self.secret, ns, sa),
                                trust_anchors_pem=anchors_pem or self.issuer_dir.anchor.cert_pem)
        task = asyncio.ensure_future(client.run())
        self.tasks.append(task)
        if start:
            await asyncio.wait_for(client.wait_ready(), 15)
        return client

    async def close(self):
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def mesh(own_nats, tmp_path):
    async with contextlib.AsyncExitStack() as stack:
        m = Mesh(own_nats.url, tmp_path, stack)
        stack.push_async_callback(m.close)
        yield m


@pytest.fixture
async def servers():
    made: list[EchoServer] = []

    async def start(ctx):
        s = await EchoServer(ctx).start()
        made.append(s)
        return s

    yield start
    for s in made:
        await s.close()


def foreign_context(*, server: bool, identity: str, issuer: pki.CA, anchors_pem: bytes,
                    now: dt.datetime | None = None, lifetime=dt.timedelta(hours=1)) -> ssl.SSLContext:
    """A TLS context with a leaf this test makes itself (another anchor, expired ...)."""
    key = pki.new_key()
    csr = x509.load_pem_x509_csr(pki.new_csr(identity, key))
    leaf = pki.sign_leaf(issuer, csr, identity, lifetime=lifetime, now=now)
    return pki.ssl_context_from_pem(server=server, cert_chain_pem=pki.cert_pem(leaf) + issuer.cert_pem,
                                    key_pem_bytes=pki.key_pem(key), anchors_pem=anchors_pem)


async def refused_by_server(port: int, ctx: ssl.SSLContext, expected: str) -> bool:
    """True when the server ends the connection instead of answering (TLS 1.3 reports a
    refused client certificate after the client's side of the handshake)."""
    try:
        reader, writer = await tls_connect(port, ctx, expected)
        answer = await exchange(reader, writer)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return True
    writer.close()
    return answer == b""


async def test_two_proxies_complete_a_mutual_handshake_and_each_sees_the_other(mesh, servers):
    await mesh.start_identity()
    web, api = await mesh.proxy("demo", "web"), await mesh.proxy("demo", "api")
    server = await servers(web.listener_context())
    reader, writer = await tls_connect(server.port, api.client_context, WEB)
    assert await exchange(reader, writer) == f"{API} ping\n".encode()  # the server saw the client's identity
    assert peer_identity(writer.get_extra_info("ssl_object")) == WEB  # and the client the server's
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == pki.ALPN_PROXY
    writer.close()
    assert server.accepted == [API]
    assert web.ready and web.serial and web.trust_anchors_pem == mesh.issuer_dir.anchor.cert_pem
    assert web.m_expiry.labels().get() == web.expiry and web.m_refresh.labels().value == 1


async def test_the_plain_server_context_also_verifies_clients(mesh, servers):
    await mesh.start_identity()
    web, api = await mesh.proxy("demo", "web"), await mesh.proxy("demo", "api")
    server = await servers(web.server_context)
    reader, writer = await tls_connect(server.port, api.client_context, WEB)
    assert await exchange(reader, writer) == f"{API} ping\n".encode()
    writer.close()


async def test_a_client_without_a_certificate_connects_with_no_identity(mesh, servers):
    await mesh.start_identity()
    web = await mesh.proxy("demo", "web")
    server = await servers(web.listener_context())
    anonymous = ssl.create_default_context(cadata=web.trust_anchors_pem.decode())
    reader, writer = await tls_connect(server.port, anonymous, WEB)
    assert await exchange(reader, writer) == b"- ping\n"
    writer.close()


async def test_a_peer_certificate_from_another_trust_anchor_is_refused(mesh, servers):
    await mesh.start_identity()
    web = await mesh.proxy("demo", "web")
    stranger_issuer = pki.new_issuer(pki.new_trust_anchor())
    # A client with a foreign certificate (trusting our anchors) is refused by the server ...
    server = await servers(web.listener_context())
    intruder = foreign_context(server=False, identity=API, issuer=stranger_issuer, anchors_pem=web.trust_anchors_pem)
    assert await refused_by_server(server.port, intruder, WEB)
    assert server.accepted == []
    # ... and a server with a foreign certificate is refused by the client.
    impostor = await servers(foreign_context(server=True, identity=API, issuer=stranger_issuer,
                                             anchors_pem=web.trust_anchors_pem))
    with pytest.raises(ssl.SSLCertVerificationError):
        await tls_connect(impostor.port, web.client_context, API)
    assert impostor.accepted == []


async def test_an_expired_peer_certificate_is_refused(mesh, servers):
    await mesh.start_identity()
    web = await mesh.proxy("demo", "web")
    issuer = mesh.issuer_dir.issuer
    an_hour_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    expired = dict(issuer=issuer, anchors_pem=web.trust_anchors_pem, now=an_hour_ago - dt.timedelta(minutes=10),
                   lifetime=dt.timedelta(minutes=5))
    server = await servers(web.listener_context())
    assert await refused_by_server(server.port, foreign_context(server=False, identity=API, **expired), WEB)
    assert server.accepted == []
    stale = await servers(foreign_context(server=True, identity=API, **expired))
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        await tls_connect(stale.port, web.client_context, API)


async def test_a_server_with_another_identity_than_expected_is_refused(mesh, servers):
    await mesh.start_identity()
    web, api = await mesh.proxy("demo", "web"), await mesh.proxy("demo", "api")
    server = await servers(web.listener_context())
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await tls_connect(server.port, api.client_context, identity_name("db", "demo"))


async def test_a_proxy_is_ready_only_after_its_first_certificate_and_retries_until_identity_answers(mesh):
    web = await mesh.proxy("demo", "web", min_refresh_s=0.5, start=False)
    await eventually(lambda: web.attempts >= 2, what="certify retried while no identity service answers")
    assert not web.ready and web.server_context is None and web.client_context is None
    await mesh.start_identity()
    await asyncio.wait_for(web.wait_ready(), 15)
    assert web.ready and pki.cert_identity(pki.load_certs(web._chain_pem)[0]) == WEB


async def test_a_refused_certify_is_retried_and_leaves_the_proxy_unready(mesh):
    await mesh.start_identity()
    web = await mesh.proxy("demo", "web", min_refresh_s=0.5, start=False)
    # Its token proves another account: every attempt is refused with name-mismatch.
    token_file(mesh.tmp / "token-demo-web", mesh.secret, "demo", "api")
    await eventually(lambda: mesh.server.m_certify["name-mismatch"].value >= 2, what="refused attempts, retried")
    assert not web.ready
    token_file(mesh.tmp / "token-demo-web", mesh.secret, "demo", "web")  # a rotated, right token
    await asyncio.wait_for(web.wait_ready(), 15)


async def test_with_a_10s_lifetime_renewal_comes_at_70_percent_and_open_connections_survive_it(mesh, servers):
    await mesh.start_identity(lifetime=dt.timedelta(seconds=10))
    changed = asyncio.Event()
    web = await mesh.proxy("demo", "web", min_refresh_s=1.0)
    api = await mesh.proxy("demo", "api", min_refresh_s=1.0)
    issued_at, first_serial, first_expiry = time.time(), web.serial, web.expiry
    lifetime = first_expiry - (pki.load_certs(web._chain_pem)[0].not_valid_before_utc.timestamp() + 20)  # skew 20 s
    assert lifetime == pytest.approx(10, abs=1)
    web.on_change(changed.set)

    server = await servers(web.listener_context())
    reader, writer = await tls_connect(server.port, api.client_context, WEB)
    assert await exchange(reader, writer) == f"{API} ping\n".encode()
    assert format(server_cert(writer).serial_number, "x") == first_serial

    await asyncio.wait_for(changed.wait(), 15)
    renewed_at = time.time()
    fraction = 1 - (first_expiry - renewed_at) / lifetime
    assert 0.6 <= fraction <= 0.9, f"renewed at {fraction:.0%} of the lifetime"
    assert web.serial != first_serial and web.expiry > first_expiry

    # The connection opened before the renewal keeps working ...
    assert await exchange(reader, writer, b"still there\n") == f"{API} still there\n".encode()
    writer.close()
    # ... and a new one gets the new certificate.
    reader2, writer2 = await tls_connect(server.port, api.client_context, WEB)
    assert await exchange(reader2, writer2) == f"{API} ping\n".encode()
    assert format(server_cert(writer2).serial_number, "x") == web.serial != first_serial
    writer2.close()
    assert web.m_refresh.labels().value >= 2 and issued_at < renewed_at


async def test_a_proxy_started_with_both_anchors_trusts_leaves_under_either(mesh, servers):
    """Anchor rotation, step 1: the configured bundle holds the old and the new anchor."""
    await mesh.start_identity()
    new_anchor = pki.new_trust_anchor()
    new_issuer = pki.new_issuer(new_anchor)
    bundle = mesh.issuer_dir.anchor.cert_pem + new_anchor.cert_pem
    web = await mesh.proxy("demo", "web", anchors_pem=bundle)
    assert web.trust_anchors_pem == bundle
    server = await servers(web.listener_context())
    from_new_anchor = foreign_context(server=False, identity=API, issuer=new_issuer, anchors_pem=bundle)
    reader, writer = await tls_connect(server.port, from_new_anchor, WEB)
    assert await exchange(reader, writer) == f"{API} ping\n".encode()
    writer.close()
    api = await mesh.proxy("demo", "api")  # old anchor only: its leaf chains to it
    reader, writer = await tls_connect(server.port, api.client_context, WEB)
    assert await exchange(reader, writer) == f"{API} ping\n".encode()
    writer.close()
    new_server = await servers(foreign_context(server=True, identity=API, issuer=new_issuer, anchors_pem=bundle))
    reader, writer = await tls_connect(new_server.port, web.client_context, API)
    assert await exchange(reader, writer) == f"{WEB} ping\n".encode()
    writer.close()


async def test_a_rogue_anchor_written_to_the_bus_is_never_trusted(mesh, servers):
    """Whoever can write the tulle-identity bucket cannot make a proxy trust their CA."""
    await mesh.start_identity()
    web = await mesh.proxy("demo", "web")
    server = await servers(web.listener_context())
    rogue_anchor = pki.new_trust_anchor()
    rogue_issuer = pki.new_issuer(rogue_anchor)
    writer_bus = bus_for(mesh.nats_url, "identity")
    await writer_bus.start()
    mesh.stack.push_async_callback(writer_bus.close)
    bundle = mesh.issuer_dir.anchor.cert_pem + rogue_anchor.cert_pem
    await writer_bus.put(schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY, schemas.TrustBundle(bundle.decode()))
    admin = identity_name("admin", "kube-system")
    from_rogue = foreign_context(server=False, identity=admin, issuer=rogue_issuer, anchors_pem=bundle)
    assert await refused_by_server(server.port, from_rogue, WEB)
    assert web.trust_anchors_pem == mesh.issuer_dir.anchor.cert_pem


async def rogue_identity(mesh, sign) -> list[str]:
    """A responder on the certify subject (as if it could subscribe there: the bus forbids it,
    tests/test_bus_security.py) answering with the leaf `sign(request, n)` makes, n counting
    from 1; returns the identities it was asked for."""
    bus = bus_for(mesh.nats_url, TESTER, component="rogue")
    await bus.start()
    mesh.stack.push_async_callback(bus.close)
    served: list[str] = []

    async def rogue(req: schemas.CertifyRequest) -> schemas.CertifyResponse:
        served.append(req.identity)
        leaf, chain = sign(req, len(served))
        return schemas.CertifyResponse(leaf=pki.cert_pem(leaf).decode(), chain=[chain.cert_pem.decode()],
                                       expiry=leaf.not_valid_after_utc.timestamp(), serial=pki.serial_hex(leaf))

    await bus.serve(schemas.CERTIFY_SUBJECT, schemas.CertifyRequest, rogue, queue=schemas.CERTIFY_QUEUE)
    return served


async def test_a_reply_with_a_certificate_for_another_key_or_identity_is_never_installed(mesh):
    """Whoever answers on the certify subject, the proxy installs only a leaf for its own key and name."""
    issuer = mesh.issuer_dir.issuer

    def sign(req, n):
        if n % 2:
            return pki.issue_leaf(issuer, req.identity)[0], issuer  # the right name, but a key of its own
        return pki.sign_leaf(issuer, x509.load_pem_x509_csr(req.csr.encode()), API), issuer  # the proxy's key, another name

    served = await rogue_identity(mesh, sign)
    web = await mesh.proxy("demo", "web", min_refresh_s=0.3, start=False)
    await eventually(lambda: len(served) >= 4, what="several answers from the rogue responder")
    assert not web.ready and web.serial == "" and web.server_context is None


async def test_a_reply_that_does_not_chain_to_the_configured_anchors_is_never_installed(mesh):
    """The right name and the proxy's own key, but signed by a CA the proxy was not started with."""
    rogue_issuer = pki.new_issuer(pki.new_trust_anchor())

    def sign(req, n):
        return pki.sign_leaf(rogue_issuer, x509.load_pem_x509_csr(req.csr.encode()), req.identity), rogue_issuer

    served = await rogue_identity(mesh, sign)
    web = await mesh.proxy("demo", "web", min_refresh_s=0.3, start=False)
    await eventually(lambda: len(served) >= 3, what="several answers from the rogue responder")
    assert not web.ready and web.serial == "" and web.server_context is None
    await eventually(lambda: web.m_rejected.labels().value >= 3, what="each rogue reply refused")
