"""The proxy's watch of its own inbound policy: `tulle-policy` `<namespace>.<workload>`.

Every value that arrives is swapped into the shared `InboundPolicy` at once, so it applies
to the next connection and the next request on connections already open. `first` is set
when the first policy has arrived: the proxy is not ready before (until then it applies
the configured default policy). A deleted key (the pod is going away) or a lost bus
leaves the last policy in force — a proxy keeps serving with the last state it had.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Optional

from tulle.policy import InboundPolicy
from tulle.bus import Bus, Snapshot
from tulle.log import get_logger
from tulle.schemas import POLICY_BUCKET, WorkloadPolicy, policy_key


class PolicyWatcher:
    def __init__(self, bus: Bus, namespace: str, workload: str, policy: InboundPolicy,
                 on_update: Optional[Callable[[WorkloadPolicy], None]] = None):
        self.bus, self.policy, self.on_update = bus, policy, on_update
        self.key = policy_key(namespace, workload)
        self.first = asyncio.Event()
        self.seen = 0  # values and deletions received (for diagnostics and tests)
        self.log = get_logger(policy_key=self.key)

    async def run(self) -> None:
        """Runs until cancelled."""
        async for item in self.bus.watch(POLICY_BUCKET, self.key, WorkloadPolicy):
            value = item.values.get(self.key) if isinstance(item, Snapshot) else item.value
            self.seen += 1
            if value is None:
                if self.policy.has_policy:
                    self.log.info("policy key absent; keeping the last policy")
                continue
            self.apply(value)

    def apply(self, value: WorkloadPolicy) -> None:
        if self.policy.has_policy and value == self.policy.policy:
            return  # a resync after a reconnect: nothing new
        self.policy.update(value)
        self.log.info("inbound policy updated", default_policy=value.default_policy,
                      servers={str(p.port): p.server for p in value.ports})
        self.first.set()
        if self.on_update is not None:
            self.on_update(value)
