"""More proxies than nats-server's default per-stream consumer cap can watch endpoint sets.

Every KV watch is a JetStream consumer of the bucket's stream, and nats-server 2.15 caps a
stream at 1,000 consumers unless configured otherwise: the 1,001st proxy watch would be
refused and its Bus.watch would retry forever without ever delivering a value.
"""

from __future__ import annotations

import asyncio

from tulle import schemas
from tulle.bus import Bus, Snapshot
from tests.bus_support import TESTER, bus_for

WATCHES = 1100
CONNECTIONS = 4


async def test_more_than_a_thousand_watches_of_one_endpoint_set_all_get_its_value(own_nats):
    buses = [bus_for(own_nats.url, TESTER, component="test") for _ in range(CONNECTIONS)]
    for b in buses:
        await b.start()
    key = schemas.endpoints_key("demo", "web", 80)
    await buses[0].put(schemas.ENDPOINTS_BUCKET, key, schemas.EndpointSet("demo", "web", 80, []))
    seen: set[int] = set()
    everyone = asyncio.Event()

    async def watch(i: int) -> None:
        async for item in buses[i % CONNECTIONS].watch(schemas.ENDPOINTS_BUCKET, key, schemas.EndpointSet):
            if isinstance(item, Snapshot) and key in item.values:
                seen.add(i)
                if len(seen) == WATCHES:
                    everyone.set()
                return

    tasks = [asyncio.ensure_future(watch(i)) for i in range(WATCHES)]
    try:
        await asyncio.wait_for(everyone.wait(), 60)
    except asyncio.TimeoutError:
        raise AssertionError(f"only {len(seen)} of {WATCHES} watches got the endpoint set") from None
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for b in buses:
            await b.close()
