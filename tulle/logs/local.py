"""The logs of a local run: the runner writes every process's output to
`<state>/logs/<name>.log` (tulle/local/state.py) and names each file in the run record.

A control-plane component is its own "pod" (`identity`); a Workload is a pod with two
containers, as the Pod manifest the runner writes says: the app (named after the
workload) and `tulle-proxy`. Following polls the file: cheap, and it survives the file
being replaced (a new run) or truncated.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from tulle.errors import UserError
from tulle.logs import LogStream
from tulle.logs.select import Selection, Window
from tulle.local.state import nats_nodes
from tulle.logs.view import line_time

PROXY_CONTAINER = "tulle-proxy"
CONTROL_PLANE = ("nats", "destination", "identity", "policy", "injector")
POLL_INTERVAL_S = 0.2  # how often a followed file is looked at


@dataclass(frozen=True)
class LogFile:
    label: str
    namespace: Optional[str]  # None for the control plane
    pod: str
    container: str
    path: Path


def log_files(record: dict) -> list[LogFile]:
    """Every log a run record names, control plane first."""
    files = []
    for node in nats_nodes(record):  # a cluster's nodes are the containers of one component
        if node.get("log"):
            files.append(LogFile(node["name"], None, "nats", node["name"], Path(node["log"])))
    for c in record.get("components") or []:
        if c.get("log"):
            files.append(LogFile(c["name"], None, c["name"], c["name"], Path(c["log"])))
    for w in sorted(record.get("workloads") or [], key=lambda w: (w.get("namespace", ""), w.get("name", ""))):
        ns, name = w.get("namespace", ""), w.get("name", "")
        app = (w.get("app") or {}).get("log")
        if app:
            files.append(LogFile(f"{ns}/{name}/{name}", ns, name, name, Path(app)))
        proxy = (w.get("proxy") or {}).get("log")
        if proxy:
            files.append(LogFile(f"{ns}/{name}/{PROXY_CONTAINER}", ns, name, PROXY_CONTAINER, Path(proxy)))
    return files


def select(files: list[LogFile], sel: Selection) -> list[LogFile]:
    """The files a selection names; UserError (one line) when it names none."""
    if sel.component and sel.component != "proxy":
        chosen = [f for f in files if f.namespace is None and f.pod == sel.component]
        if not chosen:
            raise UserError(f"logs: this local run has no {sel.component} (`tulle status` lists what runs)")
        return chosen
    workloads = [f for f in files if f.namespace is not None and (sel.namespace is None or f.namespace == sel.namespace)]
    if sel.component == "proxy":
        chosen = [f for f in workloads if f.container == PROXY_CONTAINER and (sel.name is None or f.pod == sel.name)]
        if not chosen:
            where = f" named {sel.name}" if sel.name else ""
            raise UserError(f"logs: no meshed workload{where}{_in(sel)} in this local run")
        return chosen
    if not sel.name:
        raise UserError("logs: name a workload, or pick --component (destination, identity, policy, injector, nats, "
                        "proxy)")
    chosen = [f for f in workloads if f.pod == sel.name]
    if not chosen and sel.namespace is None:
        chosen = [f for f in files if f.namespace is None and f.pod == sel.name]  # `tulle logs identity`
    if not chosen:
        raise UserError(f"logs: no workload named {sel.name}{_in(sel)} in this local run (`tulle status` lists them)")
    if len({f.namespace for f in chosen}) > 1:
        namespaces = ", ".join(sorted({f.namespace for f in chosen}))
        raise UserError(f"logs: {sel.name} runs in several namespaces ({namespaces}): give -n NAMESPACE")
    if sel.container:
        containers = sorted({f.container for f in chosen})
        chosen = [f for f in chosen if f.container == sel.container]
        if not chosen:
            raise UserError(f"logs: {sel.name} has no container {sel.container} (it has {', '.join(containers)})")
    return chosen


def _in(sel: Selection) -> str:
    return f" in namespace {sel.namespace}" if sel.namespace else ""


def streams(record: dict, sel: Selection, window: Window) -> list[LogStream]:
    out = []
    for f in select(log_files(record), sel):
        stop = threading.Event()
        out.append(LogStream(f.label, (lambda f=f, stop=stop: file_lines(f.path, window, stop)), stop.set))
    return out


# --- reading a file ----------------------------------------------------------------------------


def _split(data: bytes) -> tuple[list[str], bytes]:
    """The complete lines in `data` (without their newlines), and what follows the last one."""
    last = data.rfind(b"\n")
    if last < 0:
        return [], data
    return data[:last].decode("utf-8", "replace").split("\n"), data[last + 1:]


def _last_lines(fh, n: int, block: int = 65536) -> tuple[list[str], int]:
    """The last n complete lines of an open binary file (read backwards, a block at a
    time), and the offset just past the last one."""
    fh.seek(0, os.SEEK_END)
    pos = end = fh.tell()
    data = b""
    while pos > 0 and data.count(b"\n") <= n:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        data = fh.read(step) + data
    lines, rest = _split(data)
    if pos > 0:
        lines = lines[1:]  # the first may be the end of a line that began before `pos`
    return (lines[-n:] if n else []), end - len(rest)


def file_lines(path: Path, window: Window, stop: threading.Event, poll: float = POLL_INTERVAL_S) -> Iterator[str]:
    """The file's lines in the window, then (following) each new line once it is complete."""
    ident, offset = None, 0
    try:
        with open(path, "rb") as fh:
            ident = os.fstat(fh.fileno()).st_ino
            if window.tail is not None and window.since is None:
                lines, offset = _last_lines(fh, window.tail)
            else:
                data = fh.read()
                lines, rest = _split(data)
                offset = len(data) - len(rest)
                lines = _since(lines, window)
                if window.tail is not None:
                    lines = lines[-window.tail:] if window.tail else []
    except FileNotFoundError:
        lines = []
    yield from lines
    if not window.follow:
        return
    partial = b""
    while not stop.wait(poll):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_ino != ident or st.st_size < offset:  # replaced or truncated: read it from its start
            ident, offset, partial = st.st_ino, 0, b""
        if st.st_size == offset:
            continue
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(st.st_size - offset)
        offset += len(data)
        lines, partial = _split(partial + data)
        yield from lines


def _since(lines: list[str], window: Window) -> list[str]:
    """Lines written at the cutoff or later. A line that carries no time of its own (an
    app's print) goes with the last line before it that does; lines before any such line
    are kept, as nothing says they are old."""
    cutoff = window.cutoff()
    if cutoff is None:
        return lines
    out, known = [], None
    for line in lines:
        known = line_time(line) or known
        if known is None or known >= cutoff:
            out.append(line)
    return out
