"""What `tulle logs` was asked for, in either mode: a control-plane component, the proxies,
or a pod / workload by name; narrowed by namespace and container."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Selection:
    component: Optional[str] = None  # destination, identity, policy, injector, nats, proxy
    name: Optional[str] = None  # a pod (cluster), a workload (local mode), or a workload's pods by prefix
    namespace: Optional[str] = None  # None: the default of the mode
    container: Optional[str] = None


@dataclass(frozen=True)
class Window:
    """Which lines: the last `tail` (None: all), written `since` ago or later (None: all),
    then new ones while `follow`."""

    tail: Optional[int] = None
    since: Optional[dt.timedelta] = None
    follow: bool = False

    def cutoff(self, now: Optional[dt.datetime] = None) -> Optional[dt.datetime]:
        if self.since is None:
            return None
        return (now or dt.datetime.now(dt.timezone.utc)) - self.since


def name_matches(pod: str, name: str) -> bool:
    """A pod by its name, or the pods of a workload: `web` matches `web-7d9f8-x2x9k`, `web-0`."""
    return pod == name or pod.startswith(name + "-")
