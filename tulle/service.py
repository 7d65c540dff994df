"""What every control-plane service process shares: flags, logging, the admin server,
the bus connection, readiness, the ready CloudEvent and a clean SIGTERM shutdown.

A service is a coroutine `main(svc)` that does its work until cancelled; everything
around it lives here, so each service's own module holds only its own logic.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Awaitable, Callable

from tulle import __version__
from tulle.admin import AdminServer
from tulle.bus import MAX_REPLICAS, SHARED_STORES, Bus, BusCredentials, nats_url
from tulle.errors import UserError
from tulle.log import setup_logging
from tulle.metrics import REGISTRY

# DESIGN.md, "Ports": each service's admin server.
ADMIN_PORTS = {"destination": 9990, "identity": 9991, "policy": 9992, "injector": 9993}


class Service:
    def __init__(self, component: str, args: argparse.Namespace):
        self.component = component
        self.args = args
        self.log = setup_logging(component, args.log_level, args.log_format)
        self.bus = Bus(args.nats, component=component, replicas=args.nats_replicas,
                       credentials=BusCredentials.for_seed(args.nats_creds, ca_file=args.nats_ca))
        host, _, port = args.admin.rpartition(":")
        self.admin = AdminServer(host or "0.0.0.0", int(port), ready=self.is_ready)
        self._checks: dict[str, Callable[[], bool]] = {}
        self.stopping = asyncio.Event()
        self._was_ready = False
        self.m_ready = REGISTRY.gauge("tulle_ready", "1 while this process reports ready")
        REGISTRY.gauge("tulle_build_info", "Version of this process", ("component", "version")).labels(
            component, __version__).set(1)

    def add_ready_check(self, name: str, fn: Callable[[], bool]) -> None:
        """Ready needs the bus and every check to pass (e.g. 'issuer loaded', 'first sync done')."""
        self._checks[name] = fn

    def is_ready(self) -> bool:
        return self.bus.connected and all(fn() for fn in self._checks.values())

    def not_ready_reasons(self) -> list[str]:
        reasons = [] if self.bus.connected else ["nats"]
        return reasons + [name for name, fn in self._checks.items() if not fn()]

    async def _watch_readiness(self) -> None:
        # Polling every 100 ms is simpler than wiring every condition to an event, and
        # cheap; it bounds how late the ready event can be.
        while True:
            ready = self.is_ready()
            self.m_ready.set(1 if ready else 0)
            if ready and not self._was_ready:
                self.log.info("ready", admin=self.admin.address)
                await self.bus.publish_event("ready", {
                    "component": self.component, "instance": self.bus.instance, "version": __version__,
                    "admin": self.admin.address, "pid": os.getpid(),
                })
            elif not ready and self._was_ready:
                self.log.warning("not ready", waiting_for=self.not_ready_reasons())
            self._was_ready = ready
            await asyncio.sleep(0.1)

    async def run(self, main: Callable[["Service"], Awaitable[None]]) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self.admin.start()
        except OSError as e:
            self.log.error("cannot start the admin server", address=self.admin.address, error=str(e))
            return 1
        self.log.info("starting", version=__version__, nats=self.bus.url, admin=self.admin.address)
        self.bus.on_connection_change(lambda up: up and asyncio.ensure_future(self._on_connect()))
        await self.bus.start(wait=False)
        tasks = [asyncio.ensure_future(main(self)), asyncio.ensure_future(self._watch_readiness())]
        stop = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait([stop, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if tasks[0] in done and not tasks[0].cancelled() and tasks[0].exception() is not None:
            self.log.error("service failed", error=repr(tasks[0].exception()))
            code = 1
        self.log.info("stopping")
        for t in tasks + [stop]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.bus.close()
        await self.admin.close()
        self.log.info("stopped")
        return code

    async def _on_connect(self) -> None:
        """Make the stores no one service owns (the event stream, heartbeats, leases) when
        missing, whichever service comes first: proxies may write to them but not make them.

        Tried again while connected: a cluster's JetStream answers only once its nodes have
        elected a leader, which may come a few seconds after a client could connect."""
        delay = 0.1
        while self.bus.connected:
            try:
                await self.bus.ensure_events_stream()
                for bucket in SHARED_STORES:
                    await self.bus.kv(bucket)
                return
            except Exception as e:  # NATS gone again: the next connection tries again
                import nats.js.errors

                # JetStream refusing (not merely busy electing) is a configuration to fix, such as
                # --nats-replicas above the servers NATS has: say so where an operator looks.
                refused = isinstance(e, nats.js.errors.APIError) and getattr(e, "code", None) != 503
                (self.log.warning if refused else self.log.debug)(
                    "could not ensure the shared stores", error=str(e) or type(e).__name__,
                    replicas=self.bus.replicas)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def parse_args(component: str, argv: list[str] | None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m services.{component}", description=f"Tulle {component} service")
    p.add_argument("--nats", default=nats_url(), help="NATS URL (env TULLE_NATS_URL)")
    p.add_argument("--nats-creds", metavar="FILE", default=os.environ.get("TULLE_NATS_CREDS", ""),
                   help="this service's NATS nkey seed file (env TULLE_NATS_CREDS)")
    p.add_argument("--nats-ca", metavar="FILE", default=os.environ.get("TULLE_NATS_CA", ""),
                   help="CA to verify NATS's TLS certificate; TLS to NATS when set (env TULLE_NATS_CA)")
    p.add_argument("--nats-replicas", metavar="N", type=_replicas,
                   default=os.environ.get("TULLE_NATS_REPLICAS") or "1",
                   help=f"copies of each KV bucket and of the event stream this service creates: the NATS "
                        f"cluster's node count, 1 to {MAX_REPLICAS} (env TULLE_NATS_REPLICAS; default 1)")
    p.add_argument("--admin", default=os.environ.get("TULLE_ADMIN_ADDR", f"0.0.0.0:{ADMIN_PORTS[component]}"),
                   help="admin listen address host:port (env TULLE_ADMIN_ADDR)")
    p.add_argument("--log-level", default=os.environ.get("TULLE_LOG_LEVEL", "info"))
    p.add_argument("--log-format", choices=["json", "console"], default=os.environ.get("TULLE_LOG_FORMAT"))
    if add_arguments is not None:
        add_arguments(p)
    return p.parse_args(argv)


def _replicas(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to {MAX_REPLICAS}, got {text!r}")
    return n


def run_service(component: str, main: Callable[[Service], Awaitable[None]], argv: list[str] | None = None,
                add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                prepare: Callable[[Service], None] | None = None) -> None:
    """Entry point of `python -m services.<component>`. Bad flags or files found by
    `prepare` (a UserError) are one line on stderr and exit code 2."""
    args = parse_args(component, argv, add_arguments)

    async def _run() -> int:
        svc = Service(component, args)
        if prepare is not None:
            prepare(svc)
        return await svc.run(main)

    try:
        code = run_async(_run())
    except UserError as e:
        print(f"tulle {component}: {e}", file=sys.stderr)
        code = e.exit_code
    sys.exit(code)


def run_async(coro) -> int:
    """Run a process's main coroutine on uvloop."""
    import uvloop
    return uvloop.run(coro)
