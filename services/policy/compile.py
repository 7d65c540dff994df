"""The policy service's pure core: resources in, each workload's inbound policy out. No I/O.

For every meshed pod, `compile_policies` decides what governs each of its ports:

- a port selected by a `Server` allows only what that Server's `ServerAuthorization`s
  allow (Linkerd 2.11: once a Server selects a port, everything else is denied);
- any other port follows the default policy: the pod's
  `config.tulle.dev/default-inbound-policy` annotation, else its namespace's, else the
  service's `--default-policy`;
- the pod's own httpGet probe paths are always admitted (GET/HEAD, exact path, no
  identity needed) from the probe networks, Server or not, so the kubelet (or the
  local runner's health checker) can always see the app.

What it cannot accept is returned as `Rejection`s, with a reason, instead of raising:
two Servers selecting the same pod and port (the later one by name is rejected, as
Linkerd's validating webhook would refuse it), or an unknown default-policy value in an
annotation (the next level's default applies). A ServerAuthorization naming a Server
that does not exist is not an error — the Server may come later — but every workload
of that namespace carries a warning about it, which `tulle policy` shows.

Service accounts are resolved here into exact identities, so the proxy only ever
compares strings.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

from tulle.policy import default_authorizations
from tulle.resources import model as m
from tulle.schemas import (DEFAULT_CLUSTER_NETWORKS, DEFAULT_POLICIES, Authorization, Network, PortPolicy,
                           WorkloadPolicy, identity_name, policy_key)
from tulle.sources.base import Store

# Linkerd's default probe networks: the kubelet may come from anywhere.
DEFAULT_PROBE_NETWORKS: tuple[str, ...] = ("0.0.0.0/0", "::/0")
PROBE_AUTHORIZATION = "probe"


@dataclass(frozen=True, slots=True)
class Settings:
    default_policy: str = "all-unauthenticated"
    cluster_networks: tuple[str, ...] = DEFAULT_CLUSTER_NETWORKS
    probe_networks: tuple[str, ...] = DEFAULT_PROBE_NETWORKS
    trust_domain: str = "cluster.local"


@dataclass(frozen=True, slots=True)
class Rejection:
    """An object (or part of one) the policy service refuses, and why."""

    kind: str
    namespace: str
    name: str
    reason: str

    def line(self) -> str:
        return f"{self.kind} {self.namespace + '/' if self.namespace else ''}{self.name}: {self.reason}"


@dataclass(slots=True)
class Compiled:
    policies: dict[str, WorkloadPolicy] = field(default_factory=dict)  # policy_key -> value
    rejected: list[Rejection] = field(default_factory=list)


def compile_policies(objects: Union[Store, Iterable[m.Resource]], settings: Settings = Settings()) -> Compiled:
    """Every meshed pod's WorkloadPolicy, keyed `<namespace>.<pod>`; deterministic."""
    if isinstance(objects, Store):
        objects = objects.objects.values()
    namespaces: dict[str, m.Namespace] = {}
    pods: dict[str, list[m.Pod]] = defaultdict(list)
    servers: dict[str, list[m.Server]] = defaultdict(list)
    authorizations: dict[str, list[m.ServerAuthorization]] = defaultdict(list)
    for obj in objects:
        if isinstance(obj, m.Pod):
            if obj.meshed and obj.phase not in ("Succeeded", "Failed"):
                pods[obj.meta.namespace].append(obj)
        elif isinstance(obj, m.Server):
            servers[obj.meta.namespace].append(obj)
        elif isinstance(obj, m.ServerAuthorization):
            authorizations[obj.meta.namespace].append(obj)
        elif isinstance(obj, m.Namespace):
            namespaces[obj.meta.name] = obj

    out = Compiled()
    cluster_default = _valid_default(settings.default_policy)
    for ns in sorted(set(pods) | set(servers) | set(authorizations)):
        ns_pods = sorted(pods.get(ns, ()), key=lambda p: p.meta.name)
        claims, accepted, rejected = _claim_ports(ns_pods, sorted(servers.get(ns, ()), key=lambda s: s.meta.name))
        out.rejected.extend(rejected)
        by_server, warnings = _authorizations_by_server(ns, accepted, {r.name for r in rejected},
                                                        sorted(authorizations.get(ns, ()), key=lambda a: a.meta.name),
                                                        settings)
        if not ns_pods:
            continue
        ns_default, ns_source = cluster_default, "cluster default (--default-policy)"
        namespace = namespaces.get(ns)
        if namespace is not None:
            ns_default, ns_source = _annotated_default(namespace, ns_default, ns_source, out.rejected)
        for pod in ns_pods:
            policy, source = _annotated_default(pod, ns_default, ns_source, out.rejected)
            out.policies[policy_key(ns, pod.meta.name)] = _workload_policy(
                pod, policy, source, claims.get(pod.meta.name, {}), by_server, warnings, settings)
    return out


def _valid_default(policy: str) -> str:
    if policy not in DEFAULT_POLICIES:
        raise ValueError(f"default policy {policy!r} is not one of {', '.join(DEFAULT_POLICIES)}")
    return policy


def _annotated_default(obj: Union[m.Pod, m.Namespace], inherited: str, inherited_source: str,
                       rejected: list[Rejection]) -> tuple[str, str]:
    value = obj.meta.annotations.get(m.DEFAULT_POLICY_ANNOTATION)
    if value is None:
        return inherited, inherited_source
    where = f"{obj.kind} {obj.meta.namespace + '/' if obj.meta.namespace else ''}{obj.meta.name}"
    if value not in DEFAULT_POLICIES:
        rejected.append(Rejection(obj.kind, obj.meta.namespace, obj.meta.name,
                                  f"annotation {m.DEFAULT_POLICY_ANNOTATION}: {value!r} is not one of "
                                  f"{', '.join(DEFAULT_POLICIES)}; using {inherited} ({inherited_source})"))
        return inherited, inherited_source
    return value, f"{where} annotation {m.DEFAULT_POLICY_ANNOTATION}"


def server_ports(server: m.Server, pod: m.Pod) -> list[int]:
    """The pod ports a Server covers: its number, or every app port with its name."""
    if isinstance(server.port, int):
        return [server.port]
    return sorted({p.container_port for p in pod.ports if p.name == server.port})


def _claim_ports(pods: list[m.Pod], servers: list[m.Server]):
    """Which Server governs each (pod, port). Servers are taken in name order; one that
    selects a pod port an earlier Server already covers is rejected as a whole."""
    claims: dict[str, dict[int, m.Server]] = defaultdict(dict)
    accepted: list[m.Server] = []
    rejected: list[Rejection] = []
    for server in servers:
        wanted: list[tuple[str, int]] = []
        conflict: Optional[str] = None
        for pod in pods:
            if not server.pod_selector.matches(pod.meta.labels):
                continue
            for port in server_ports(server, pod):
                other = claims[pod.meta.name].get(port)
                if other is not None:
                    conflict = (f"selects port {port} of pod {pod.meta.name}, which Server {other.meta.name} "
                                f"already selects (two Servers must not select the same pod and port)")
                    break
                wanted.append((pod.meta.name, port))
            if conflict:
                break
        if conflict:
            rejected.append(Rejection("Server", server.meta.namespace, server.meta.name, conflict))
            continue
        accepted.append(server)
        for pod_name, port in wanted:
            claims[pod_name][port] = server
    return claims, accepted, rejected


def _authorizations_by_server(ns: str, servers: list[m.Server], rejected_names: set[str],
                              sazs: list[m.ServerAuthorization], settings: Settings):
    """Server name -> its compiled authorizations (sorted by name); and the namespace's warnings."""
    by_server: dict[str, list[Authorization]] = defaultdict(list)
    warnings: list[str] = []
    names = {s.meta.name: s for s in servers}
    for saz in sazs:
        if saz.server_name:
            targets = [names[saz.server_name]] if saz.server_name in names else []
            if not targets:
                why = "was rejected" if saz.server_name in rejected_names else "does not exist"
                warnings.append(f"ServerAuthorization {ns}/{saz.meta.name} names Server {saz.server_name}, "
                                f"which {why}: it authorizes nothing")
        else:
            targets = [s for s in servers if saz.server_selector.matches(s.meta.labels)]
            if not targets:
                warnings.append(f"ServerAuthorization {ns}/{saz.meta.name} selects no Server: it authorizes nothing")
        if targets:
            compiled = compile_server_authorization(saz, settings.trust_domain)
            for s in targets:
                by_server[s.meta.name].append(compiled)
    return by_server, warnings


def compile_server_authorization(saz: m.ServerAuthorization, trust_domain: str) -> Authorization:
    """One ServerAuthorization as the proxy matches it: service accounts become identities."""
    networks = [Network(n.cidr, list(n.except_)) for n in saz.networks]
    mesh = saz.mesh_tls
    if saz.unauthenticated or mesh is None:
        return Authorization(saz.meta.name, unauthenticated=True, networks=networks)
    if mesh.unauthenticated_tls:
        return Authorization(saz.meta.name, unauthenticated_tls=True, networks=networks)
    identities = list(mesh.identities) + [
        identity_name(sa.name, sa.namespace or saz.meta.namespace, trust_domain) for sa in mesh.service_accounts]
    return Authorization(saz.meta.name, identities=sorted(set(identities)), networks=networks)


def _probe_paths(pod: m.Pod) -> dict[int, list[str]]:
    out: dict[int, set[str]] = defaultdict(set)
    for probe in pod.probes:
        port = pod.port_number(probe.port)
        if port is not None:
            out[port].add(probe.path)
    return {port: sorted(paths) for port, paths in out.items()}


def _workload_policy(pod: m.Pod, default_policy: str, default_source: str, claims: dict[int, m.Server],
                     by_server: dict[str, list[Authorization]], ns_warnings: list[str],
                     settings: Settings) -> WorkloadPolicy:
    ns = pod.meta.namespace
    probes = _probe_paths(pod)
    defaults = default_authorizations(default_policy, settings.cluster_networks)
    warnings = list(ns_warnings)
    for probe in pod.probes:
        if pod.port_number(probe.port) is None:
            warnings.append(f"probe {probe.path} on port {probe.port!r}: no such port on pod {pod.meta.name}")
    ports: list[PortPolicy] = []
    for port in sorted({p.container_port for p in pod.ports} | set(claims) | set(probes)):
        server = claims.get(port)
        if server is not None:
            entry = PortPolicy(port, server.meta.name, "Server", server.proxy_protocol,
                               list(by_server.get(server.meta.name, ())), f"Server {ns}/{server.meta.name}")
        else:
            entry = PortPolicy(port, f"default:{default_policy}", "default", "unknown", list(defaults), default_source)
        if port in probes:
            entry.authorizations.append(Authorization(
                PROBE_AUTHORIZATION, kind="probe", unauthenticated=True,
                networks=[Network(n) for n in settings.probe_networks], paths=probes[port]))
        ports.append(entry)
    return WorkloadPolicy(
        namespace=ns, workload=pod.meta.name, default_policy=default_policy,
        default=PortPolicy(0, f"default:{default_policy}", "default", "unknown", list(defaults), default_source),
        ports=ports, cluster_networks=list(settings.cluster_networks),
        sources={"default_policy": default_source}, warnings=warnings)
