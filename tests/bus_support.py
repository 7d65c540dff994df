"""The authenticated bus the tests run against: a real nats-server with the mesh's
generated authorization (tulle/busauth.py), role credentials, and identity's real auth
callout responder answering workload proxies' logins from a thread of its own.

`MeshNats` is what the `nats_server` and `own_nats` fixtures yield:
- `.url`, `.credentials(role)` for destination, policy, identity, injector, observer;
- `.token_file(ns, workload, sa)` mints a workload token (as local mode does) and
  `.workload_credentials(ns, workload, sa)` gives a proxy's BusCredentials with it;
- `.token_secret` is the HMAC secret an identity service started by a test must use.

`MeshNatsCluster` is the same over a three-node JetStream cluster on loopback.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Optional

from tulle import busauth, natsjwt, pki
from tulle.bus import Bus, BusCredentials
from tulle.natsserver import NatsCluster, NatsServer

TRUST_DOMAIN = "cluster.local"
AUDIENCE = f"identity.tulle.{TRUST_DOMAIN}"


class CalloutThread:
    """identity's CalloutResponder (services/identity/callout.py), on its own loop and bus."""

    def __init__(self, server: "MeshNats"):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="callout", daemon=True)
        self._stop: Optional[asyncio.Event] = None
        self.thread.start()
        if not self.ready.wait(20):
            raise RuntimeError("the test's auth callout responder did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        from services.identity.callout import CalloutResponder
        from services.identity.tokens import LocalTokenVerifier
        from tulle.metrics import Registry

        self._stop = asyncio.Event()
        bus = Bus(self.server.url, component="identity", credentials=self.server.credentials("callout"),
                  registry=Registry())
        responder = CalloutResponder(bus, LocalTokenVerifier(self.server.token_secret, AUDIENCE),
                                     natsjwt.read_seed(self.server.callout_issuer_seed_file), registry=Registry())
        await responder.start()
        await bus.sync()
        self.ready.set()
        await self._stop.wait()
        await responder.close()

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)


_SERVERS: dict[str, "MeshNats"] = {}


def server_for(url: str) -> "MeshNats":
    """The test server behind a URL (helpers that were handed a URL find its credentials)."""
    try:
        return _SERVERS[str(url)]
    except KeyError:
        raise AssertionError(f"no test NATS server at {url}") from None


def bus_for(url: str, role: str, **kw) -> Bus:
    """A Bus (not started) for `role` on the test server at `url`: a static role's
    credentials, or `proxy:<ns>/<workload>` for a workload proxy's."""
    server = server_for(url)
    if role.startswith("proxy:"):
        ns, _, workload = role[len("proxy:"):].partition("/")
        kw.setdefault("component", "proxy")
        return Bus(server.url, credentials=server.workload_credentials(ns, workload), **kw)
    return server.bus(role, **kw)


TESTER = "tester"  # a user allowed everything: only for the tests of the Bus client's mechanics


class _MeshBus:
    """What the tests' bus adds to nats-server(s): the tests' all-powerful user, the
    workload-token secret, identity's callout responder in a thread, and credentials."""

    with_callout: bool
    store_dir: Path
    keys_dir: Path
    url: str

    def _prepare(self, store_dir: str | Path, with_callout: bool) -> dict:
        """The extra users every node must know (before the server objects exist)."""
        self.with_callout = with_callout
        keys = Path(store_dir) / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        tester_pub = natsjwt.ensure_seed(keys / f"{TESTER}.nk", "user")
        everything = busauth.Permissions(publish=(">",), subscribe=(">",), allow_responses=True)
        secret_file = Path(store_dir) / "token-secret"
        if not secret_file.exists():
            secret_file.write_bytes(pki.new_token_secret().hex().encode())
            os.chmod(secret_file, 0o600)
        self.token_secret_file = secret_file
        self.token_secret = secret_file.read_bytes()
        self.callout: Optional[CalloutThread] = None
        return {TESTER: (tester_pub, everything)}

    def _register(self) -> None:
        _SERVERS[self.url] = self

    def close(self) -> None:
        """Stop the callout responder and the server(s) for good (fixture teardown)."""
        self._stop_callout()
        self.stop()

    def credentials(self, role: str) -> BusCredentials:
        if role == TESTER:
            return BusCredentials.for_seed(str(self.keys_dir / f"{TESTER}.nk"))
        return super().credentials(role)  # NatsServer's or NatsCluster's, after this mixin

    def _start_callout(self) -> None:
        if self.callout is None and self.with_callout:
            self.callout = CalloutThread(self)

    def _stop_callout(self) -> None:
        if self.callout is not None:
            self.callout.stop()
            self.callout = None

    def token(self, namespace: str, workload: str, sa: str = "default", *, audience: str = AUDIENCE,
              lifetime_s: float = 3600) -> str:
        return pki.make_local_token(self.token_secret, namespace, sa, workload, audience, lifetime_s=lifetime_s)

    def token_file(self, namespace: str, workload: str, sa: str = "default", **kw) -> str:
        path = Path(self.store_dir) / "tokens" / f"{namespace}.{workload}.token"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.token(namespace, workload, sa, **kw))
        return str(path)

    def workload_credentials(self, namespace: str, workload: str, sa: str = "default") -> BusCredentials:
        return BusCredentials.for_workload(self.token_file(namespace, workload, sa), namespace, workload)

    def bus(self, role: str, **kw) -> Bus:
        """A Bus (not started) with a static role's credentials."""
        return Bus(self.url, component=kw.pop("component", role), credentials=self.credentials(role), **kw)

    def env(self, role: str) -> dict[str, str]:
        """Environment giving a child process a role's credentials (TULLE_NATS_CREDS)."""
        return {"TULLE_NATS_URL": self.url, "TULLE_NATS_CREDS": str(self.seed_file(role))}


class MeshNats(_MeshBus, NatsServer):
    """with_callout=False: no callout responder of the tests' own (a test runs identity's)."""

    def __init__(self, store_dir: str | Path, *, with_callout: bool = True, **kw):
        extra_users = self._prepare(store_dir, with_callout)
        NatsServer.__init__(self, store_dir, extra_users=extra_users, **kw)
        self._register()

    def start(self, timeout: float = 10.0) -> "MeshNats":
        NatsServer.start(self, timeout)
        self._start_callout()
        return self



class MeshNatsCluster(_MeshBus, NatsCluster):
    """A JetStream cluster of `size` nodes on loopback (tulle.natsserver.NatsCluster) with
    what MeshNats adds; `url` lists every node. Kill a node with `nodes[i].kill()`."""

    def __init__(self, store_dir: str | Path, *, size: int = 3, with_callout: bool = True, **kw):
        Path(store_dir).mkdir(parents=True, exist_ok=True)
        extra_users = self._prepare(store_dir, with_callout)
        NatsCluster.__init__(self, store_dir, size=size, extra_users=extra_users, **kw)
        self._register()

    def start(self, timeout: float = 30.0) -> "MeshNatsCluster":
        NatsCluster.start(self, timeout)
        self._start_callout()
        return self



def cli_bus_args(url: str, role: str = "observer") -> list[str]:
    """`--nats URL --nats-creds FILE` for a `tulle` command reading the test server as `role`."""
    return ["--nats", str(url), "--nats-creds", str(server_for(url).seed_file(role))]


__all__ = ["MeshNats", "MeshNatsCluster", "CalloutThread", "AUDIENCE", "busauth", "bus_for", "server_for", "cli_bus_args"]
