"""python -m services.destination: sources -> compile (pure) -> KV writer.

    python -m services.destination --nats URL --manifests DIR [--manifests DIR ...]
    python -m services.destination --nats URL --kubernetes

Reads Services, Pods, EndpointSlices (Kubernetes only) and ServiceProfiles; publishes
each service port's ready endpoints to `tulle-endpoints` and compiled profiles to
`tulle-profiles`. Several replicas may run: one writes (lease `destination` in
`tulle-leases`), the others keep the same state compiled and take over within seconds.
Ready once the source has synced and, on the writer, the result is in KV.
"""

from __future__ import annotations

import argparse
import asyncio

from services.destination.compile import DestinationState, Settings
from services.destination.events import endpoints_changed_event
from tulle import schemas
from tulle.errors import UserError
from tulle.kvwriter import ElectedPublisher
from tulle.metrics import REGISTRY
from tulle.service import Service, run_service
from tulle.sources.options import add_source_arguments, check_source_arguments
from tulle.sources.options import make_source as make_source_from

LEASE = "destination"
FOLDER_KINDS = ("Service", "Pod", "ServiceProfile")  # Workloads are the runner's business
KUBE_KINDS = ("Service", "Pod", "EndpointSlice", "ServiceProfile")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--cluster-domain", default="cluster.local")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--h2-upgrade", action="store_true",
                   help="hint h2 for meshed endpoints (only once proxies speak HTTP/2 between themselves)")
    p.add_argument("--batch-interval-ms", type=float, default=25.0,
                   help="during a burst of changes, at most one KV write batch per this interval")


def check_arguments(args: argparse.Namespace) -> None:
    check_source_arguments(args)
    if not 0 <= args.batch_interval_ms <= 10_000:
        raise UserError(f"--batch-interval-ms {args.batch_interval_ms}: expected 0 to 10000")


def make_source(args: argparse.Namespace):
    return make_source_from(args, FOLDER_KINDS, KUBE_KINDS)


async def main(svc: Service) -> None:
    args = svc.args
    log = svc.log
    settings = Settings(cluster_domain=args.cluster_domain, trust_domain=args.trust_domain,
                        h2_upgrade=args.h2_upgrade, endpoints_from="slices" if args.kubernetes else "selector")
    state = DestinationState(settings)
    source = make_source(args)
    m_source_errors = REGISTRY.counter("tulle_destination_source_errors_total",
                                       "Objects or files the source could not read (kept at their last good version)")
    m_events = REGISTRY.counter("tulle_destination_source_events_total", "Resource events received", ("type",))

    def on_written(key, old, new) -> None:
        data = endpoints_changed_event(key, old, new)
        if data is not None:
            asyncio.ensure_future(svc.bus.publish_event("endpoints-changed", data, subject=data["key"]))

    warned_conflicts: set[str] = set()

    def take_changes():
        changes = state.take_changes()
        conflicts = state.ip_conflicts()
        for key in conflicts.keys() - warned_conflicts:
            log.warning("two services claim one cluster IP; the first by name keeps the IP key",
                        key=key, services=[f"{ns}/{n}" for ns, n in conflicts[key]])
        warned_conflicts.intersection_update(conflicts)
        warned_conflicts.update(conflicts)
        return changes

    publisher = ElectedPublisher(svc.bus, lease=LEASE, buckets=(schemas.ENDPOINTS_BUCKET, schemas.PROFILES_BUCKET),
                                 take_changes=take_changes, can_write=lambda: state.synced, on_written=on_written,
                                 min_interval=args.batch_interval_ms / 1000)
    svc.add_ready_check("synced", publisher.ready)

    def apply(ev) -> bool:
        m_events.labels(ev.type).inc()
        if ev.type == "error":
            m_source_errors.inc()
            log.warning("skipping an object that cannot be read", error=ev.error)
            return False
        return state.apply(ev)

    def on_synced() -> None:
        log.info("source synced", services=len(state.services), pods=len(state.pods),
                 slices=len(state.slices), profiles=len(state.profiles))

    await publisher.run(source, apply, on_synced)


def run(argv: list[str] | None = None) -> None:
    def prepare(svc: Service) -> None:
        check_arguments(svc.args)

    run_service("destination", main, argv, add_arguments=add_arguments, prepare=prepare)


if __name__ == "__main__":
    run()
