"""`tulle check`: is the mesh healthy? Linkerd's `linkerd check`, against the running local
mode (over its run record, its processes and the bus) or a cluster (through the API).

    tulle check                   every category, each check √ / ‼ / × (a hint under every ‼ and ×)
    tulle check -o short          only what is not √, and the summary line
    tulle check -o json           {success, categories: [{categoryName, checks: [...]}]}
    tulle check --proxy           also the data plane: every proxy
    tulle check --pre             before an install: API, permissions, CRDs (a cluster)
    tulle check --wait 5m         retry (every 2 s) while something that may heal is failing

Exit status 0 when nothing is ×, 1 otherwise, 2 for a bad flag. The checks themselves
live in tulle/check/.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Optional

import click

from tulle import installation
from tulle.check import core
from tulle.cli.names import complete_namespace
from tulle.cli.target import Cluster, Local, resolve, target_options
from tulle.errors import UserError

# How often --wait runs the checks again. Every round reads the run record, probes each
# process and reads the bus (or the API) once: a few dozen requests, cheap at this pace.
WAIT_INTERVAL_S = 2.0


def parse_wait(value: str) -> float:
    from tulle.resources.parse import _Invalid, parse_duration_ms

    try:
        return parse_duration_ms(value, "--wait") / 1000.0
    except _Invalid:
        raise UserError(f"--wait: expected a duration such as '30s', '5m' or '0s', got {value!r}") from None


def run_local(target: Local, with_proxies: bool) -> core.Report:
    from tulle.check import local
    from tulle.check.gather_local import gather
    from tulle.cli.common import connect_bus

    facts = asyncio.run(gather(target.state, with_proxies=with_proxies, connect=connect_bus))
    return core.evaluate(local.categories(with_proxies), facts)


def run_cluster(target: Cluster, *, namespace: str, pre: bool, with_proxies: bool) -> core.Report:
    from tulle.check import cluster
    from tulle.check.gather_cluster import gather, read_bus
    from tulle.cli.common import BusTarget, connect_bus

    try:
        configuration, problem = target.configuration(), ""
    except UserError as e:
        configuration, problem = None, str(e)
    facts = gather(configuration, namespace=namespace, pre=pre, with_proxies=with_proxies, client_error=problem)
    # The cluster's NATS as every CLI command reaches it: a port-forward, the observer credential
    # of the cluster's Secret (or TULLE_NATS_CREDS / TULLE_NATS_CA, as for the other commands).
    bus = BusTarget("", os.environ.get("TULLE_NATS_CREDS", ""), os.environ.get("TULLE_NATS_CA", ""), cluster=target,
                    namespace=namespace)
    facts = asyncio.run(read_bus(facts, bus, connect_bus))
    return core.evaluate(cluster.categories(pre=pre, with_proxies=with_proxies, namespace=namespace), facts)


def render(report: core.Report, output: str, colour: bool) -> str:
    if output == "json":
        return core.render_json(report)
    if output == "short":
        return core.render_short(report, colour)
    return core.render_table(report, colour)


@click.command()
@click.option("-o", "--output", type=click.Choice(["table", "short", "json"]), default="table", show_default=True,
              help="short: only what is not √; json: Linkerd's check JSON")
@click.option("--pre", is_flag=True, help="before an install: the API, your permissions, the CRDs (a cluster)")
@click.option("--proxy", "with_proxies", is_flag=True, help="also check the data plane: every proxy")
@click.option("--wait", "wait", default="5m", show_default=True, metavar="DURATION",
              help="retry this long while a check that may heal fails (a process restarting, a pod starting); "
                   "0s: once")
@click.option("-n", "--namespace", default=installation.CONTROL_PLANE_NAMESPACE, show_default=True,
              help="a cluster: the control plane's namespace", shell_complete=complete_namespace)
@target_options
def check(output: str, pre: bool, with_proxies: bool, wait: str, namespace: str, kubeconfig: Optional[str],
          context: Optional[str], kubernetes: bool, state_dir: Optional[str]) -> None:
    """Check that the mesh is healthy: each check √, ‼ (warning) or × (error), with a hint.

    Looks at the running `tulle up` (or --state-dir), or at a cluster with --kubeconfig /
    --context / --kubernetes (or when no local mesh runs and a kubeconfig exists).
    Exits 1 when any check is ×.
    """
    from tulle.log import setup_logging

    setup_logging("cli", "error")  # stdout carries the report only
    wait_s = parse_wait(wait)
    target = resolve(kubeconfig=kubeconfig, context=context, kubernetes=kubernetes or pre, state_dir=state_dir)
    if isinstance(target, Local) and pre:
        raise UserError("--pre checks a cluster before an install")

    def once() -> core.Report:
        if isinstance(target, Cluster):
            return run_cluster(target, namespace=namespace, pre=pre, with_proxies=with_proxies)
        return run_local(target, with_proxies)

    deadline = time.monotonic() + wait_s
    said: Optional[tuple] = None
    while True:
        report = once()
        if report.success or not report.worth_waiting or time.monotonic() + WAIT_INTERVAL_S > deadline:
            break
        failing = tuple(r.description for r in report.failures)
        if failing != said:  # say what we wait for, on stderr, whenever it changes
            said = failing
            print(f"waiting for: {'; '.join(failing)} (checking every {WAIT_INTERVAL_S:g} s for up to {wait})",
                  file=sys.stderr, flush=True)
        time.sleep(WAIT_INTERVAL_S)
    colour = output != "json" and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    click.echo(render(report, output, colour), nl=False)
    if not report.success:
        raise click.exceptions.Exit(1)
