"""The bus as a trust boundary, tried the way an attacker would: a real nats-server with
the generated configuration, a NATS client per role with that role's own credential (or
none, or a stolen one), and each forbidden action attempted for real.

Every action is judged by what the server does: an allowed one has its effect (a value
written, a message delivered, an answer received), a forbidden one gets the server's
permissions violation and no effect. The role × action table is the specification
(tulle/busauth.py is the implementation).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable

import nats
import pytest

from tests.bus_support import TESTER, bus_for
from tests.conftest import eventually
from tulle import schemas
from tulle.bus import Bus, BusCredentials, settle

NS = "sec"
WORKLOAD = "web-1"
OTHER_WORKLOAD = "api-1"
ROLES = ("destination", "policy", "identity", "injector", "observer", "proxy", "callout")

Y, N = True, False
# action -> who may (destination, policy, identity, injector, observer, proxy, callout); `callout` is
# identity's second connection, alone in the AUTH account, where nats-server sends proxies' logins.
TABLE: dict[str, tuple[bool, ...]] = {
    "write tulle-endpoints": (Y, N, N, N, N, N, N),
    "write tulle-profiles": (Y, N, N, N, N, N, N),
    "write tulle-policy": (N, Y, N, N, N, N, N),
    "write trust-bundle (tulle-identity)": (N, N, Y, N, N, N, N),
    "write its own proxy heartbeat": (N, N, N, N, N, Y, N),
    "write another workload's heartbeat": (N, N, N, N, N, N, N),
    "read tulle-endpoints": (Y, N, N, N, Y, Y, N),
    "read tulle-policy": (N, Y, N, N, Y, Y, N),
    "delete the tulle-endpoints bucket": (N, N, N, N, N, N, N),
    "create a bucket of its own": (N, N, N, N, N, N, N),
    "receive certify requests (tokens)": (N, N, Y, N, N, N, N),
    "ask for a certificate": (N, N, N, N, N, Y, N),
    "receive auth callout requests (tokens)": (N, N, N, N, N, N, Y),
    "publish an event as itself": (Y, Y, Y, Y, N, Y, N),
    "publish an event as identity": (N, N, Y, N, N, N, N),
    "read the event stream": (N, N, N, N, Y, N, N),
    "ask proxies for statistics": (N, N, N, N, Y, N, N),
    "answer statistics requests": (N, N, N, N, N, Y, N),
}


@dataclass
class Client:
    role: str
    bus: Bus
    errors: list[str]


async def connect(nats_server, role: str) -> Client:
    if role == "proxy":
        bus = bus_for(nats_server.url, f"proxy:{NS}/{WORKLOAD}")
    else:
        bus = bus_for(nats_server.url, role)
    await asyncio.wait_for(bus.start(), 15)
    return Client(role, bus, bus.permission_errors)


@pytest.fixture
async def world(nats_server):
    """A privileged reader (the tests' own), the stores made as the services make them, and a
    client per role."""
    god = bus_for(nats_server.url, TESTER, component="test")
    await god.start()
    await god.ensure_events_stream()
    for bucket in (schemas.ENDPOINTS_BUCKET, schemas.PROFILES_BUCKET, schemas.POLICY_BUCKET, schemas.IDENTITY_BUCKET,
                   schemas.PROXIES_BUCKET, schemas.LEASES_BUCKET):
        await god.kv(bucket)
    clients = {role: await connect(nats_server, role) for role in ROLES}
    yield god, clients
    for c in clients.values():
        await c.bus.close()
    await god.close()


async def outcome(c: Client, effect: Callable[[], Awaitable[bool]], attempt: Callable[[], Awaitable[None]]) -> bool:
    """Allowed (the effect shows) or refused (the server reported a permissions violation and
    the effect never showed). Waits for one of the two: no sleeping on a guess."""
    before = len(c.errors)
    await attempt()
    await settle(c.bus.nc)

    async def settled():
        if await effect():
            return "allowed"
        if len(c.errors) > before:
            return "refused"
        return None

    verdict = await eventually(settled, timeout=10, what=f"{c.role}: an effect or a permissions violation")
    if verdict == "refused":
        assert not await effect(), f"{c.role}: refused, yet the effect happened"
    return verdict == "allowed"


def unique() -> str:
    return uuid.uuid4().hex[:10]


async def kv_write(god: Bus, c: Client, bucket: str, key: str) -> bool:
    value = f"written by {c.role} {unique()}".encode()

    async def effect():
        return await god.get_raw(bucket, key) == value

    return await outcome(c, effect, lambda: c.bus.nc.publish(f"$KV.{bucket}.{key}", value))


async def kv_read(god: Bus, c: Client, bucket: str) -> bool:
    key = f"probe.{unique()}"
    await god.put_raw(bucket, key, b"secret-ish")
    inbox = c.bus.nc.new_inbox()
    got: list[bytes] = []
    sub = await c.bus.nc.subscribe(inbox, cb=collect(got))
    try:
        return await outcome(c, lambda: _true(bool(got)), lambda: c.bus.nc.publish(
            f"$JS.API.STREAM.MSG.GET.KV_{bucket}", f'{{"last_by_subj":"$KV.{bucket}.{key}"}}'.encode(), reply=inbox))
    finally:
        await sub.unsubscribe()


async def _true(v: bool) -> bool:
    return v


def collect(into: list):
    async def cb(m):
        into.append(m.data)
    return cb


async def receives(god: Bus, c: Client, subject: str, *, publish: Callable[[], Awaitable[None]] | None = None,
                   queue: str = "", any_message: bool = False) -> bool:
    """Can `c` subscribe to `subject` and get what is published there?"""
    got: list[bytes] = []
    marker = unique().encode()

    async def cb(m):
        if any_message or m.data == marker:
            got.append(m.data)

    before = len(c.errors)
    sub = await c.bus.nc.subscribe(subject, queue=queue, cb=cb)
    await settle(c.bus.nc)

    async def settled():
        if got:
            return "allowed"
        if len(c.errors) > before:
            return "refused"
        await (publish() if publish else god.nc.publish(subject, marker))
        return None

    verdict = await eventually(settled, timeout=10, interval=0.05, what=f"{c.role} receiving {subject}")
    await sub.unsubscribe()
    return verdict == "allowed"


async def publishes(god: Bus, c: Client, subject: str) -> bool:
    got: list[bytes] = []
    marker = unique().encode()

    async def cb(m):
        if m.data == marker:
            got.append(m.data)

    sub = await god.nc.subscribe(subject, cb=cb)
    await settle(god.nc)
    try:
        return await outcome(c, lambda: _true(bool(got)), lambda: c.bus.nc.publish(subject, marker))
    finally:
        await sub.unsubscribe()


async def requests(god: Bus, c: Client, subject: str) -> bool:
    """Can `c` send a request on `subject` and get the answer back?"""
    answered: list[bool] = []
    async def answer(m):
        await m.respond(b"answer")

    sub = await god.nc.subscribe(subject, cb=answer)
    await settle(god.nc)
    inbox = c.bus.nc.new_inbox()
    reply_sub = await c.bus.nc.subscribe(inbox, cb=collect(answered))
    try:
        return await outcome(c, lambda: _true(bool(answered)),
                             lambda: c.bus.nc.publish(subject, unique().encode(), reply=inbox))
    finally:
        await reply_sub.unsubscribe()
        await sub.unsubscribe()


async def stream_api(god: Bus, c: Client, subject: str, payload: bytes, done: Callable[[], Awaitable[bool]]) -> bool:
    inbox = c.bus.nc.new_inbox()
    replies: list[bytes] = []
    sub = await c.bus.nc.subscribe(inbox, cb=collect(replies))
    try:
        return await outcome(c, done, lambda: c.bus.nc.publish(subject, payload, reply=inbox))
    finally:
        await sub.unsubscribe()


async def attempt(action: str, god: Bus, c: Client) -> bool:
    own_kind = "proxy" if c.role == "proxy" else c.role
    if action == "write tulle-endpoints":
        return await kv_write(god, c, schemas.ENDPOINTS_BUCKET, f"{NS}.web.{unique()}")
    if action == "write tulle-profiles":
        return await kv_write(god, c, schemas.PROFILES_BUCKET, f"{NS}.{unique()}")
    if action == "write tulle-policy":
        return await kv_write(god, c, schemas.POLICY_BUCKET, f"{NS}.{unique()}")
    if action == "write trust-bundle (tulle-identity)":
        return await kv_write(god, c, schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY)
    if action == "write its own proxy heartbeat":
        return await kv_write(god, c, schemas.PROXIES_BUCKET, schemas.proxy_key(NS, WORKLOAD))
    if action == "write another workload's heartbeat":
        return await kv_write(god, c, schemas.PROXIES_BUCKET, schemas.proxy_key(NS, OTHER_WORKLOAD))
    if action == "read tulle-endpoints":
        return await kv_read(god, c, schemas.ENDPOINTS_BUCKET)
    if action == "read tulle-policy":
        return await kv_read(god, c, schemas.POLICY_BUCKET)
    if action == "delete the tulle-endpoints bucket":
        async def gone():
            try:
                await god.js.stream_info(f"KV_{schemas.ENDPOINTS_BUCKET}")
                return False
            except nats.js.errors.NotFoundError:
                return True
        return await stream_api(god, c, f"$JS.API.STREAM.DELETE.KV_{schemas.ENDPOINTS_BUCKET}", b"", gone)
    if action == "create a bucket of its own":
        name = f"KV_evil{unique()}"

        async def exists():
            try:
                await god.js.stream_info(name)
                return True
            except nats.js.errors.NotFoundError:
                return False
        config = f'{{"name":"{name}","subjects":["$KV.{name[3:]}.>"],"storage":"memory"}}'.encode()
        return await stream_api(god, c, f"$JS.API.STREAM.CREATE.{name}", config, exists)
    if action == "receive certify requests (tokens)":
        return await receives(god, c, schemas.CERTIFY_SUBJECT, queue="identity")
    if action == "ask for a certificate":
        return await requests(god, c, schemas.CERTIFY_SUBJECT)
    if action == "receive auth callout requests (tokens)":
        # Only nats-server publishes there (each proxy login, with its token); listening is
        # what an eavesdropper would need.
        async def a_login():
            try:
                nc = await nats.connect(god.url, token=lambda: "nothing", allow_reconnect=False,
                                        max_reconnect_attempts=0, connect_timeout=6)
                await nc.close()
            except nats.errors.Error:
                pass
        return await receives(god, c, "$SYS.REQ.USER.AUTH", publish=a_login, any_message=True)
    if action == "publish an event as itself":
        return await publishes(god, c, f"{schemas.EVENTS_PREFIX}.{own_kind}.probe")
    if action == "publish an event as identity":
        return await publishes(god, c, f"{schemas.EVENTS_PREFIX}.identity.certificate-issued")
    if action == "read the event stream":
        replies: list[bytes] = []
        inbox = c.bus.nc.new_inbox()
        sub = await c.bus.nc.subscribe(inbox, cb=collect(replies))
        try:
            config = b'{"stream_name":"TULLE_EVENTS","config":{"deliver_policy":"new","ack_policy":"none",' \
                     b'"deliver_subject":"' + c.bus.nc.new_inbox().encode() + b'"}}'
            return await outcome(c, lambda: _true(any(b'"config"' in r for r in replies)), lambda: c.bus.nc.publish(
                f"$JS.API.CONSUMER.CREATE.{schemas.EVENTS_STREAM}", config, reply=inbox))
        finally:
            await sub.unsubscribe()
    if action == "ask proxies for statistics":
        return await requests(god, c, schemas.PROXY_STATS_SUBJECT)
    if action == "answer statistics requests":
        answered: list[bool] = []

        async def answer(m):
            await m.respond(b"stats")

        before = len(c.errors)
        sub = await c.bus.nc.subscribe(schemas.PROXY_STATS_SUBJECT, cb=answer)
        await settle(c.bus.nc)

        async def settled():
            if answered:
                return "allowed"
            if len(c.errors) > before:
                return "refused"
            try:
                await god.nc.request(schemas.PROXY_STATS_SUBJECT, b"q", timeout=0.3)
                answered.append(True)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                pass
            return None
        verdict = await eventually(settled, timeout=10, what="an answer or a refusal")
        await sub.unsubscribe()
        return verdict == "allowed"
    raise AssertionError(action)


CASES = [(action, role, allowed) for action, row in TABLE.items() for role, allowed in zip(ROLES, row)]


@pytest.mark.parametrize("action,role,allowed", CASES, ids=[f"{r}: {a}" for a, r, _ in CASES])
async def test_each_role_may_do_exactly_what_the_table_says(world, action, role, allowed):
    god, clients = world
    assert await attempt(action, god, clients[role]) is allowed


async def test_a_client_without_credentials_is_refused(nats_server):
    nc = None
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        nc = await nats.connect(nats_server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=6)
    assert nc is None


async def test_a_client_with_an_unknown_key_or_a_forged_token_is_refused(nats_server, tmp_path):
    from tulle import natsjwt, pki

    stranger = tmp_path / "stranger.nk"
    natsjwt.ensure_seed(stranger, "user")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(nats_server.url, nkeys_seed=str(stranger), allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=6)
    forged = pki.make_local_token(pki.new_token_secret(), NS, "web", WORKLOAD, "identity.tulle.cluster.local")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(nats_server.url, token=forged, allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=6)


async def test_an_expired_token_or_one_for_another_audience_does_not_open_the_bus(nats_server):
    for token in (nats_server.token(NS, WORKLOAD, lifetime_s=-1),
                  nats_server.token(NS, WORKLOAD, audience="identity.tulle.example.org")):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(nats_server.url, token=token, allow_reconnect=False, max_reconnect_attempts=0,
                               connect_timeout=6)


async def test_a_stolen_proxy_token_is_worth_one_proxy(world, nats_server):
    """With web-1's token an attacker gets web-1's permissions: not api-1's heartbeat, not the
    policy bucket, not another workload's replies."""
    god, clients = world
    thief = Bus(nats_server.url, component="thief",
                credentials=BusCredentials.for_workload(nats_server.token_file(NS, WORKLOAD), NS, WORKLOAD))
    await thief.start()
    try:
        c = Client("thief", thief, thief.permission_errors)
        assert not await kv_write(god, c, schemas.PROXIES_BUCKET, schemas.proxy_key(NS, OTHER_WORKLOAD))
        assert not await kv_write(god, c, schemas.POLICY_BUCKET, f"{NS}.{OTHER_WORKLOAD}")
        other_inbox = BusCredentials.for_workload("", NS, OTHER_WORKLOAD).inbox_prefix
        assert not await receives(god, c, f"{other_inbox}.>", publish=lambda: god.nc.publish(f"{other_inbox}.x", b"-"))
    finally:
        await thief.close()
