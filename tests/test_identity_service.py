"""The identity service against a real nats-server: certify over request/reply, typed
refusals, the trust bundle in KV, issuer hot reload, replicas in a queue group, and the
real `python -m services.identity` process."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import pytest

from tests.bus_support import TESTER, bus_for
from tests.conftest import REPO, eventually
from tests.identity_support import (
    local_token,
    IdentityProcess, atomic_write, certified, certify, identity_in_process, leaf_of, make_issuer_dir, token_secret,
)
from tulle import pki, schemas
from tulle.bus import Bus
from tulle.schemas import decode_event, identity_name

WEB = identity_name("web", "demo")
API = identity_name("api", "demo")


@pytest.fixture
async def client(own_nats):
    bus = bus_for(own_nats.url, TESTER, component="test")
    await bus.start()
    yield bus
    await bus.close()


class Events:
    """Every CloudEvent published under tulle.events.identity.> while the test runs."""

    def __init__(self):
        self.items: list[schemas.CloudEvent] = []
        self.raw: list[bytes] = []

    async def start(self, bus: Bus) -> "Events":
        async def on_msg(msg):
            self.raw.append(msg.data)
            self.items.append(decode_event(msg.data))

        await bus.subscribe_raw("tulle.events.identity.>", on_msg)
        return self

    def of(self, type_: str) -> list[schemas.CloudEvent]:
        return [e for e in self.items if e.type == f"dev.tulle.identity.{type_}"]


async def test_a_proven_workload_gets_a_leaf_that_chains_to_the_published_bundle(own_nats, client, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "token-secret")
    events = await Events().start(client)
    async with identity_in_process(own_nats.url, issuer_dir.path, secret) as server:
        key = pki.new_key()
        resp = await certify(client, WEB, local_token(secret, "demo", "web"), key=key)
        assert resp.error is None
        leaf = leaf_of(resp)
        assert pki.cert_identity(leaf) == WEB
        assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
        assert resp.chain == [issuer_dir.issuer.cert_pem.decode()]
        leaf.verify_directly_issued_by(issuer_dir.issuer.cert)
        bundle = await client.get(schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY, schemas.TrustBundle)
        assert bundle.anchors_pem == issuer_dir.anchor.cert_pem.decode()
        assert bundle.issuer_expiry == issuer_dir.issuer.cert.not_valid_after_utc.timestamp()
        assert certified(server) == 1
        issued = await eventually(lambda: events.of("certificate-issued"), what="certificate-issued event")
    assert issued[0].data == {"identity": WEB, "serial": resp.serial, "expiry": resp.expiry}
    assert all(b"PRIVATE KEY" not in raw and b"BEGIN" not in raw for raw in events.raw)


async def test_bad_requests_get_typed_errors_and_no_certificate(own_nats, client, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "token-secret")
    events = await Events().start(client)
    web_token = local_token(secret, "demo", "web")
    async with identity_in_process(own_nats.url, issuer_dir.path, secret) as server:
        cases = {
            "wrong token": (WEB, local_token(pki.new_token_secret(), "demo", "web"), None, "unauthenticated"),
            "missing token": (WEB, "", None, "unauthenticated"),
            "token for another service account": (WEB, local_token(secret, "demo", "api"), None, "name-mismatch"),
            "csr for another identity": (WEB, web_token, pki.new_csr(API, pki.new_key()).decode(), "name-mismatch"),
            "malformed csr": (WEB, web_token, "-----BEGIN CERTIFICATE REQUEST-----\nnope\n", "invalid-csr"),
        }
        for what, (identity, token, csr, code) in cases.items():
            resp = await certify(client, identity, token, csr)
            assert resp.error is not None and resp.error.code == code, what
            assert resp.leaf == "" and resp.chain == [] and resp.serial == "", what
        assert certified(server, "ok") == 0
        assert certified(server, "unauthenticated") == 2
        assert certified(server, "name-mismatch") == 2
        assert certified(server, "invalid-csr") == 1
        # A good request afterwards proves the events subscription was live all along.
        assert (await certify(client, WEB, web_token)).error is None
        await eventually(lambda: events.of("certificate-issued"), what="the one issuance event")
    assert len(events.of("certificate-issued")) == 1


async def test_a_request_that_does_not_decode_is_dropped_and_the_service_keeps_answering(own_nats, client, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "token-secret")
    async with identity_in_process(own_nats.url, issuer_dir.path, secret):
        import nats.errors

        with pytest.raises(nats.errors.TimeoutError):
            await client.nc.request(schemas.CERTIFY_SUBJECT, b'{"v": 1, "identity": 3}', timeout=0.5)
        assert (await certify(client, WEB, local_token(secret, "demo", "web"))).error is None


async def test_replicas_with_the_same_issuer_do_not_rewrite_the_trust_bundle(own_nats, client, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "token-secret")
    async with identity_in_process(own_nats.url, issuer_dir.path, secret):
        kv = await client.kv(schemas.IDENTITY_BUCKET)
        revision = (await kv.get(schemas.TRUST_BUNDLE_KEY)).revision
        async with identity_in_process(own_nats.url, issuer_dir.path, secret) as second:
            assert second.bundle_published
            assert (await kv.get(schemas.TRUST_BUNDLE_KEY)).revision == revision


async def test_an_issuer_replaced_by_garbage_is_refused_and_the_old_issuer_keeps_signing(own_nats, client, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "token-secret")
    token = local_token(secret, "demo", "web")
    events = await Events().start(client)
    async with identity_in_process(own_nats.url, issuer_dir.path, secret) as server:
        atomic_write(issuer_dir.path / "issuer.crt", b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        invalid = await eventually(lambda: events.of("issuer-invalid"), what="issuer-invalid event")
        assert "issuer.crt" in invalid[0].data["error"] and invalid[0].data["keeping_current"] is True
        resp = await certify(client, WEB, token)
        assert resp.error is None and resp.chain == [issuer_dir.issuer.cert_pem.decode()]
        leaf_of(resp).verify_directly_issued_by(issuer_dir.issuer.cert)
        # An issuer from another anchor is refused the same way.
        stranger = pki.new_issuer(pki.new_trust_anchor())
        atomic_write(issuer_dir.path / "issuer.key", stranger.key_pem, 0o600)
        atomic_write(issuer_dir.path / "issuer.crt", stranger.cert_pem)
        await eventually(lambda: len(events.of("issuer-invalid")) == 2, what="second issuer-invalid event")
        assert "does not chain to any trust anchor" in events.of("issuer-invalid")[1].data["error"]
        assert (await certify(client, WEB, token)).chain == [issuer_dir.issuer.cert_pem.decode()]
        assert server.m_issuer_reloads.labels("invalid").value == 2
        # A good replacement is then taken.
        new = issuer_dir.rotate()
        await eventually(lambda: events.of("issuer-reloaded"), what="issuer-reloaded event")
        assert (await certify(client, WEB, token)).chain == [new.cert_pem.decode()]


async def test_the_trust_bundle_is_published_again_when_nats_comes_back_empty(own_nats, client, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "token-secret")
    async with identity_in_process(own_nats.url, issuer_dir.path, secret):
        reconnected = asyncio.Event()
        client.on_connection_change(lambda up: up and reconnected.set())
        own_nats.stop()
        shutil.rmtree(own_nats.store_dir / "jetstream")  # a new NATS without the old store
        own_nats.start()
        await asyncio.wait_for(reconnected.wait(), 20)  # (a request sent while reconnecting would wait 5 s)

        async def bundle():
            try:
                return await client.get(schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY, schemas.TrustBundle)
            except Exception:
                return None

        got = await eventually(bundle, timeout=20, what="the trust bundle republished")
        assert got.anchors_pem == issuer_dir.anchor.cert_pem.decode()


async def test_replacing_the_issuer_files_of_a_running_process_makes_new_leaves_chain_to_the_new_issuer(
        own_nats, client, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "token-secret")
    token = local_token(secret, "demo", "web")
    events = await Events().start(client)
    proc = IdentityProcess(own_nats.url, issuer_dir.path, tmp_path / "token-secret", tmp_path / "identity.log").start()
    try:
        await asyncio.to_thread(proc.wait_ready)
        first = await certify(client, WEB, token)
        assert first.chain == [issuer_dir.issuer.cert_pem.decode()]
        old = issuer_dir.issuer
        new = issuer_dir.rotate()

        async def chained_to_new():
            resp = await certify(client, WEB, token)
            return resp if resp.chain == [new.cert_pem.decode()] else None

        resp = await eventually(chained_to_new, what="a leaf from the new issuer")
        leaf_of(resp).verify_directly_issued_by(new.cert)
        with pytest.raises(Exception):
            leaf_of(resp).verify_directly_issued_by(old.cert)
        assert proc.proc.poll() is None  # the same process: no restart
        assert events.of("issuer-reloaded")
        assert proc.metric("tulle_identity_issuer_expiry_timestamp_seconds") == new.cert.not_valid_after_utc.timestamp()
    finally:
        proc.stop()


async def test_two_replicas_share_the_certify_requests(own_nats, client, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "token-secret")
    procs = [IdentityProcess(own_nats.url, issuer_dir.path, tmp_path / "token-secret", tmp_path / f"identity-{i}.log",
                             "--certify-burst", "100").start() for i in range(2)]
    try:
        for p in procs:
            await asyncio.to_thread(p.wait_ready)
        token = local_token(secret, "demo", "web")
        resps = await asyncio.gather(*(certify(client, WEB, token) for _ in range(40)))
        assert all(r.error is None for r in resps)
        counts = [p.metric("tulle_identity_certify_total", result="ok") for p in procs]
        assert sum(counts) == 40
        assert all(c > 0 for c in counts), counts
    finally:
        for p in procs:
            p.stop()


def test_the_process_refuses_an_unusable_issuer_folder_with_one_line(tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    token_secret(tmp_path / "token-secret")
    (issuer_dir.path / "issuer.key").write_bytes(pki.key_pem(pki.new_key()))
    out = subprocess.run([sys.executable, "-m", "services.identity", "--admin", "127.0.0.1:0", "--nats",
                          "nats://127.0.0.1:1", "--issuer-dir", str(issuer_dir.path), "--token-secret-file",
                          str(tmp_path / "token-secret")], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "issuer.key: the key does not match the certificate" in lines[0], out.stderr


async def test_issuance_is_rate_limited_per_identity_and_refusals_are_typed_and_counted(own_nats, client, tmp_path):
    """One requester hammering certify gets its burst, then `rate-limited`; another workload
    is not held back by it."""
    from services.identity.ratelimit import RateLimiter

    issuer_dir = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "token-secret")
    web_token, api_token = local_token(secret, "demo", "web"), local_token(secret, "demo", "api")
    async with identity_in_process(own_nats.url, issuer_dir.path, secret,
                                   limiter=RateLimiter(rate=0.01, burst=5)) as server:
        resps = [await certify(client, WEB, web_token) for _ in range(12)]
        assert [r.error is None for r in resps] == [True] * 5 + [False] * 7
        assert {r.error.code for r in resps[5:]} == {"rate-limited"} and all(r.leaf == "" for r in resps[5:])
        assert "retry in" in resps[-1].error.message
        assert (await certify(client, API, api_token)).error is None  # its own budget
        assert certified(server, "rate-limited") == 7 and certified(server, "ok") == 6
        # A forged token is refused as unauthenticated before it can spend anyone's budget.
        forged = local_token(pki.new_token_secret(), "demo", "api")
        assert (await certify(client, API, forged)).error.code == "unauthenticated"
        assert (await certify(client, API, api_token)).error is None
