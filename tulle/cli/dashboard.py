"""`tulle dashboard`: the mesh in a browser — topology, golden metrics, authorization,
identity, events and the installed components — read from the bus with the observer
credential, pushed live to the page.

    tulle dashboard                         http://localhost:50750 for the running `tulle up`
    tulle dashboard --port 8084 --open      another port, and open a browser
    tulle dashboard --nats tls://... --nats-creds observer.nk --nats-ca ca.crt    a cluster's bus
    tulle dashboard --address 0.0.0.0 --allowed-host dashboard.example.com        behind a proxy

It listens on 127.0.0.1 unless told otherwise and answers only requests whose Host is
that address, localhost or an --allowed-host name (DNS rebinding protection).
"""

from __future__ import annotations

import asyncio
import os
import signal

import click

from tulle.cli.common import CREDS_HELP, NATS_HELP, resolve_target
from tulle.cli.target import Cluster, resolve, target_options
from tulle.errors import UserError

DEFAULT_PORT = 50750  # as `linkerd viz dashboard`


def parse_window(value: str) -> float:
    from tulle.resources.parse import _Invalid, parse_duration_ms

    try:
        seconds = parse_duration_ms(value, "--window") / 1000.0
    except _Invalid:
        raise UserError(f"dashboard: --window {value!r}: expected a duration such as 10s or 1m") from None
    if not 2 <= seconds <= 60:
        raise UserError(f"dashboard: --window {value!r}: must be from 2s to 1m (proxies keep a minute of samples)")
    return seconds


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class _Borrowed:
    """The dashboard's own bus handed to `tulle check`'s gatherer, which closes what it is
    given: here closing is left to the dashboard."""

    def __init__(self, bus):
        self._bus = bus

    def __getattr__(self, name):
        return getattr(self._bus, name)

    async def close(self) -> None:
        return None


def check_gatherer(bus, target, bus_target, namespace: str):
    """() -> (mode, components, report, error): `tulle check`'s facts and checks, for the
    extensions page. Local mode when a local run is the bus we read, else the cluster.
    `bus`: the dashboard's connection, to `bus_target` (a tulle.cli.common.BusTarget)."""
    from tulle.check import core
    from tulle.dashboard import views
    from tulle.local.discover import local_bus

    local = local_bus(getattr(target, "state_dir", None)) if not isinstance(target, Cluster) else None
    use_local = local is not None and local.url == bus_target.url

    async def connect(_target, timeout: float = 3.0):
        return _Borrowed(bus)

    async def local_once():
        from tulle.check import local as local_checks
        from tulle.check.gather_local import gather

        facts = await gather(target.state, with_proxies=True, connect=connect)
        report = core.evaluate(local_checks.categories(True), facts)
        return "local", views.local_components(facts), report, ""

    async def cluster_once():
        from tulle.check import cluster as cluster_checks
        from tulle.check.gather_cluster import gather, read_bus

        cluster = target if isinstance(target, Cluster) else Cluster()
        try:
            configuration, problem = cluster.configuration(), ""
        except UserError as e:
            configuration, problem = None, str(e)
        facts = await asyncio.to_thread(gather, configuration, namespace=namespace, pre=False, with_proxies=True,
                                        client_error=problem)
        # The bus half of the checks (tulle-nats, and each proxy's heartbeat for the data
        # plane) over the dashboard's own connection, as `tulle check` reads it over its own.
        facts = await read_bus(facts, str(bus_target), connect)
        report = core.evaluate(cluster_checks.categories(pre=False, with_proxies=True, namespace=namespace), facts)
        return "cluster", views.cluster_components(facts), report, problem

    return local_once if use_local else cluster_once


async def serve(bus_target, *, address: str, port: int, settings, hosts: frozenset[str], check_target,
                namespace: str, announce) -> None:
    from aiohttp import web

    from tulle.cli.common import connect_bus
    from tulle.dashboard.hub import Hub
    from tulle.dashboard.server import make_app

    bus = await connect_bus(bus_target, what="dashboard")
    hub = Hub(bus, settings, url=bus_target.url or str(bus_target),
              check=check_gatherer(bus, check_target, bus_target, namespace))
    runner = web.AppRunner(make_app(hub, hosts=hosts), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, address, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise UserError(f"dashboard: cannot listen on {address}:{port}: {e.strerror or e}") from None
        hub.start()
        bound = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else port
        announce(url_for(address if address not in ("0.0.0.0", "::") else "localhost", bound))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await hub.stop()
        await runner.cleanup()
        await bus.close()


def choose_targets(nats_url, nats_creds, *, kubeconfig, context, kubernetes, namespace, state_dir):
    """(the bus to read, where the extensions page's checks look). The cluster flags choose
    the checks' mesh; the bus is that mesh's too unless --nats names one (in the chart: the
    NATS Service, with the checks in-cluster)."""
    direct = bool(nats_url or os.environ.get("TULLE_NATS_URL"))
    bus_target = resolve_target(nats_url, nats_creds, kubeconfig=None if direct else kubeconfig,
                                context=None if direct else context, kubernetes=kubernetes and not direct,
                                namespace=namespace)
    check_target = resolve(kubeconfig=kubeconfig, context=context, kubernetes=kubernetes, state_dir=state_dir)
    return _state_dir_bus(bus_target, state_dir), check_target


def _state_dir_bus(bus_target, state_dir):
    """With --state-dir, the bus of that run (not the default state dir's), unless a URL
    other than a local run's was asked for."""
    from tulle.bus import DEFAULT_URL
    from tulle.cli.common import BusTarget
    from tulle.local.discover import local_bus

    if not state_dir:
        return bus_target
    chosen, default = local_bus(state_dir), local_bus()
    if chosen is None or bus_target.url not in {DEFAULT_URL, default.url if default else None}:
        return bus_target
    creds = bus_target.creds_file if default is None or bus_target.creds_file != default.observer_creds else ""
    return BusTarget(chosen.url, creds or chosen.observer_creds, bus_target.ca_file or chosen.ca)


@click.command()
@click.option("--address", default="127.0.0.1", show_default=True,
              help="the address to listen on (0.0.0.0: every interface; then see --allowed-host)")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="the port to listen on (0: any free port)")
@click.option("--allowed-host", "allowed", multiple=True, metavar="NAME",
              help="also answer requests for this host name (e.g. the name an ingress serves it under); "
                   "localhost and the listening address always work")
@click.option("--window", default="10s", show_default=True, help="the span the live figures cover (2s to 1m)")
@click.option("--max-tabs", type=click.IntRange(1, 1000), default=16, show_default=True,
              help="browser tabs (event streams) served at once")
@click.option("-n", "--namespace", default="tulle", show_default=True,
              help="a cluster: the control plane's namespace (for the extensions page)")
@click.option("--open", "open_browser", is_flag=True, help="open the dashboard in a web browser")
@click.option("--nats", "nats_url", default=None, metavar="URL", help=NATS_HELP)
@click.option("--nats-creds", default=None, metavar="FILE", help=CREDS_HELP)
@target_options
def dashboard(address, port, allowed, window, max_tabs, namespace, open_browser, nats_url, nats_creds, kubeconfig,
              context, kubernetes, state_dir):
    """Serve the mesh's dashboard: topology, golden metrics, policy, identity, events, components.

    Read-only, from the bus (the observer credential of the running `tulle up`, or
    --nats/--nats-creds for a cluster). Ctrl-C stops it.
    """
    from tulle.dashboard.hub import Settings
    from tulle.dashboard.server import allowed_hosts

    settings = Settings(window_s=parse_window(window), max_streams=max_tabs)
    bus_target, check_target = choose_targets(nats_url, nats_creds, kubeconfig=kubeconfig, context=context,
                                              kubernetes=kubernetes, namespace=namespace, state_dir=state_dir)
    hosts = allowed_hosts(address, allowed)

    def announce(url: str) -> None:
        click.echo(f"Tulle dashboard: {url} (reading {bus_target}; Ctrl-C stops)")
        if open_browser:
            import webbrowser

            webbrowser.open(url)

    try:
        asyncio.run(serve(bus_target, address=address, port=port, settings=settings, hosts=hosts,
                          check_target=check_target, namespace=namespace,
                          announce=announce))
    except KeyboardInterrupt:
        pass

