"""The adapter of the bus, for both modes: connect as the observer (through the `connect`
function the caller passes: the CLI's `connect_bus`, which reaches a local run directly and a
cluster through a port-forward), read what JetStream tells the observer, into `BusFacts`.

The observer may ask the account's JetStream info and each tulle stream's info; each
stream is asked at once, so a stream without a leader (which answers only after a timeout)
costs one timeout, not one per stream.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from tulle import schemas
from tulle.busauth import kv_stream
from tulle.check.nats import BusFacts, Replica, StreamFacts

Connect = Callable[..., Awaitable["object"]]  # connect_bus(target, timeout=...) -> Bus; raises on failure

BUS_TIMEOUT_S = 3.0


def _say(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def read_bus(target, connect: Connect, *, nats_up: bool = True, meshed: bool, with_proxies: bool,
                   servers: int = 0, connect_timeout: float = BUS_TIMEOUT_S) -> BusFacts:
    """`target`: the bus to read (a URL, or a tulle.cli.common.BusTarget carrying its credential
    or naming a cluster). `servers`: the NATS servers the installation runs (0: unknown)."""
    facts = BusFacts(url=str(target), servers=servers)
    if not nats_up:
        facts.connect_error = "NATS is not running"
        return facts
    try:
        bus = await connect(target, timeout=connect_timeout)
    except Exception as e:  # UserError: not reachable in time, refused; anything the client raises
        facts.connect_error = str(e) or type(e).__name__
        return facts
    try:
        info = getattr(bus.nc, "_server_info", None) or {}
        facts.server_name, facts.cluster_name = info.get("server_name", ""), info.get("cluster", "") or ""
        await _read_jetstream(bus, facts, meshed=meshed, with_proxies=with_proxies)
    finally:
        await bus.close()
    return facts


async def _read_jetstream(bus, facts: BusFacts, *, meshed: bool, with_proxies: bool) -> None:
    import nats.errors
    import nats.js.errors

    try:
        await asyncio.wait_for(bus.js.account_info(), BUS_TIMEOUT_S)
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as e:
        facts.jetstream_error = str(e) or type(e).__name__
        return
    except (nats.errors.Error, asyncio.TimeoutError) as e:
        facts.jetstream_error = _say(e)
        return

    buckets = [schemas.ENDPOINTS_BUCKET, schemas.PROFILES_BUCKET, schemas.POLICY_BUCKET, schemas.LEASES_BUCKET]
    if meshed:
        buckets += [schemas.IDENTITY_BUCKET, schemas.PROXIES_BUCKET]
    names = [kv_stream(b) for b in buckets] + [schemas.EVENTS_STREAM]
    infos = await asyncio.gather(*(_stream(bus, name) for name in names))
    for bucket, name, got in zip(buckets + [None], names, infos):
        if got is None:  # not found
            if bucket is None:
                facts.events_stream = False
            else:
                facts.missing_buckets.append(bucket)
            continue
        facts.streams[name] = got

    if meshed and schemas.IDENTITY_BUCKET not in facts.missing_buckets:
        try:
            facts.trust_bundle = await asyncio.wait_for(
                bus.get(schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY, schemas.TrustBundle), BUS_TIMEOUT_S)
        except (nats.errors.Error, asyncio.TimeoutError):
            pass  # the stream's health says why
    if meshed and with_proxies and schemas.PROXIES_BUCKET not in facts.missing_buckets:
        try:
            facts.heartbeats = await asyncio.wait_for(bus.items(schemas.PROXIES_BUCKET, schemas.ProxyHeartbeat),
                                                      2 * BUS_TIMEOUT_S)
            facts.heartbeats_read = True
        except (nats.errors.Error, asyncio.TimeoutError):
            pass


async def _stream(bus, name: str):
    """The stream's facts; None when it does not exist."""
    import nats.errors
    import nats.js.errors

    try:
        info = await asyncio.wait_for(bus.js.stream_info(name), BUS_TIMEOUT_S)
    except nats.js.errors.NotFoundError:
        return None
    except asyncio.TimeoutError:
        return StreamFacts(name, error=f"its info did not come within {BUS_TIMEOUT_S:g} s")
    except (nats.errors.Error, nats.js.errors.Error) as e:
        return StreamFacts(name, error=_say(e))
    cluster = info.cluster
    peers = [Replica(p.name or "?", bool(p.current), bool(p.offline), p.lag or 0)
             for p in ((cluster.replicas if cluster else None) or [])]
    return StreamFacts(name, replicas=info.config.num_replicas or 1, clustered=bool(cluster and cluster.name),
                       leader=(cluster.leader or "") if cluster else "", peers=peers)
