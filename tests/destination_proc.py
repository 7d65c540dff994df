"""Run real `python -m services.destination` processes in tests, and feed their folders."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.conftest import REPO, wait_until
from tulle import schemas
from tulle.bus import Bus, Change, Snapshot
from tulle.metrics import sample
from tulle.natsserver import free_port


class DestinationProcess:
    def __init__(self, nats_url: str, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.admin_port = free_port()
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.log = log
        self.cmd = [sys.executable, "-m", "services.destination", "--nats", nats_url,
                    "--admin", f"127.0.0.1:{self.admin_port}", "--log-format", "json", *args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DestinationProcess":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env)
        out.close()
        return self

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        return self._get("/ready")[0] == 200

    def wait_ready(self, timeout: float = 20) -> None:
        wait_until(lambda: self.alive() and self.ready() or self._dead(), timeout, what=f"destination ready ({self.log})")

    async def ready_soon(self, timeout: float = 20) -> None:
        """`wait_ready` for async tests: the test's own event loop keeps running meanwhile."""
        await asyncio.to_thread(self.wait_ready, timeout)

    def _dead(self) -> bool:
        if not self.alive():
            raise AssertionError(f"destination exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return False

    def metric(self, name: str, **labels: str) -> float:
        status, text = self._get("/metrics")
        assert status == 200, f"metrics: HTTP {status}"
        return sample(text, name, **labels)

    def is_leader(self) -> bool:
        return self.metric("tulle_leader", lease="destination") == 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
