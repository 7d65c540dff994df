"""`tulle up`, `tulle status`, `tulle down`: local mode (tulle/local/)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from tulle.errors import UserError
from tulle.schemas import DEFAULT_POLICIES

STATE_DIR_OPTION = click.option(
    "--state-dir", envvar="TULLE_STATE_DIR", type=click.Path(file_okay=False),
    help="where local mode keeps its record, logs, NATS store and identity material "
         "(env TULLE_STATE_DIR; default ~/.local/state/tulle)")


def bundled_demo() -> Path:
    return Path(__file__).resolve().parents[2] / "examples" / "demo"


@click.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--detach", "-d", is_flag=True, help="start in the background, wait until ready and return")
@click.option("--isolation", type=click.Choice(["auto", "netns", "none"]), default="auto", show_default=True,
              help="netns: a network namespace per workload with iptables redirection (root on Linux); "
                   "none: loopback addresses, apps reach others through their proxy")
@click.option("--no-proxy", is_flag=True, help="run the apps without proxies (for debugging)")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="with --detach: seconds to wait for everything to be ready")
@click.option("--default-inbound-policy", type=click.Choice(list(DEFAULT_POLICIES)), default="all-unauthenticated",
              show_default=True, help="the mesh's default inbound policy (a namespace or workload annotation overrides it)")
@click.option("--nats-tls", is_flag=True, help="TLS on the bus too (it is always authenticated)")
@click.option("--nats-cluster", type=click.IntRange(1, 5), default=1, show_default=True, metavar="N",
              help="run NATS as a JetStream cluster of N servers (3: any one may die, nothing is lost), "
                   "as in Kubernetes")
@STATE_DIR_OPTION
def up(directory, detach, isolation, no_proxy, timeout, default_inbound_policy, nats_tls, nats_cluster, state_dir):
    """Start NATS, the control plane and every Workload in DIRECTORY (default: the bundled demo)."""
    from tulle.local import plan
    from tulle.local.state import AlreadyRunning, StateDir, acquire_lock, read_record
    from tulle.resources.parse import load_dir

    directory = (directory or bundled_demo()).resolve()
    try:
        load_dir(directory)  # a bad manifest stops us here, before anything starts (ManifestError: exit 2)
    except OSError as e:
        raise UserError(f"{e.filename or directory}: {e.strerror}") from None
    resolved = plan.resolve_isolation(
        isolation, is_root=os.geteuid() == 0, is_linux=platform.system() == "Linux",
        have_ip=shutil.which("ip") is not None,
        have_iptables=shutil.which("iptables") is not None and shutil.which("iptables-restore") is not None)
    state = StateDir.at(state_dir)
    try:
        state.make()
        lock_fd = acquire_lock(state)
    except AlreadyRunning as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    except OSError as e:
        raise UserError(f"--state-dir {state.root}: {e.strerror}") from None
    if read_record(state):
        from tulle.local.teardown import stop_run

        click.echo("cleaning up after an earlier run that did not stop cleanly", err=True)
        stop_run(state, stale_only=True)
    if detach:
        _up_detached(state, lock_fd, directory, resolved, no_proxy, timeout, default_inbound_policy, nats_tls,
                     nats_cluster)
    else:
        _up_foreground(state, lock_fd, directory, resolved, no_proxy, default_inbound_policy, nats_tls, nats_cluster)


def _up_detached(state, lock_fd: int, directory: Path, isolation: str, no_proxy: bool, timeout: float,
                 default_policy: str, nats_tls: bool, nats_cluster: int = 1) -> None:
    from tulle.local.procs import log_tail
    from tulle.local.state import read_record

    log = state.log("supervisor")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tulle.local.supervisor", str(directory), "--state-dir", str(state.root),
           "--isolation", isolation, "--lock-fd", str(lock_fd), "--default-inbound-policy", default_policy] \
        + (["--no-proxy"] if no_proxy else []) + (["--nats-tls"] if nats_tls else []) \
        + (["--nats-cluster", str(nats_cluster)] if nats_cluster > 1 else [])
    with open(log, "ab") as out:
        sup = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True, pass_fds=(lock_fd,))
    os.close(lock_fd)  # the supervisor holds the lock now
    deadline = time.monotonic() + timeout
    record = None
    while time.monotonic() < deadline:
        if sup.poll() is not None:
            lines = [ln for ln in log_tail(log, 20).splitlines() if ln.startswith("tulle: ")]
            click.echo(lines[-1] if lines else f"tulle: the supervisor stopped ({sup.returncode}); see {log}", err=True)
            sys.exit(1)
        record = read_record(state)
        if record and record.get("ready") and record.get("supervisor", {}).get("pid") == sup.pid:
            break
        failing = _failing_workload(record) if record else None
        if failing:
            click.echo(f"tulle: {failing}; everything else keeps running: fix it and it is picked up, "
                       "or `tulle down`", err=True)
            sys.exit(1)
        time.sleep(0.1)
    else:
        from tulle.local.status import collect

        view = asyncio.run(collect(state)) if record else None
        waiting = []
        if view:
            waiting += [c["name"] for c in view["components"] if not c["ready"]]
            waiting += [f"{w['namespace']}/{w['name']}" + ("" if not w["proxy"] or w["proxy"]["ready"] else " (proxy)")
                        for w in view["workloads"] if not w["ready"]]
        click.echo(f"tulle: not ready after {timeout:.0f} s: {', '.join(waiting) or 'starting'}; it keeps trying "
                   f"in the background: `tulle status` shows progress, logs are in {state.logs}, "
                   "`tulle down` stops it", err=True)
        sys.exit(1)
    workloads = record.get("workloads") or []
    nodes = len((record.get("nats") or {}).get("nodes") or [None])
    click.echo(f"tulle is up: {len(record.get('components') or [])} services, {len(workloads)} workloads "
               f"({'netns' if isolation == 'netns' else 'loopback'} isolation"
               f"{', no proxies' if no_proxy else ''}), NATS {record['nats']['url']}"
               + (f" (a cluster of {nodes})" if nodes > 1 else ""))
    click.echo(f"state {state.root}; `tulle status` shows it, `tulle events` follows it, `tulle down` stops it")


CRASH_LOOP_RESTARTS = 3


def _failing_workload(record: dict) -> str | None:
    """One line about a workload that cannot start or keeps crashing, if any (the
    detached `up` reports it at once instead of waiting out its timeout)."""
    from tulle.local.procs import log_tail

    for w in record.get("workloads") or []:
        if w.get("ready"):
            continue
        app, proxy = w.get("app") or {}, w.get("proxy") or {}
        name = f"{w.get('namespace')}/{w.get('name')}"
        if str(app.get("last_exit", "")).startswith("could not start"):
            return f"{name} {app['last_exit']}"
        for what, part in (("app", app), ("proxy", proxy)):
            if part and part.get("restarts", 0) >= CRASH_LOOP_RESTARTS:
                last = log_tail(Path(part.get("log", "")), 1) if part.get("log") else ""
                how = f" ({part['last_exit']})" if part.get("last_exit") else ""
                return (f"{name}: its {what} keeps stopping{how}, {part['restarts']} restarts; "
                        f"see {part.get('log')}" + (f": {last}" if last else ""))
    return None


def _up_foreground(state, lock_fd: int, directory: Path, isolation: str, no_proxy: bool, default_policy: str,
                   nats_tls: bool, nats_cluster: int = 1) -> None:
    import structlog
    from rich.console import Console, Group
    from rich.live import Live
    from rich.text import Text

    from tulle.local.runner import RunOptions, Runner, StartError
    from tulle.local.status import collect, render
    from tulle.log import setup_logging

    # The terminal shows the live view; the supervisor's own log goes to its file.
    state.logs.mkdir(parents=True, exist_ok=True)
    logfile = open(state.log("supervisor"), "a", buffering=1)
    setup_logging("local", fmt="json")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=logfile))
    console = Console()
    runner = Runner(RunOptions(manifests=directory, state=state, isolation=isolation, meshed=not no_proxy,
                               default_inbound_policy=default_policy, nats_tls=nats_tls,
                               nats_cluster=nats_cluster))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, runner.stopping.set)
        task = asyncio.ensure_future(runner.run())
        if console.is_terminal:
            with Live(Text("starting…"), console=console, refresh_per_second=4, transient=False) as live:
                while not task.done():
                    if runner.stopping.is_set():
                        live.update(Text("stopping…"))
                    elif runner.phase == "running":
                        view = await collect(state, runner.record())
                        live.update(Group(render(view), Text("Ctrl-C stops everything", style="dim")))
                    await asyncio.wait([task], timeout=1.0)
        else:
            announced = False
            while not task.done():
                if not announced and runner.record()["ready"]:
                    announced = True
                    view = await collect(state, runner.record())
                    console.print(render(view))
                    console.print("tulle is up; Ctrl-C or SIGTERM stops everything")
                await asyncio.wait([task], timeout=0.5)
        await task

    try:
        asyncio.run(main())
    except StartError as e:
        click.echo(f"tulle: {e}", err=True)
        sys.exit(1)
    finally:
        os.close(lock_fd)
        logfile.close()
    console.print("tulle stopped")


@click.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@STATE_DIR_OPTION
def status(output, state_dir):
    """Show every component, workload (with its proxy) and service of the local run."""
    from rich.console import Console

    from tulle.local.state import StateDir
    from tulle.local.status import collect, render

    state = StateDir.at(state_dir)
    view = asyncio.run(collect(state))
    if view is None:
        click.echo(f"tulle is not running (state dir {state.root}); start it with `tulle up`", err=True)
        sys.exit(1)
    if output == "json":
        click.echo(json.dumps(view, indent=2))
    else:
        Console().print(render(view))
    if not view["supervisor"]["running"]:
        click.echo("the supervisor is not running (a crashed `tulle up`?): `tulle down` cleans up", err=True)
        sys.exit(1)


@click.command()
@STATE_DIR_OPTION
def down(state_dir):
    """Stop everything `tulle up` started: workloads, proxies, services, NATS, namespaces."""
    from tulle.local.state import StateDir
    from tulle.local.teardown import stop_run

    state = StateDir.at(state_dir)
    report = stop_run(state)
    if not report.was_running:
        click.echo(f"tulle is not running (state dir {state.root})")
        return
    for p in report.problems:
        click.echo(f"tulle: {p}", err=True)
    if report.killed:
        click.echo(f"stopped {len(report.killed)} leftover processes: {', '.join(report.killed)}", err=True)
    click.echo("tulle stopped")


@click.command()
@click.argument("workloads", nargs=-1)
@click.option("-n", "--namespace", default=None, help="only workloads of this namespace")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="seconds to wait for each proxy")
@STATE_DIR_OPTION
def restart(workloads, namespace, timeout, state_dir):
    """Restart the proxies of the running mesh's workloads, one at a time (all, or WORKLOADS).

    What `kubectl rollout restart` is to a cluster: a proxy reads its configuration —
    the trust anchors among it — when it starts, so rotating the anchors ends with this.
    """
    import signal as signals

    from tulle.local.state import StateDir, process_alive, read_record

    state = StateDir.at(state_dir)
    record = read_record(state)
    if not record or not process_alive((record.get("supervisor") or {}).get("pid"),
                                       (record.get("supervisor") or {}).get("start")):
        raise UserError(f"restart: tulle is not running (state dir {state.root})")
    chosen = [w for w in record.get("workloads") or [] if w.get("proxy")
              and (not namespace or w["namespace"] == namespace) and (not workloads or w["name"] in workloads)]
    unknown = set(workloads) - {w["name"] for w in chosen}
    if unknown:
        raise UserError(f"restart: no meshed workload named {', '.join(sorted(unknown))}")
    for w in chosen:
        old = w["proxy"]["pid"]
        if old and process_alive(old, w["proxy"].get("start")):
            os.kill(old, signals.SIGTERM)
        deadline = time.monotonic() + timeout
        while True:
            now = next((x for x in (read_record(state) or {}).get("workloads") or [] if x["key"] == w["key"]), None)
            proxy = (now or {}).get("proxy") or {}
            if proxy.get("pid") not in (None, old) and proxy.get("ready"):
                break
            if time.monotonic() > deadline:
                raise UserError(f"restart: the proxy of {w['key']} was not ready again after {timeout:g} s; "
                                f"see {proxy.get('log', state.logs)}")
            time.sleep(0.1)
        click.echo(f"restarted the proxy of {w['namespace']}/{w['name']}")
