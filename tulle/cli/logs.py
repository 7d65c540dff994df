"""`tulle logs`: the logs of the control plane and the proxies, from the running local mode
(the runner's log files) or a cluster (pods/log).

    tulle logs --component identity -f       follow the identity service
    tulle logs --component proxy -n demo     every proxy of a namespace
    tulle logs web -n demo                   a workload's pods (or a pod), every container
    tulle logs web -n demo --container tulle-proxy --since 10m --tail 50

Each pod and container gets its own coloured `[prefix]` when several are shown. On a
terminal, structlog's JSON lines are shown readably (time, level, event, key=value);
piped, every line is passed through unchanged, so `tulle logs ... | jq` works.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Optional, TextIO

import click

from tulle import installation
from tulle.cli.names import complete_container, complete_namespace, workload_completer
from tulle.cli.target import Cluster, resolve, target_options
from tulle.logs import LogStream
from tulle.logs.select import Selection, Window
from tulle.logs.view import prefix, readable


def parse_since(value: Optional[str]):
    if value is None:
        return None
    from tulle.cli.events import parse_since as parse

    return parse(value)


class Printer:
    """Writes lines as the output wants them: readable and coloured on a terminal, raw when piped."""

    def __init__(self, streams: list[LogStream], out: TextIO, *, show_prefix: Optional[bool] = None):
        self.streams, self.out = streams, out
        self.tty = out.isatty()
        self.colour = self.tty and "NO_COLOR" not in os.environ
        self.show_prefix = show_prefix if show_prefix is not None else len(streams) > 1

    def line(self, index: int, line: str) -> None:
        text = readable(line, self.colour) if self.tty else line
        if self.show_prefix:
            text = prefix(self.streams[index].label, index, self.colour) + text
        self.out.write(text + "\n")
        self.out.flush()


def show(streams: list[LogStream], printer: Printer, *, follow: bool) -> int:
    """Print every stream: one after the other, or (following) merged as lines arrive.
    Returns the exit code: 1 when a stream could not be read."""
    failed = 0
    if not follow:
        for i, s in enumerate(streams):
            try:
                for line in s.lines():
                    printer.line(i, line)
            except Exception as e:  # StreamError and friends: one line, the other streams go on
                print(f"tulle: logs: {s.label}: {_one_line(e)}", file=sys.stderr, flush=True)
                failed += 1
        return 1 if failed else 0

    arrived: queue.Queue = queue.Queue()
    END = object()

    def pump(i: int, s: LogStream) -> None:
        try:
            for line in s.lines():
                arrived.put((i, line))
        except Exception as e:
            arrived.put((i, e))
        arrived.put((i, END))

    for i, s in enumerate(streams):
        threading.Thread(target=pump, args=(i, s), name=f"logs-{s.label}", daemon=True).start()
    running = len(streams)
    try:
        while running:
            i, item = arrived.get()
            if item is END:
                running -= 1
            elif isinstance(item, Exception):
                print(f"tulle: logs: {streams[i].label}: {_one_line(item)}", file=sys.stderr, flush=True)
                failed += 1
            else:
                printer.line(i, item)
    finally:
        for s in streams:
            s.close()
    return 1 if failed else 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@click.command()
@click.argument("name", required=False, metavar="[POD|WORKLOAD]", shell_complete=workload_completer())
@click.option("--component", type=click.Choice(installation.LOG_COMPONENTS),
              help="a control-plane component, or `proxy`: the proxies (of -n NAMESPACE, of NAME)")
@click.option("-c", "--container", default=None, help="only this container of the pod (e.g. tulle-proxy)",
              shell_complete=complete_container)
@click.option("-n", "--namespace", default=None, shell_complete=complete_namespace,
              help="the pod's namespace (default: default; the control plane's for --component)")
@click.option("--since", default=None, metavar="DURATION", help="only lines written this long ago or later (e.g. 10m)")
@click.option("--tail", type=click.IntRange(min=0), default=None, help="only the last N lines of each container")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines as they are written (Ctrl-C stops)")
@click.option("--prefix/--no-prefix", "show_prefix", default=None,
              help="start each line with [pod/container] (default: when several are shown)")
@target_options
def logs(name: Optional[str], component: Optional[str], container: Optional[str], namespace: Optional[str],
         since: Optional[str], tail: Optional[int], follow: bool, show_prefix: Optional[bool],
         kubeconfig: Optional[str], context: Optional[str], kubernetes: bool, state_dir: Optional[str]) -> None:
    """Show the logs of control-plane components and proxies, from the local run or a cluster."""
    window = Window(tail=tail, since=parse_since(since), follow=follow)
    sel = Selection(component=component, name=name, namespace=namespace, container=container)
    target = resolve(kubeconfig=kubeconfig, context=context, kubernetes=kubernetes, state_dir=state_dir)
    if isinstance(target, Cluster):
        from tulle.logs import kube

        streams = kube.streams(target.configuration(), sel, window, installation.CONTROL_PLANE_NAMESPACE)
    else:
        from tulle.local.state import read_record
        from tulle.logs import local

        record = read_record(target.state)
        if record is None:
            click.echo(f"tulle: logs: tulle is not running (state dir {target.state.root}); start it with "
                       "`tulle up`, or look at a cluster with --kubeconfig / --context", err=True)
            sys.exit(1)
        streams = local.streams(record, sel, window)
    try:
        code = show(streams, Printer(streams, sys.stdout, show_prefix=show_prefix), follow=follow)
    except KeyboardInterrupt:
        code = 0
    if code:
        raise click.exceptions.Exit(code)

