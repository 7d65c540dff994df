"""The destination's pure core: resources in, KV values out. No I/O.

`DestinationState` keeps the objects the source delivered, with the indexes needed to
know which services a change touches, and compiles only those: a pod that becomes
ready in a namespace of 10,000 services recompiles the one or two services that select
it, not all of them. `compile_snapshot` is the same thing for a whole set of objects at
once (what a full resync publishes); the incremental path must always agree with it.

What is published (DESIGN.md, "The bus"):
- `tulle-endpoints` `<ns>.<svc>.<port>`: the ready endpoints of one service port, and the
  same set under `_ip.<cluster-ip>.<port>` for proxies that only see an address;
- `tulle-profiles` `<ns>.<svc>`: the compiled ServiceProfile, only where one exists.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional, Union

from tulle import schemas
from tulle.resources import model as m
from tulle.sources.base import ResourceEvent

Key = tuple[str, str]  # (bucket, key)
Message = Union[schemas.EndpointSet, schemas.Profile]
ServiceRef = tuple[str, str]  # (namespace, name)

DEFAULT_WEIGHT = 10000
ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True, slots=True)
class Settings:
    cluster_domain: str = "cluster.local"
    trust_domain: str = "cluster.local"
    # Tell clients a meshed endpoint takes HTTP/2 between proxies. Off until the proxies
    # can do it: a hint a proxy cannot honour is worse than none.
    h2_upgrade: bool = False
    # Kubernetes: endpoints come from EndpointSlices (the endpoints controller's view).
    # Local mode has no such controller: endpoints are the ready pods the selector picks.
    endpoints_from: Literal["slices", "selector"] = "selector"


# --- small pure rules -----------------------------------------------------------------------


def classify_app_protocol(app_protocol: str) -> str:
    """A Service port's appProtocol as the proxy reads it (Linkerd 2.18 rules, Tulle names).

    "" (unset): detect; `http`: HTTP/1; `kubernetes.io/h2c`: HTTP/2 cleartext;
    `tulle.dev/opaque`, `tulle.dev/tcp` and any other value: opaque (no detection).
    """
    if not app_protocol:
        return ""
    if app_protocol == "http":
        return "http"
    if app_protocol == "kubernetes.io/h2c":
        return "h2c"
    return "opaque"


def parse_port_list(value: str, pod: Optional[m.Pod] = None) -> frozenset[int]:
    """The ports in an opaque-ports annotation: `3306,5432`, ranges `8000-8010`, or
    container port names (resolved on `pod`). Entries that mean nothing are skipped:
    the injector and `tulle validate` report them; here they must not stop publishing."""
    ports: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if lo.isdigit() and (not sep or hi.isdigit()):
            a, b = int(lo), int(hi) if sep else int(lo)
            if 1 <= a <= b <= 65535 and b - a < 65535:
                ports.update(range(a, b + 1))
            continue
        if pod is not None:
            number = _container_port(pod, part)
            if number is not None:
                ports.add(number)
    return frozenset(ports)


def _container_port(pod: m.Pod, name: str) -> Optional[int]:
    """A named port of the app's containers (the proxy's own ports are not the app's)."""
    for p in pod.ports:
        if p.name == name:
            return p.container_port
    return None


def target_port_of(service_port: m.ServicePort, pod: m.Pod) -> Optional[int]:
    """The pod port a service port sends to; None when a named target port is not declared."""
    if isinstance(service_port.target_port, int):
        return service_port.target_port
    return _container_port(pod, service_port.target_port)


_HASH_SUFFIX = re.compile(r"^(?P<owner>.+)-[a-z0-9]{5}$")


def workload_of(pod: m.Pod) -> str:
    """The pod's owning workload when its labels tell it, else the pod's own name.

    Deployment pods are `<deployment>-<pod-template-hash>-<5 chars>`; StatefulSet pods are
    `<statefulset>-<ordinal>`; Job pods carry `job-name`; DaemonSet pods are
    `<daemonset>-<5 chars>` with `pod-template-generation`. Local-mode pods are the workload.
    """
    name, labels = pod.meta.name, pod.meta.labels
    template_hash = labels.get("pod-template-hash")
    if template_hash and f"-{template_hash}-" in name:
        return name.rsplit(f"-{template_hash}-", 1)[0]
    if "statefulset.kubernetes.io/pod-name" in labels and "-" in name:
        return name.rsplit("-", 1)[0]
    if labels.get("job-name"):
        return labels["job-name"]
    if "pod-template-generation" in labels:
        match = _HASH_SUFFIX.match(name)
        if match:
            return match.group("owner")
    return name


def is_meshed(pod: m.Pod) -> bool:
    """Runs a Tulle proxy that terminates mTLS: has the proxy container and was not opted out."""
    return pod.meshed and not pod.host_network and pod.meta.annotations.get(m.INJECT_ANNOTATION) != "disabled"


def pod_identity(pod: m.Pod, settings: Settings) -> str:
    if not is_meshed(pod):
        return ""
    return schemas.identity_name(pod.service_account, pod.meta.namespace, settings.trust_domain)


def _proxy_port(pod: m.Pod) -> int:
    raw = pod.meta.annotations.get(m.PROXY_INBOUND_PORT_ANNOTATION, "")
    if raw.isdigit() and 1 <= int(raw) <= 65535:
        return int(raw)
    return 0


def pod_is_ready(pod: m.Pod) -> bool:
    return pod.ready and bool(pod.ip) and pod.phase not in ("Succeeded", "Failed")


def service_port_opaque(service: m.Service, port: m.ServicePort, profile: Optional[m.ServiceProfile]) -> bool:
    """Opaque for every client: by appProtocol, the Service's annotation, or the profile."""
    if classify_app_protocol(port.app_protocol) == "opaque":
        return True
    annotation = service.meta.annotations.get(m.OPAQUE_PORTS_ANNOTATION)
    if annotation and port.port in parse_port_list(annotation):
        return True
    return profile is not None and port.port in profile.opaque_ports


def make_endpoint(address: str, port: int, pod: Optional[m.Pod], *, zone: str, opaque: bool,
                  settings: Settings) -> schemas.Endpoint:
    """One endpoint. An endpoint whose pod is unknown (no targetRef, or the pod not seen
    yet) gets no identity: callers then speak plain TCP rather than expect a proxy."""
    identity, hint, proxy_port = "", "", 0
    labels: dict[str, str] = {}
    if pod is not None:
        identity = pod_identity(pod, settings)
        annotation = pod.meta.annotations.get(m.OPAQUE_PORTS_ANNOTATION)
        if annotation and port in parse_port_list(annotation, pod):
            opaque = True
        if identity:
            proxy_port = _proxy_port(pod)
            if settings.h2_upgrade:
                hint = "h2"
        zone = zone or pod.meta.labels.get(ZONE_LABEL, "")
        labels = {"namespace": pod.meta.namespace, "pod": pod.meta.name,
                  "serviceaccount": pod.service_account, "workload": workload_of(pod)}
    if opaque:
        hint = "opaque"
    if zone:
        labels["zone"] = zone
    return schemas.Endpoint(address=address, port=port, identity=identity, protocol_hint=hint,
                            weight=DEFAULT_WEIGHT, labels=labels, proxy_port=proxy_port)


def _sorted_unique(endpoints: Iterable[schemas.Endpoint]) -> list[schemas.Endpoint]:
    # The same address can appear in two slices while the controller moves it; the first wins.
    seen: dict[tuple[str, int], schemas.Endpoint] = {}
    for ep in endpoints:
        seen.setdefault((ep.address, ep.port), ep)
    return [seen[k] for k in sorted(seen)]


def endpoints_from_pods(service: m.Service, port: m.ServicePort, pods: Iterable[m.Pod], *, opaque: bool,
                        settings: Settings) -> list[schemas.Endpoint]:
    """Local mode: what the endpoints controller would publish for a selector."""
    out = []
    for pod in pods:
        if not pod_is_ready(pod):
            continue
        target = target_port_of(port, pod)
        if target is None:
            continue
        out.append(make_endpoint(pod.ip, target, pod, zone="", opaque=opaque, settings=settings))
    return _sorted_unique(out)


def endpoints_from_slices(port: m.ServicePort, slices: Iterable[m.EndpointSlice], pods: dict[ServiceRef, m.Pod], *,
                          opaque: bool, settings: Settings) -> list[schemas.Endpoint]:
    """Kubernetes: the slices' ready endpoints for one service port (slice ports are
    matched by name; their numbers are the resolved target ports).

    An endpoint whose pod is known and not Ready is left out even before the slice says
    so: the pod's own condition is the first to change.
    """
    out = []
    for s in slices:
        if s.address_type == "FQDN":
            continue
        slice_port = next((p for p in s.ports if p.name == port.name), None)
        if slice_port is None:
            continue
        for e in s.endpoints:
            if not e.ready:
                continue
            pod = pods.get((s.meta.namespace, e.target_pod)) if e.target_pod else None
            if pod is not None and not pod.ready:
                continue
            for address in e.addresses:
                out.append(make_endpoint(address, slice_port.port, pod, zone=e.zone, opaque=opaque, settings=settings))
    return _sorted_unique(out)


def cluster_ips(service: m.Service) -> list[str]:
    return [service.cluster_ip] if service.cluster_ip and service.cluster_ip != "None" else []


def service_endpoint_sets(service: m.Service, per_port: dict[int, list[schemas.Endpoint]],
                          profile: Optional[m.ServiceProfile]) -> tuple[dict[str, schemas.EndpointSet],
                                                                        dict[str, schemas.EndpointSet]]:
    """(sets by name key, sets by cluster-IP key) for one service. A port without ready
    endpoints is published empty (exists=True): clients then fail fast, not fall back."""
    by_name: dict[str, schemas.EndpointSet] = {}
    by_ip: dict[str, schemas.EndpointSet] = {}
    ns, name = service.meta.namespace, service.meta.name
    ips = cluster_ips(service)
    for port in service.ports:
        if port.protocol != "TCP":
            continue  # the mesh carries TCP only
        app_protocol = "opaque" if service_port_opaque(service, port, profile) else classify_app_protocol(port.app_protocol)
        es = schemas.EndpointSet(namespace=ns, service=name, port=port.port, endpoints=per_port.get(port.port, []),
                                 exists=True, cluster_ips=list(ips), app_protocol=app_protocol)
        by_name[schemas.endpoints_key(ns, name, port.port)] = es
        for ip in ips:
            by_ip[schemas.ip_endpoints_key(ip, port.port)] = es
    return by_name, by_ip


# --- profiles -----------------------------------------------------------------------------


def profile_applies(sp: m.ServiceProfile, settings: Settings) -> bool:
    """A profile is looked up by the service's FQDN in this cluster's domain."""
    return sp.meta.name == f"{sp.service}.{sp.meta.namespace}.svc.{settings.cluster_domain}"


def _request_match(rm: m.RequestMatch) -> schemas.RequestMatch:
    return schemas.RequestMatch(
        method=rm.method, path_regex=rm.path_regex,
        all_=[_request_match(x) for x in rm.all] if rm.all is not None else None,
        any_=[_request_match(x) for x in rm.any] if rm.any is not None else None,
        not_=_request_match(rm.not_) if rm.not_ is not None else None)


def _response_match(rm: m.ResponseMatch) -> schemas.ResponseMatch:
    return schemas.ResponseMatch(
        status=schemas.StatusRange(rm.status.min, rm.status.max) if rm.status is not None else None,
        all_=[_response_match(x) for x in rm.all] if rm.all is not None else None,
        any_=[_response_match(x) for x in rm.any] if rm.any is not None else None,
        not_=_response_match(rm.not_) if rm.not_ is not None else None)


def compile_profile(sp: m.ServiceProfile, settings: Settings) -> schemas.Profile:
    """A ServiceProfile as proxies read it; Linkerd's retry budget (0.2, 10/s, 10 s) when unset."""
    budget = sp.retry_budget or m.RetryBudgetSpec()
    routes = [schemas.Route(name=r.name, condition=_request_match(r.condition),
                            response_classes=[schemas.ResponseClass(_response_match(c.condition), c.is_failure)
                                              for c in r.response_classes],
                            is_retryable=r.is_retryable, timeout_ms=r.timeout_ms)
              for r in sp.routes]
    return schemas.Profile(namespace=sp.meta.namespace, service=sp.service, fqdn=sp.meta.name, routes=routes,
                           retry_budget=schemas.RetryBudget(budget.retry_ratio, budget.min_retries_per_second,
                                                            budget.ttl_ms),
                           opaque_ports=sorted(set(sp.opaque_ports)))


# --- the incremental state --------------------------------------------------------------------


@dataclass(slots=True)
class _ServiceOutput:
    by_name: dict[str, schemas.EndpointSet] = field(default_factory=dict)
    by_ip: dict[str, schemas.EndpointSet] = field(default_factory=dict)


class DestinationState:
    """Objects by kind with the indexes that map a change to the services it touches.

    `apply(event)` records an event and marks what it affects; `take_changes()` compiles
    what was marked and returns {(bucket, key): message or None (deleted)} for values that
    differ from before. `desired` is always the complete state to publish.
    """

    def __init__(self, settings: Settings = Settings()):
        self.settings = settings
        self.synced = False
        self.services: dict[ServiceRef, m.Service] = {}
        self.pods: dict[ServiceRef, m.Pod] = {}
        self.slices: dict[ServiceRef, m.EndpointSlice] = {}
        self.profiles: dict[ServiceRef, m.ServiceProfile] = {}  # by (ns, service); only those that apply
        self._profile_objects: dict[ServiceRef, m.ServiceProfile] = {}  # by (ns, object name)
        # Selector matching without scanning every service: (ns, label, value) -> services
        # whose selector requires it; services whose selector is {} select every pod.
        self._selector_index: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self._select_all: dict[str, set[str]] = defaultdict(set)
        self._pods_by_label: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self._pods_by_ns: dict[str, set[str]] = defaultdict(set)
        self._slices_by_service: dict[ServiceRef, set[str]] = defaultdict(set)
        self._services_by_slice_pod: dict[ServiceRef, dict[str, int]] = defaultdict(dict)  # (ns, pod) -> svc -> refs
        self._dirty_services: set[ServiceRef] = set()
        self._dirty_profiles: set[ServiceRef] = set()
        self._outputs: dict[ServiceRef, _ServiceOutput] = {}
        self._ip_claims: dict[str, set[ServiceRef]] = defaultdict(set)
        self._ip_conflicts: set[str] = set()  # cluster-IP keys claimed by several services
        self.desired: dict[Key, Message] = {}

    # --- events ---------------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._dirty_services or self._dirty_profiles)

    def apply(self, ev: ResourceEvent) -> bool:
        """Record one event; True when something may need publishing."""
        if ev.type == "synced":
            first = not self.synced
            self.synced = True
            return first or self.dirty
        if ev.type == "error" or ev.obj is None:
            return False
        obj = ev.obj
        ref = (obj.meta.namespace, obj.meta.name)
        deleted = ev.type == "deleted"
        if isinstance(obj, m.Service):
            self._set_service(ref, None if deleted else obj)
        elif isinstance(obj, m.Pod):
            self._set_pod(ref, None if deleted else obj)
        elif isinstance(obj, m.EndpointSlice):
            self._set_slice(ref, None if deleted else obj)
        elif isinstance(obj, m.ServiceProfile):
            self._set_profile(ref, None if deleted else obj)
        else:
            return False
        return self.dirty

    def _set_service(self, ref: ServiceRef, new: Optional[m.Service]) -> None:
        old = self.services.get(ref)
        if old == new:
            return
        ns, name = ref
        if old is not None and old.selector is not None:
            self._index_selector(ns, name, old.selector, add=False)
        if new is None:
            self.services.pop(ref, None)
        else:
            self.services[ref] = new
            if new.selector is not None:
                self._index_selector(ns, name, new.selector, add=True)
        self._dirty_services.add(ref)

    def _index_selector(self, ns: str, name: str, selector: dict[str, str], *, add: bool) -> None:
        buckets = [self._selector_index[(ns, k, v)] for k, v in selector.items()] or [self._select_all[ns]]
        for b in buckets:
            b.add(name) if add else b.discard(name)

    def _set_pod(self, ref: ServiceRef, new: Optional[m.Pod]) -> None:
        old = self.pods.get(ref)
        if old == new:
            return
        ns, name = ref
        if old is not None:
            for k, v in old.meta.labels.items():
                self._pods_by_label[(ns, k, v)].discard(name)
            self._pods_by_ns[ns].discard(name)
        if new is None:
            self.pods.pop(ref, None)
        else:
            self.pods[ref] = new
            for k, v in new.meta.labels.items():
                self._pods_by_label[(ns, k, v)].add(name)
            self._pods_by_ns[ns].add(name)
        if self.settings.endpoints_from == "selector":
            for pod in (old, new):
                if pod is not None:
                    self._dirty_services.update((ns, s) for s in self._services_selecting(pod))
        else:
            self._dirty_services.update((ns, s) for s in self._services_by_slice_pod.get(ref, {}))

    def _services_selecting(self, pod: m.Pod) -> set[str]:
        ns, labels = pod.meta.namespace, pod.meta.labels
        candidates = set(self._select_all.get(ns, ()))
        for k, v in labels.items():
            candidates.update(self._selector_index.get((ns, k, v), ()))
        out = set()
        for name in candidates:
            selector = self.services[(ns, name)].selector or {}
            if all(labels.get(k) == v for k, v in selector.items()):
                out.add(name)
        return out

    def _set_slice(self, ref: ServiceRef, new: Optional[m.EndpointSlice]) -> None:
        old = self.slices.get(ref)
        if old == new:
            return
        ns, name = ref
        for s, add in ((old, False), (new, True)):
            if s is None:
                continue
            self._slices_by_service[(ns, s.service)].add(name) if add else self._slices_by_service[(ns, s.service)].discard(name)
            for e in s.endpoints:
                if not e.target_pod:
                    continue
                refs = self._services_by_slice_pod[(ns, e.target_pod)]
                refs[s.service] = refs.get(s.service, 0) + (1 if add else -1)
                if refs[s.service] <= 0:
                    del refs[s.service]
            if s.service:
                self._dirty_services.add((ns, s.service))
        if new is None:
            self.slices.pop(ref, None)
        else:
            self.slices[ref] = new

    def _set_profile(self, ref: ServiceRef, new: Optional[m.ServiceProfile]) -> None:
        old = self._profile_objects.get(ref)
        if old == new:
            return
        for sp in (old, new):
            if sp is not None:
                target = (sp.meta.namespace, sp.service)
                self._dirty_profiles.add(target)
                self._dirty_services.add(target)  # opaque ports feed the endpoint hints
        if old is not None and profile_applies(old, self.settings):
            self.profiles.pop((old.meta.namespace, old.service), None)
        if new is None:
            self._profile_objects.pop(ref, None)
        else:
            self._profile_objects[ref] = new
            if profile_applies(new, self.settings):
                self.profiles[(new.meta.namespace, new.service)] = new

    # --- compiling ----------------------------------------------------------------------------

    def selected_pods(self, service: m.Service) -> list[m.Pod]:
        ns, selector = service.meta.namespace, service.selector
        if selector is None:
            return []
        if not selector:
            names = self._pods_by_ns.get(ns, set())
        else:
            # Start from the rarest required label, then check the rest.
            sets = [self._pods_by_label.get((ns, k, v), set()) for k, v in selector.items()]
            names = min(sets, key=len)
        out = []
        for name in names:
            pod = self.pods[(ns, name)]
            if all(pod.meta.labels.get(k) == v for k, v in selector.items()):
                out.append(pod)
        return out

    def compile_service(self, ref: ServiceRef) -> _ServiceOutput:
        service = self.services.get(ref)
        if service is None or service.type == "ExternalName":
            return _ServiceOutput()  # ExternalName: not ours to resolve, clients use DNS
        profile = self.profiles.get(ref)
        per_port: dict[int, list[schemas.Endpoint]] = {}
        pods = self.selected_pods(service) if self.settings.endpoints_from == "selector" else None
        slices = None
        if pods is None:
            slices = [self.slices[(ref[0], n)] for n in sorted(self._slices_by_service.get(ref, ()))]
        for port in service.ports:
            opaque = service_port_opaque(service, port, profile)
            if pods is not None:
                per_port[port.port] = endpoints_from_pods(service, port, pods, opaque=opaque, settings=self.settings)
            else:
                per_port[port.port] = endpoints_from_slices(port, slices, self.pods, opaque=opaque,
                                                            settings=self.settings)
        by_name, by_ip = service_endpoint_sets(service, per_port, profile)
        return _ServiceOutput(by_name, by_ip)

    def take_changes(self) -> dict[Key, Optional[Message]]:
        """Compile what changed since the last call; the values that differ now."""
        changes: dict[Key, Optional[Message]] = {}

        def put(key: Key, value: Optional[Message]) -> None:
            if self.desired.get(key) == value:
                return
            if value is None:
                self.desired.pop(key, None)
            else:
                self.desired[key] = value
            changes[key] = value

        for ref in self._dirty_profiles:
            sp = self.profiles.get(ref)
            put((schemas.PROFILES_BUCKET, schemas.profile_key(*ref)),
                compile_profile(sp, self.settings) if sp is not None else None)
        self._dirty_profiles.clear()

        touched_ips: set[str] = set()
        for ref in self._dirty_services:
            new = self.compile_service(ref)
            old = self._outputs.pop(ref, None) or _ServiceOutput()
            if new.by_name or new.by_ip:
                self._outputs[ref] = new
            for key in old.by_name.keys() - new.by_name.keys():
                put((schemas.ENDPOINTS_BUCKET, key), None)
            for key, es in new.by_name.items():
                put((schemas.ENDPOINTS_BUCKET, key), es)
            for key in old.by_ip.keys() - new.by_ip.keys():
                self._ip_claims[key].discard(ref)
            for key in new.by_ip.keys():
                self._ip_claims[key].add(ref)
            touched_ips.update(old.by_ip.keys() | new.by_ip.keys())
        self._dirty_services.clear()

        for key in touched_ips:
            owners = self._ip_claims.get(key)
            if owners and len(owners) > 1:
                self._ip_conflicts.add(key)
            else:
                self._ip_conflicts.discard(key)
            if not owners:
                self._ip_claims.pop(key, None)
                put((schemas.ENDPOINTS_BUCKET, key), None)
                continue
            # Two services claiming one cluster IP is a misconfiguration; the first by
            # name keeps it, so the result never depends on the order of events.
            put((schemas.ENDPOINTS_BUCKET, key), self._outputs[min(owners)].by_ip[key])
        return changes

    def ip_conflicts(self) -> dict[str, list[ServiceRef]]:
        """Cluster-IP keys claimed by more than one service (for a warning)."""
        return {k: sorted(self._ip_claims[k]) for k in self._ip_conflicts}


def compile_snapshot(objects: Iterable[m.Resource], settings: Settings = Settings()) -> dict[Key, Message]:
    """Everything to publish for a set of objects: {(bucket, key): message}."""
    state = DestinationState(settings)
    for obj in objects:
        state.apply(ResourceEvent("added", obj))
    state.apply(ResourceEvent("synced"))
    state.take_changes()
    return dict(state.desired)
