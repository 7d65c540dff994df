"""The bus client: one NATS connection per process, over nats-py.

What it adds to nats-py:
- connecting keeps trying with backoff (nats-py gives up on a first connect that fails),
  and reconnecting never stops, so a process outlives any NATS outage;
- KV buckets are created or opened with the settings fixed here, in one place;
- `watch` yields a full `Snapshot` first and then `Change`s, and a fresh `Snapshot`
  after every reconnect: the latest snapshot is always the whole truth, so a reader
  that missed changes while NATS was gone resyncs without special cases;
- every payload is decoded with its schema; a bad one is counted, logged with its
  subject, and dropped.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, Mapping, Optional, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api as jsapi
from nats.js.kv import KeyValue

from tulle import busauth, schemas
from tulle.codec import DecodeError, decode, encode
from tulle.log import get_logger
from tulle.metrics import REGISTRY, Registry

T = TypeVar("T")

DEFAULT_URL = "nats://127.0.0.1:4222"
# The largest replica count JetStream allows a stream (and so a KV bucket).
MAX_REPLICAS = 5
# How long a KV write is sent again while no stream answers it (a leader election takes
# about two seconds; a bucket just created, a moment).
WRITE_RETRY_LIMIT = 5.0

# Settings of each bucket. History 1: readers want the latest value only.
BUCKETS: dict[str, dict[str, Any]] = {
    schemas.ENDPOINTS_BUCKET: {"history": 1},
    schemas.PROFILES_BUCKET: {"history": 1},
    schemas.POLICY_BUCKET: {"history": 1},
    schemas.IDENTITY_BUCKET: {"history": 1},
    schemas.PROXIES_BUCKET: {"history": 1, "ttl": schemas.PROXY_HEARTBEAT_TTL_S},
    schemas.LEASES_BUCKET: {"history": 1, "ttl": 5.0},
}


# Stores every control-plane service makes when missing (tulle/busauth.py lets each one).
SHARED_STORES = busauth.SHARED_BUCKETS


def nats_url() -> str:
    return os.environ.get("TULLE_NATS_URL", DEFAULT_URL)


def server_urls(url: str) -> list[str]:
    """The servers of a bus URL: one URL, or the comma-separated URLs of a cluster's nodes
    (`nats://10.0.0.1:4222,nats://10.0.0.2:4222`). A client that knows every node
    reconnects to another when its own dies; the nodes also tell connected clients about
    each other, but a client that has never connected knows only what it was given."""
    urls = [u.strip() for u in url.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"no NATS URL in {url!r}")
    return urls


def replicas_from_env(env: Optional[Mapping[str, str]] = None) -> int:
    """TULLE_NATS_REPLICAS: how many copies of each bucket and of the event stream a
    cluster keeps (its node count; 1 for one server)."""
    env = os.environ if env is None else env
    text = env.get("TULLE_NATS_REPLICAS", "") or "1"
    try:
        return check_replicas(int(text))
    except ValueError:
        from tulle.errors import UserError

        raise UserError(f"TULLE_NATS_REPLICAS: expected a number from 1 to {MAX_REPLICAS}, got {text!r}") from None


def check_replicas(n: int) -> int:
    if not 1 <= n <= MAX_REPLICAS:
        raise ValueError(f"replicas must be from 1 to {MAX_REPLICAS}, not {n}")
    return n


@dataclass(frozen=True)
class BusCredentials:
    """How a process proves who it is to NATS (tulle/busauth.py says what each may do).

    - seed_file: a static role's nkey seed (control-plane services, the observer);
    - token_file: a workload proxy's token, read again at every (re)connect because
      projected tokens rotate; NATS auth callout has identity check it;
    - inbox_prefix: this client's own reply subjects (derived from the key or workload);
    - ca_file: the CA to verify NATS's TLS certificate with (TLS when set, or with tls://);
    - seed, ca_pem: the same two in memory (the CLI reads a cluster's from its Secrets and
      keeps them off the disk);
    - tls_hostname: the name to expect in NATS's certificate when the URL cannot say it
      (a port-forward to 127.0.0.1).
    """

    seed_file: str = ""
    token_file: str = ""
    inbox_prefix: str = ""
    ca_file: str = ""
    seed: str = field(default="", repr=False)
    ca_pem: str = ""
    tls_hostname: str = ""

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "BusCredentials":
        """TULLE_NATS_CREDS (a seed file) and TULLE_NATS_CA."""
        env = os.environ if env is None else env
        return cls.for_seed(env.get("TULLE_NATS_CREDS", ""), ca_file=env.get("TULLE_NATS_CA", ""))

    @classmethod
    def for_seed(cls, seed_file: str, *, ca_file: str = "") -> "BusCredentials":
        prefix = ""
        if seed_file:
            from tulle import natsjwt
            from tulle.busauth import inbox_for_user

            try:
                prefix = inbox_for_user(natsjwt.public_key(natsjwt.read_seed(seed_file)))
            except (OSError, ValueError) as e:
                from tulle.errors import UserError

                raise UserError(f"NATS credentials {seed_file}: {getattr(e, 'strerror', None) or e}") from None
        return cls(seed_file=seed_file, inbox_prefix=prefix, ca_file=ca_file)

    @classmethod
    def for_seed_text(cls, seed: str, *, ca_pem: str = "", tls_hostname: str = "", what: str = "NATS credential") \
            -> "BusCredentials":
        """A static role's credential held in memory (its nkey seed), with NATS's CA."""
        from tulle import natsjwt
        from tulle.busauth import inbox_for_user

        try:
            prefix = inbox_for_user(natsjwt.public_key(seed.strip().encode()))
        except Exception as e:  # nkeys raises its own errors for a malformed seed
            from tulle.errors import UserError

            raise UserError(f"{what}: not an nkey seed ({e})") from None
        return cls(seed=seed.strip(), inbox_prefix=prefix, ca_pem=ca_pem, tls_hostname=tls_hostname)

    @classmethod
    def for_workload(cls, token_file: str, namespace: str, workload: str, *, ca_file: str = "") -> "BusCredentials":
        from tulle.busauth import inbox_for_workload

        return cls(token_file=token_file, inbox_prefix=inbox_for_workload(namespace, workload), ca_file=ca_file)

    @property
    def anonymous(self) -> bool:
        return not self.seed_file and not self.token_file and not self.seed

    def connect_options(self, url: str) -> dict[str, Any]:
        """nats-py's connect options for these credentials; `url` is one URL or a cluster's list."""
        opts: dict[str, Any] = {}
        if self.seed:
            opts["nkeys_seed_str"] = self.seed
        elif self.seed_file:
            opts["nkeys_seed"] = self.seed_file
        elif self.token_file:
            path = self.token_file

            def token() -> str:
                try:
                    return Path(path).read_text().strip()
                except OSError:
                    return ""  # refused by the server; the next reconnect reads it again
            opts["token"] = token
        if self.inbox_prefix:
            opts["inbox_prefix"] = self.inbox_prefix
        if self.ca_file or self.ca_pem or any(u.startswith("tls://") for u in server_urls(url)):
            import ssl

            ctx = ssl.create_default_context(cafile=self.ca_file or None, cadata=self.ca_pem or None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            opts["tls"] = ctx
            if self.tls_hostname:
                opts["tls_hostname"] = self.tls_hostname
        return opts


@dataclass(slots=True)
class Snapshot(Generic[T]):
    """Every current value under the watched key or prefix. Replaces all earlier state."""

    values: dict[str, T]


@dataclass(slots=True)
class Change(Generic[T]):
    key: str
    value: T | None  # None: the key was deleted
    revision: int = 0


async def settle(nc) -> None:
    """Until the server has processed everything this connection sent so far.

    nats-py's own flush() writes its PING straight to the socket, ahead of commands still
    queued for its flusher task: its PONG can come back before a SUB just made reached the
    server, so another connection publishing "after" it may find no subscriber. Writing out
    the queue first, then the PING, restores the order.
    """
    await nc._flush_pending(force_flush=True)
    await nc.flush()


class BusError(Exception):
    """A bus operation that could not be done (not connected, timed out, refused)."""


class Bus:
    """`url`: one NATS URL, or every node of a cluster, comma-separated.

    `replicas`: how many copies the buckets and the event stream this client creates keep
    (the cluster's node count, so that losing a node loses nothing); None: TULLE_NATS_REPLICAS,
    else 1. Only creation uses it: a client that opens an existing bucket takes it as it is.
    """

    def __init__(self, url: str | None = None, *, component: str, instance: str | None = None,
                 registry: Registry = REGISTRY, credentials: BusCredentials | None = None,
                 replicas: int | None = None):
        self.url = url or nats_url()
        self.servers = server_urls(self.url)
        self.replicas = check_replicas(replicas) if replicas is not None else replicas_from_env()
        # None: from the environment (TULLE_NATS_CREDS, TULLE_NATS_CA).
        self.credentials = credentials if credentials is not None else BusCredentials.from_env()
        self.auth_error = ""  # why the server refused us, when it did: the last refusal
        self.permission_errors: list[str] = []  # the last permission violations the server reported
        self.component = component
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}"
        self.log = get_logger(bus=self.url)
        self.nc: nats.NATS | None = None
        self.js = None
        self._kvs: dict[str, KeyValue] = {}
        self._connected = asyncio.Event()
        self._generation = 0  # bumped on every (re)connect; watches resync when it moves
        self._connections = 0  # connections made by _connect_loop: the first, and each after nats-py gave up
        # Set, then replaced by a fresh one, whenever the generation moves or the bus closes.
        # An Event and not a Condition: a waiter cancelled under wait_for must not have to
        # take a lock back, which hung watches being cancelled while others waited too.
        self._generation_moved = asyncio.Event()
        self._closed = False
        self._on_change: list[Callable[[bool], None]] = []
        self._subs: list[Any] = []
        # What serve/subscribe_raw asked for, made again on a new connection (nats-py
        # re-subscribes by itself after a reconnect, but not after it closed for good).
        self._wanted_subs: list[tuple[str, str, Callable[[Msg], Awaitable[None]]]] = []
        self._watchers: set[Any] = set()  # live nats-py KeyWatchers, told to resync on reconnect
        self._on_close: list[Callable[[], None]] = []
        self.m_decode_errors = registry.counter(
            "tulle_bus_decode_errors_total", "Bus messages dropped because they did not decode", ("subject", "reason"))
        self.m_connected = registry.gauge("tulle_bus_connected", "1 while connected to NATS")
        self.m_reconnects = registry.counter("tulle_bus_reconnects_total", "Reconnections to NATS")
        self.m_write_retries = registry.counter(
            "tulle_bus_write_retries_total", "KV writes sent again because no stream answered them", ("bucket",))

    # --- connection ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def on_connection_change(self, fn: Callable[[bool], None]) -> None:
        self._on_change.append(fn)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call `fn` once the bus is closed: what the connection needed and outlives it
        (the CLI's port-forward to a cluster's NATS)."""
        self._on_close.append(fn)

    async def start(self, *, wait: bool = True) -> None:
        """Connect; keep trying with backoff until it works. With wait=False, return at once."""
        task = asyncio.ensure_future(self._connect_loop())
        if wait:
            await task

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def _connect_loop(self) -> None:
        delay = 0.05
        while not self._closed:
            try:
                self.nc = await nats.connect(
                    self.servers,
                    **self.credentials.connect_options(self.url),
                    name=f"{self.component}/{self.instance}",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    # CONNECT waits for the auth callout (identity) on a token login.
                    connect_timeout=6,
                    ping_interval=5,
                    max_outstanding_pings=2,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    error_cb=self._on_error,
                    closed_cb=self._on_closed,
                )
                break
            except (OSError, nats.errors.Error, asyncio.TimeoutError) as e:
                if _is_auth_error(e):
                    self.auth_error = str(e)
                    self.log.warning("nats refused this client's credentials", error=str(e), retry_in=round(delay, 2))
                else:
                    self.log.info("nats not reachable yet", error=str(e) or type(e).__name__, retry_in=round(delay, 2))
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
        if self._closed:
            return
        self.js = self.nc.jetstream()
        self._kvs.clear()
        self.auth_error = ""
        self._connections += 1
        if self._connections > 1:
            # Back after nats-py gave up on a connection (e.g. a login refused while a
            # cluster node failed over): a reconnection too, as far as anyone watching can tell.
            self.m_reconnects.inc()
        self._subs = []
        for subject, queue, cb in self._wanted_subs:
            self._subs.append(await self.nc.subscribe(subject, queue=queue, cb=cb))
        self.log.info("connected to nats")
        await self._set_connected(True)

    async def _set_connected(self, up: bool) -> None:
        if up:
            self._connected.set()
            self.m_connected.set(1)
            self._generation += 1
            self._announce_generation()
            for watcher in list(self._watchers):
                _put_dropping_oldest(watcher._updates, _RESYNC)
        else:
            self._connected.clear()
            self.m_connected.set(0)
        for fn in self._on_change:
            try:
                fn(up)
            except Exception:  # a listener's bug must not break the connection handling
                self.log.exception("connection listener failed")

    async def _on_disconnected(self) -> None:
        if not self._closed:
            self.log.warning("disconnected from nats")
        await self._set_connected(False)

    async def _on_reconnected(self) -> None:
        self.m_reconnects.inc()
        self._kvs.clear()  # a restarted server may have lost buckets: reopen them
        self.log.info("reconnected to nats")
        await self._set_connected(True)

    async def _on_error(self, e: Exception) -> None:
        if isinstance(e, (nats.errors.SlowConsumerError,)):
            self.log.warning("nats slow consumer", error=str(e))
        elif "permissions violation" in str(e).lower():
            self.permission_errors.append(str(e))
            del self.permission_errors[:-20]
            self.log.warning("nats refused an operation this client is not allowed", error=str(e))
        elif _is_auth_error(e):
            self.auth_error = str(e)
            self.log.warning("nats refused this client's credentials", error=str(e))
        elif not self._closed:
            self.log.debug("nats error", error=str(e) or type(e).__name__)

    async def _on_closed(self) -> None:
        await self._set_connected(False)
        if not self._closed:
            # nats-py gives up on a connection the server ended with an error (expired
            # credentials, an authorization refused by a restarted server): start afresh.
            self.log.warning("nats connection closed by the server; connecting again",
                             error=str(getattr(self.nc, "last_error", "") or ""))
            asyncio.ensure_future(self._connect_loop())

    async def close(self) -> None:
        """Drain and close; never raises, whatever state the connection is in (nats-py
        raises from close() when the server has already gone)."""
        self._closed = True
        if self.nc is not None and not self.nc.is_closed:
            if self.connected:
                try:
                    await asyncio.wait_for(self.nc.drain(), 2)
                except Exception:
                    pass
            if not self.nc.is_closed:
                try:
                    await asyncio.wait_for(self.nc.close(), 2)
                except Exception as e:
                    self.log.debug("nats close failed", error=str(e) or type(e).__name__)
        self._announce_generation()  # watches waiting for a reconnect end now
        for watcher in list(self._watchers):
            _put_dropping_oldest(watcher._updates, _RESYNC)
        await self._set_connected(False)
        for fn in self._on_close:
            try:
                fn()
            except Exception:
                self.log.exception("close listener failed")
        self._on_close.clear()

    def _require(self) -> None:
        if self.nc is None or not self.connected:
            raise BusError("not connected to NATS")

    # --- key-value ----------------------------------------------------------------------

    async def kv(self, bucket: str, *, create: bool = True) -> KeyValue:
        """Open a bucket, creating it with its fixed settings when missing (and allowed)."""
        self._require()
        kv = self._kvs.get(bucket)
        if kv is not None:
            return kv
        try:
            kv = await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                raise
            settings = BUCKETS.get(bucket, {"history": 1})
            kv = await self.js.create_key_value(jsapi.KeyValueConfig(
                bucket=bucket, storage=jsapi.StorageType.FILE, replicas=self.replicas, **settings))
            await self._until_led(f"KV_{bucket}")
        self._kvs[bucket] = kv
        return kv

    async def _until_led(self, stream: str, limit: float = 10.0) -> None:
        """Wait until a stream just created has a leader. In a JetStream cluster the create
        call returns before the stream's replicas have elected one, and a write in that gap
        gets "no responders" — the first put after creating a replicated bucket failed so."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        pause = 0.01
        while True:
            try:
                info = await self.js.stream_info(stream)
            except (nats.errors.Error, asyncio.TimeoutError):
                return  # best effort: the write that follows has its own retries
            if info.cluster is None or info.cluster.leader or loop.time() >= deadline:
                return  # not clustered, led, or give the write its own chance to fail
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    async def put(self, bucket: str, key: str, msg: Any, *, create: bool = True) -> int:
        return await self.put_raw(bucket, key, encode(msg), create=create)

    async def put_raw(self, bucket: str, key: str, payload: bytes, *, create: bool = True) -> int:
        kv = await self.kv(bucket, create=create)
        return await self._written(bucket, lambda: kv.put(key, payload))

    async def delete(self, bucket: str, key: str, *, create: bool = True) -> None:
        kv = await self.kv(bucket, create=create)
        await self._written(bucket, lambda: kv.delete(key))

    async def _written(self, bucket: str, write: Callable[[], Awaitable[T]], limit: float = WRITE_RETRY_LIMIT) -> T:
        """Send a KV write, again while no stream answers it. "No responders" means no
        server took the message, so sending it again cannot store it twice; it happens in a
        cluster while a stream's leader is being elected, or before a node has learnt where
        a new stream lives — the first write after an install failed so under load."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        pause = 0.02
        while True:
            try:
                return await write()
            except nats.js.errors.NoStreamResponseError:
                if loop.time() + pause > deadline:
                    raise
            self.m_write_retries.labels(bucket).inc()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def get_raw(self, bucket: str, key: str) -> bytes | None:
        kv = await self.kv(bucket)
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return entry.value

    async def get(self, bucket: str, key: str, cls: type[T]) -> T | None:
        """The current value, or None when absent (or when it does not decode)."""
        raw = await self.get_raw(bucket, key)
        if raw is None:
            return None
        return self._decode(cls, raw, f"$KV.{bucket}.{key}")

    async def keys(self, bucket: str, prefix: str = "") -> list[str]:
        kv = await self.kv(bucket)
        watcher = await kv.watch(">", meta_only=True)
        try:
            entries = await self._initial_entries(watcher, self._generation)
        except _Resync:
            raise BusError(f"connection to NATS lost while listing {bucket}") from None
        finally:
            await watcher.stop()
        live = {}
        for e in entries:  # in stream order: the last operation on a key wins
            live[e.key] = e.operation not in ("DEL", "PURGE")
        return sorted(k for k, alive in live.items() if alive and k.startswith(prefix))

    async def items(self, bucket: str, cls: type[T], prefix: str = "") -> dict[str, T]:
        """Every decodable value in a bucket (under a key prefix), read once."""
        out = {}
        for key in await self.keys(bucket, prefix):
            value = await self.get(bucket, key, cls)
            if value is not None:
                out[key] = value
        return out

    def _decode(self, cls: type[T], payload: bytes, subject: str) -> T | None:
        try:
            return decode(cls, payload)
        except DecodeError as e:
            self.m_decode_errors.labels(subject.split(".", 2)[1] if subject.startswith("$KV.") else subject, e.reason).inc()
            self.log.warning("dropped a bus message that does not decode", subject=subject, reason=e.reason, error=str(e))
            return None

    def watch(self, bucket: str, pattern: str, cls: type[T]) -> AsyncIterator[Snapshot[T] | Change[T]]:
        """Watch one key, or a pattern (`ns.svc.>`, `ns.*`): a Snapshot, then Changes.

        After a reconnect the watch starts again with a new Snapshot. Runs until the
        consumer stops iterating or the bus closes; waits for the bucket if it does
        not exist yet.
        """
        return self._watch(bucket, pattern, cls)

    async def _watch(self, bucket: str, pattern: str, cls: type[T]):
        while not self._closed:
            # A watch cancelled while it waited for a bucket or a reconnect must end, even
            # when a nats-py request swallowed the cancellation (proxies hung in shutdown).
            raise_if_cancelled()
            await self._connected.wait()
            generation = self._generation
            watcher = None
            try:
                kv = await self.kv(bucket, create=False)
                watcher = await kv.watch(pattern)
                self._watchers.add(watcher)
                if self._generation != generation or self._closed:
                    raise _Resync()
                values: dict[str, T] = {}
                for entry in await self._initial_entries(watcher, generation):
                    if entry.operation in ("DEL", "PURGE") or entry.value is None:
                        values.pop(entry.key, None)
                    else:
                        value = self._decode(cls, entry.value, f"$KV.{bucket}.{entry.key}")
                        if value is not None:
                            values[entry.key] = value
                yield Snapshot(values)
                while True:
                    entry = await self._next_entry(watcher, generation)
                    if entry is None:
                        continue
                    if entry.operation in ("DEL", "PURGE"):
                        yield Change(entry.key, None, entry.revision)
                        continue
                    value = self._decode(cls, entry.value, f"$KV.{bucket}.{entry.key}")
                    if value is not None:
                        yield Change(entry.key, value, entry.revision)
            except _Resync:
                continue
            except nats.js.errors.BucketNotFoundError:
                await self._wait_generation_change(generation, 1.0)
            except (nats.errors.Error, BusError, asyncio.TimeoutError, OSError) as e:
                self.log.debug("watch interrupted", bucket=bucket, pattern=pattern, error=str(e) or type(e).__name__)
                await self._wait_generation_change(generation, 0.5)
            finally:
                if watcher is not None:
                    self._watchers.discard(watcher)
                    try:
                        await watcher.stop()
                    except Exception:
                        pass

    async def _initial_entries(self, watcher, generation: int) -> list:
        """Every entry of a new KV watcher's initial values, none missing.

        nats-py may queue its end-of-initial-values marker ahead of values the server had
        already delivered (it reads the consumer's pending count while those still wait in
        the subscription's queue): a key that exists would look absent — a proxy answering
        503 "no endpoints", a CLI missing a proxy. So after the marker, the consumer says how
        many messages it delivered and has left, and the rest are read from the queue.
        """
        entries = []
        while (entry := await self._next_entry(watcher, generation)) is not None:
            entries.append(entry)
        info = await watcher._sub.consumer_info()
        want = info.delivered.consumer_seq + info.num_pending
        while len(entries) < want:
            entry = await self._next_entry(watcher, generation)
            if entry is not None:
                entries.append(entry)
        return entries

    async def _next_entry(self, watcher, generation: int):
        """The watcher's next entry (None marks the end of the initial values).

        Raises _Resync when the connection was re-established meanwhile: a reconnect
        puts a marker into every live watcher's queue, so waiting costs one queue get
        per entry. Reads nats-py's queue directly because its iterator would swallow
        the initial-values marker.
        """
        item = await watcher._updates.get()
        if item is _RESYNC or item is watcher.STOP_ITER or self._generation != generation:
            raise _Resync()
        return item

    def _announce_generation(self) -> None:
        moved, self._generation_moved = self._generation_moved, asyncio.Event()
        moved.set()

    async def _wait_generation_change(self, generation: int, timeout: float | None) -> None:
        moved = self._generation_moved
        if self._generation != generation or self._closed:
            return
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancel that
        # arrives as its timeout fires, and the cancelled watch then runs on for ever.
        try:
            async with asyncio.timeout(timeout):
                await moved.wait()
        except TimeoutError:
            pass

    # --- request / reply, subscriptions ---------------------------------------------------

    async def request(self, subject: str, msg: Any, reply_cls: type[T], timeout: float = 2.0) -> T:
        """Send a request and decode the reply; BusError when nobody answers in time."""
        self._require()
        try:
            reply = await self.nc.request(subject, encode(msg), timeout=timeout)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as e:
            raise BusError(f"no reply on {subject}: {type(e).__name__}") from None
        value = self._decode(reply_cls, reply.data, subject)
        if value is None:
            raise BusError(f"reply on {subject} does not decode")
        return value

    async def gather(self, subject: str, msg: Any, reply_cls: type[T], timeout: float, *,
                     until: Callable[[list[T]], bool] | None = None) -> list[T]:
        """Scatter-gather: publish once and collect every reply that arrives before `timeout`
        (or until `until(replies)` says every expected answer is in)."""
        self._require()
        inbox = self.nc.new_inbox()
        replies: list[T] = []
        sub = await self.nc.subscribe(inbox)
        try:
            await self.nc.publish(subject, encode(msg), reply=inbox)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    m = await sub.next_msg(timeout=left)
                except nats.errors.TimeoutError:
                    break
                value = self._decode(reply_cls, m.data, subject)
                if value is not None:
                    replies.append(value)
                    if until is not None and until(replies):
                        break
        finally:
            await sub.unsubscribe()
        return replies

    async def serve(self, subject: str, cls: type[T], handler: Callable[[T], Awaitable[Any]], *,
                    queue: str = "", concurrency: int = 1) -> None:
        """Answer requests on `subject` with `handler(request) -> reply message`.

        A request that does not decode is counted and dropped (the requester times out).
        Survives reconnects: nats-py re-subscribes on its own. With concurrency > 1, up
        to that many requests are handled at once (for handlers that wait on I/O);
        otherwise one after the other, which is fastest for CPU-bound handlers.
        """
        self._require()

        async def answer(m: Msg) -> None:
            request = self._decode(cls, m.data, subject)
            if request is None or not m.reply:
                return
            try:
                reply = await handler(request)
            except Exception:
                self.log.exception("request handler failed", subject=subject)
                return
            if reply is not None:
                try:
                    await m.respond(encode(reply))
                except nats.errors.Error:
                    pass

        on_msg: Callable[[Msg], Awaitable[None]] = answer
        if concurrency > 1:
            slots = asyncio.Semaphore(concurrency)
            running: set[asyncio.Task] = set()

            def done(task: asyncio.Task) -> None:
                running.discard(task)
                slots.release()

            async def answer_concurrently(m: Msg) -> None:
                await slots.acquire()  # back-pressure: further requests wait in nats-py's queue
                task = asyncio.ensure_future(answer(m))
                running.add(task)
                task.add_done_callback(done)

            on_msg = answer_concurrently

        await self._subscribe(subject, queue, on_msg)

    async def subscribe_raw(self, subject: str, cb: Callable[[Msg], Awaitable[None]], *, queue: str = ""):
        self._require()
        return await self._subscribe(subject, queue, cb)

    async def _subscribe(self, subject: str, queue: str, cb: Callable[[Msg], Awaitable[None]]):
        sub = await self.nc.subscribe(subject, queue=queue, cb=cb)
        self._wanted_subs.append((subject, queue, cb))
        self._subs.append(sub)
        await settle(self.nc)  # serving means subscribed: requests sent from now on reach us
        return sub

    async def sync(self) -> None:
        """Until the server has processed everything sent so far (see `settle`)."""
        self._require()
        await settle(self.nc)

    # --- events -------------------------------------------------------------------------

    async def ensure_events_stream(self) -> None:
        """Create the TULLE_EVENTS stream if missing: it keeps events for late readers."""
        self._require()
        try:
            await self.js.stream_info(schemas.EVENTS_STREAM)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(jsapi.StreamConfig(
                    name=schemas.EVENTS_STREAM, subjects=[f"{schemas.EVENTS_PREFIX}.>"],
                    retention=jsapi.RetentionPolicy.LIMITS, storage=jsapi.StorageType.FILE,
                    max_age=24 * 3600, max_msgs=200_000, discard=jsapi.DiscardPolicy.OLD,
                    num_replicas=self.replicas))
            except nats.js.errors.BadRequestError:
                pass  # another process created it first
            await self._until_led(schemas.EVENTS_STREAM)

    def make_event(self, kind: str, type_: str, data: dict, subject: str | None = None) -> schemas.CloudEvent:
        return schemas.CloudEvent(
            id=str(uuid.uuid4()),
            source=f"/tulle/{self.component}/{self.instance}",
            type=f"dev.tulle.{kind}.{type_}",
            time=datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            data=data,
            subject=subject,
        )

    async def publish_event(self, type_: str, data: dict, *, kind: str | None = None,
                            subject: str | None = None) -> schemas.CloudEvent | None:
        """Publish a CloudEvent on tulle.events.<kind>.<type>; best effort, never raises.

        kind defaults to this process's component (destination, identity, proxy ...).
        """
        kind = kind or self.component
        event = self.make_event(kind, type_, data, subject)
        if self.nc is None or self.nc.is_closed:
            return None
        try:
            await self.nc.publish(f"{schemas.EVENTS_PREFIX}.{kind}.{type_}", encode(event))
        except nats.errors.Error as e:
            self.log.debug("event not published", type=type_, error=str(e))
            return None
        return event


def raise_if_cancelled() -> None:
    """Python 3.11's wait_for (inside nats-py requests) can swallow a cancellation that
    lands just as the reply arrives; the task still counts it, so honour it here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


def _is_auth_error(e: BaseException) -> bool:
    text = str(e).lower()
    return "authorization violation" in text or "authentication" in text or "user authentication" in text


class _Resync(Exception):
    """The connection came back: restart the watch from a fresh snapshot."""


_RESYNC = object()  # put into a watcher's queue when the connection came back


def _put_dropping_oldest(queue: asyncio.Queue, item: Any) -> None:
    """Put `item` in a bounded queue now, dropping the oldest entries if it is full
    (a watch that is about to resync does not need them)."""
    while True:
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
