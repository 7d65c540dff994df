"""`tulle logs`: the logs of the control plane and the proxies, from a cluster or a local run.

  view   pure: a structlog JSON line made readable, the per-stream prefix and colour,
         the time of a line (for --since)
  local  the runner's log files (<state>/logs/<name>.log), read and followed by polling
  kube   pods/log through the official client, with follow

Each source yields `LogStream`s; each stream is an iterator of lines that blocks while
following. The command merges them, one thread per stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass
class LogStream:
    label: str  # the prefix: `pod/<name>/<container>` in a cluster, `identity` or `tiny/hello/tulle-proxy` locally
    lines: Callable[[], Iterator[str]]  # each line without its newline; blocks while following
    close: Callable[[], None] = lambda: None  # ends a following iterator from another thread
