"""The policy service's adapters: source events in, `tulle-policy` KV values out.

    source (folder or Kubernetes) -> PolicyState (Store + compile, pure) -> KVWriter -> NATS KV

Source events only wake the writer; the writer asks `PolicyState.take_changes` for what
changed, which compiles once for however many events arrived meanwhile. The writer
(shared with the destination service) writes a key only when its bytes differ from
what KV holds, reads KV back on takeover or reconnect, and writes only while this
replica holds the `policy` lease; standbys keep compiling, ready to take over.

Anything invalid — a manifest that does not parse, an object the compiler rejects — is
logged and published as a `policy.invalid-resource` CloudEvent once (again only if it
goes away and comes back); the service carries on with everything else. A standby that
knows another replica writes leaves the events to it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import time
from typing import Optional

from services.policy.compile import DEFAULT_PROBE_NETWORKS, Rejection, Settings, compile_policies
from tulle.codec import encode
from tulle.kvwriter import ElectedPublisher
from tulle.metrics import REGISTRY
from tulle.schemas import DEFAULT_CLUSTER_NETWORKS, DEFAULT_POLICIES, POLICY_BUCKET, WorkloadPolicy
from tulle.service import Service
from tulle.sources.base import ResourceEvent, Store
from tulle.sources.options import add_source_arguments, check_source_arguments
from tulle.sources.options import make_source as make_source_from

KINDS = ("Namespace", "Pod", "Server", "ServerAuthorization")
LEASE = "policy"


# --- flags -----------------------------------------------------------------------------------


def cidr_list(text: str) -> tuple[str, ...]:
    """A comma-separated CIDR list flag, normalised; argparse turns the error into one line."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a CIDR such as 10.0.0.0/8") from None
    return tuple(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--default-policy", choices=DEFAULT_POLICIES,
                   default=os.environ.get("TULLE_DEFAULT_INBOUND_POLICY", "all-unauthenticated"),
                   help="the mesh's default inbound policy; a namespace or pod annotation "
                        "config.tulle.dev/default-inbound-policy overrides it")
    p.add_argument("--cluster-networks", type=cidr_list, default=DEFAULT_CLUSTER_NETWORKS,
                   help="comma-separated CIDRs the cluster-* default policies admit")
    p.add_argument("--probe-networks", type=cidr_list, default=DEFAULT_PROBE_NETWORKS,
                   help="comma-separated CIDRs from which the workloads' probe paths are always admitted")
    p.add_argument("--trust-domain", default="cluster.local", help="the mesh's trust domain")


def check_arguments(args: argparse.Namespace) -> None:
    check_source_arguments(args)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(args.default_policy, tuple(args.cluster_networks), tuple(args.probe_networks), args.trust_domain)


def make_source(args: argparse.Namespace):
    return make_source_from(args, KINDS, KINDS)


# --- the state (pure) --------------------------------------------------------------------------


class PolicyState:
    """The objects seen so far, and the compiled policies that changed since last asked.

    Everything that decides a workload's policy lives in its own namespace (its Pod, the
    Namespace's annotation, the Servers and ServerAuthorizations beside it), so an event
    recompiles only its namespace; the result is the same as compiling everything
    (`compile_policies` over the whole store), which the tests check.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = Store()
        self.rejected: list[Rejection] = []
        self.policies: dict[str, WorkloadPolicy] = {}
        self.compile_seconds = 0.0
        self._by_ns: dict[str, dict[tuple[str, str, str], object]] = {}
        self._dirty: set[str] = set()
        self._ns_keys: dict[str, set[str]] = {}  # namespace -> its policy keys
        self._ns_rejected: dict[str, list[Rejection]] = {}
        self._encoded: dict[str, bytes] = {}

    @property
    def synced(self) -> bool:
        return self.store.synced

    @staticmethod
    def _namespace_of(obj) -> str:
        return obj.meta.name if obj.kind == "Namespace" else obj.meta.namespace

    def apply(self, ev: ResourceEvent) -> bool:
        """True when the event may change a policy."""
        if not self.store.apply(ev):
            return False
        if ev.obj is not None:
            ns = self._namespace_of(ev.obj)
            objects = self._by_ns.setdefault(ns, {})
            key = (ev.obj.kind, ev.obj.meta.namespace, ev.obj.meta.name)
            if ev.type == "deleted":
                objects.pop(key, None)
            else:
                objects[key] = ev.obj
            self._dirty.add(ns)
        return True

    def take_changes(self) -> dict[tuple[str, str], Optional[WorkloadPolicy]]:
        """Recompile the namespaces touched since the last call; return
        {(bucket, key): new value, or None if gone} for what changed."""
        started = time.perf_counter()
        changes: dict[tuple[str, str], Optional[WorkloadPolicy]] = {}
        for ns in sorted(self._dirty):
            compiled = compile_policies(self._by_ns.get(ns, {}).values(), self.settings)
            self._ns_rejected[ns] = compiled.rejected
            for key in self._ns_keys.get(ns, set()) - set(compiled.policies):
                self.policies.pop(key, None)
                self._encoded.pop(key, None)
                changes[(POLICY_BUCKET, key)] = None
            for key, wp in compiled.policies.items():
                encoded = encode(wp)
                if self._encoded.get(key) != encoded:
                    self._encoded[key] = encoded
                    changes[(POLICY_BUCKET, key)] = wp
                self.policies[key] = wp
            self._ns_keys[ns] = set(compiled.policies)
            if not self._by_ns.get(ns):
                self._by_ns.pop(ns, None)
                self._ns_keys.pop(ns, None)
                self._ns_rejected.pop(ns, None)
        self._dirty.clear()
        self.rejected = [r for ns in sorted(self._ns_rejected) for r in self._ns_rejected[ns]]
        self.compile_seconds = time.perf_counter() - started
        return changes


# --- the process -------------------------------------------------------------------------------


class InvalidResourceReporter:
    """A log line and a `policy.invalid-resource` CloudEvent for each new problem."""

    def __init__(self, svc: Service, quiet=lambda: False):
        self.svc, self.quiet = svc, quiet
        self._current: set[str] = set()  # rejections now in force (each reported once)
        self._tasks: set[asyncio.Task] = set()
        self.m_invalid = REGISTRY.counter("tulle_policy_invalid_resources_total",
                                          "Invalid resources reported: manifests that do not parse (parse), "
                                          "objects the policy compiler refuses (rejected)", ("reason",))
        self.m_rejected = REGISTRY.gauge("tulle_policy_rejected_objects",
                                         "Objects the policy compiler currently refuses")

    def rejections(self, rejected: list[Rejection]) -> None:
        lines = {r.line(): r for r in rejected}
        for line, r in sorted(lines.items()):
            if line not in self._current:
                self.report(line, {"kind": r.kind, "namespace": r.namespace, "name": r.name}, reason="rejected")
        gone = self._current - set(lines)
        if gone:
            self.svc.log.info("rejection resolved", errors=sorted(gone))
        self._current = set(lines)
        self.m_rejected.set(len(lines))

    def report(self, line: str, data: dict, *, reason: str) -> None:
        self.svc.log.warning("invalid resource", error=line, **data)
        self.m_invalid.labels(reason).inc()
        if self.quiet():
            return
        task = asyncio.ensure_future(self._publish({"error": line, "reason": reason, **data}))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, data: dict) -> None:
        await self.svc.bus.wait_connected()  # problems found at start-up, before NATS answered
        await self.svc.bus.publish_event("invalid-resource", data, kind="policy")


async def main(svc: Service, source: Optional[object] = None) -> None:
    args = svc.args
    log = svc.log
    state = PolicyState(settings_from(args))
    source = source or getattr(svc, "policy_source", None) or make_source(args)
    publisher: Optional[ElectedPublisher] = None
    reporter = InvalidResourceReporter(svc, quiet=lambda: publisher is not None and publisher.is_standby())
    m_workloads = REGISTRY.gauge("tulle_policy_workloads", "Workloads with a compiled policy")
    m_workloads.set_function(lambda: len(state.policies))
    REGISTRY.gauge("tulle_policy_last_compile_seconds", "Duration of the last compile").set_function(
        lambda: state.compile_seconds)
    m_events = REGISTRY.counter("tulle_policy_source_events_total", "Resource events received", ("type",))

    def take_changes():
        changes = state.take_changes()
        if state.synced:  # a partial view may reject what the whole one accepts
            reporter.rejections(state.rejected)
        if changes:
            log.info("policies changed", workloads=sorted(k for _, k in changes))
        return changes

    publisher = ElectedPublisher(svc.bus, lease=LEASE, buckets=(POLICY_BUCKET,), take_changes=take_changes,
                                 can_write=lambda: state.synced, metric_prefix="tulle_policy")
    # The writer is ready once KV holds every policy: a proxy waits for its key before it is ready.
    svc.add_ready_check("policies published", publisher.ready)

    def apply(ev) -> bool:
        m_events.labels(ev.type).inc()
        if ev.type == "error":
            reporter.report(ev.error, {}, reason="parse")
            return False
        return state.apply(ev) or ev.type == "synced"

    await publisher.run(source, apply, lambda: log.info("source synced", objects=len(state.store.objects)))
