"""Run real `python -m services.destination` processes in tests, and feed their folders."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import yaml

from tests.service_process import ServiceProcess
from tulle import schemas
from tulle.bus import Bus, Change, Snapshot


class DestinationProcess(ServiceProcess):
    def __init__(self, nats_url: str, args: list[str], log: Path, env: dict[str, str] | None = None):
        super().__init__("destination", nats_url, args, log, env)


def write_manifest(path: Path, *docs: dict) -> None:
    """Write atomically, as the local runner does: the poller never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    os.replace(tmp, path)


class KVRecorder:
    """Every value a KV watcher receives, in order, as a proxy would see them."""

    def __init__(self, bus: Bus, pattern: str):
        self.changes: list[Change] = []
        self.current: dict[str, schemas.EndpointSet] = {}
        self.updated = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(bus, pattern))

    async def _run(self, bus: Bus, pattern: str) -> None:
        await bus.kv(schemas.ENDPOINTS_BUCKET)  # the bucket may not exist yet
        async for item in bus.watch(schemas.ENDPOINTS_BUCKET, pattern, schemas.EndpointSet):
            if isinstance(item, Snapshot):
                self.current = dict(item.values)
            else:
                self.changes.append(item)
                if item.value is None:
                    self.current.pop(item.key, None)
                else:
                    self.current[item.key] = item.value
            self.updated.set()

    async def until(self, predicate, what: str, timeout: float = 5.0):
        async def wait():
            while not predicate(self.current):
                self.updated.clear()
                await self.updated.wait()
        try:
            await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"KV never showed {what}; last: {self.current}") from None

    def history(self, key: str) -> list:
        return [c.value for c in self.changes if c.key == key]

    def close(self) -> None:
        self._task.cancel()


def addresses(sets, key="demo.web.80"):
    es = sets.get(key)
    return None if es is None else sorted((e.address, e.identity) for e in es.endpoints)
