"""The pure decisions of local mode: no process, socket or file is touched here.

What isolation a run gets, which subnet and addresses it uses, what each namespace and
interface is called, the environment of every app and proxy, the Pod manifest the
runner writes for a workload, the hosts file of a namespace, and the iptables rules
proxy-init would write. Tested in microseconds (tests/test_local_plan.py).

A meshed workload's pod and its proxy's environment come from the injector's own core
(services/injector/core.py), as the admission webhook would patch the pod: local mode
runs what a cluster would, and adds only what is its own (addresses, the token file,
the run's bus).
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import random
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import jsonpatch

from services.injector import core as injector
from services.injector.values import Values
from tulle.errors import UserError
from tulle.proxyinit import rules as proxyinit_rules
from tulle.resources import model as m
from tulle.schemas import identity_name

PROXY_UID = 2102  # DESIGN.md / Linkerd: the proxy's user, excluded from the outbound redirect
INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT = 4143, 4140, 4191
CONTROL_PORT = 4190
PROXY_CONTAINER = m.PROXY_CONTAINER
ISOLATIONS = ("auto", "netns", "none")
# Second octets a run may use: 10.<n>.0.0/16 (netns) or 127.<n>.0.0/16 (none).
# 96 is the local cluster-IP range (10.96.0.0/16), never a pod subnet.
SUBNET_OCTETS = tuple(n for n in range(100, 255) if n != 96)
# Variables a user's shell may carry that would send an app's traffic somewhere else.
PROXY_ENV_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                  "NO_PROXY", "no_proxy", "grpc_proxy", "no_grpc_proxy")


# --- isolation ------------------------------------------------------------------------------


def resolve_isolation(requested: str, *, is_root: bool, is_linux: bool, have_ip: bool, have_iptables: bool) -> str:
    """`auto` is netns when it can work (root on Linux with ip and iptables), else none."""
    can = is_root and is_linux and have_ip and have_iptables
    if requested == "auto":
        return "netns" if can else "none"
    if requested == "netns" and not can:
        missing = [what for ok, what in ((is_linux, "Linux"), (is_root, "root"), (have_ip, "the `ip` command (iproute2)"),
                                         (have_iptables, "the `iptables` command")) if not ok]
        raise UserError(f"--isolation netns needs {', '.join(missing)}; run as root, or use --isolation none")
    if requested not in ISOLATIONS:
        raise UserError(f"--isolation: expected one of {', '.join(ISOLATIONS)}, got {requested!r}")
    return requested


# --- subnets and addresses --------------------------------------------------------------------


def subnet_of(isolation: str, n: int) -> ipaddress.IPv4Network:
    first = 10 if isolation == "netns" else 127
    return ipaddress.ip_network(f"{first}.{n}.0.0/16")


def subnet_candidates(seed: int) -> list[int]:
    """Every usable second octet, in an order drawn from `seed` (the supervisor's pid), so
    runs started at the same moment try different subnets first."""
    octets = list(SUBNET_OCTETS)
    random.Random(seed).shuffle(octets)
    return octets


def subnet_free(subnet: ipaddress.IPv4Network, in_use: Iterable[ipaddress.IPv4Network]) -> bool:
    """Free when no network already routed or addressed on this host overlaps it.

    A default route (0.0.0.0/0) and the host's own /8 loopback are not conflicts.
    """
    for net in in_use:
        if net.prefixlen == 0:
            continue
        if subnet.network_address.is_loopback and net == ipaddress.ip_network("127.0.0.0/8"):
            continue
        if net.overlaps(subnet):
            return False
    return True


def bridge_address(n: int) -> str:
    return f"10.{n}.0.1"


def workload_address(isolation: str, n: int, index: int) -> str:
    """The index-th workload's address: 10.<n>.x.y (netns) or 127.<n>.x.y (none).

    .0.1 is the bridge; hosts skip .0 and .255 in every /24.
    """
    first = 10 if isolation == "netns" else 127
    return f"{first}.{n}.{1 + index // 254}.{1 + index % 254}"


def first_free_index(used: Iterable[int]) -> int:
    used = set(used)
    i = 0
    while i in used:
        i += 1
    return i


# --- names -----------------------------------------------------------------------------------


def bridge_name(n: int) -> str:
    return f"tl{n}br"


def veth_name(n: int, index: int) -> str:
    return f"tl{n}v{index}"  # at most 11 characters; interface names stop at 15


def veth_peer_name(n: int, index: int) -> str:
    return f"tl{n}p{index}"  # renamed to eth0 once inside the namespace


def netns_name(n: int, namespace: str, name: str) -> str:
    """`tl<n>-<namespace>-<name>`, shortened with a hash when long (it is a file name)."""
    full = f"tl{n}-{namespace}-{name}"
    if len(full) <= 60:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:10]
    return f"{full[:49]}-{digest}"


def workload_key(namespace: str, name: str) -> str:
    return f"{namespace}.{name}"


def log_name(kind: str, namespace: str, name: str) -> str:
    """Log file stem of a workload's app ("workload") or its proxy ("proxy")."""
    return f"{kind}-{namespace}-{name}"


# --- environments --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a workload runs in this run."""

    isolation: str  # netns | none
    address: str  # its pod IP
    meshed: bool  # a proxy in front of it
    netns: str = ""  # namespace name (netns isolation)


def port_env_name(name: str) -> str:
    return "PORT_" + name.upper().replace("-", "_")


def app_env(base: Mapping[str, str], w: m.Workload, p: Placement) -> dict[str, str]:
    """The app's environment (ARCHITECTURE.md, "Local mode addressing").

    HOST/PORT (the first declared port), PORT_<NAME> per named port, TULLE_WORKLOAD,
    TULLE_NAMESPACE, POD_IP; without namespaces a meshed app reaches others through its
    proxy's outbound port as an HTTP proxy (grpcio honours http_proxy with CONNECT too).
    The Workload's own env comes last and wins.
    """
    env = {k: v for k, v in base.items() if k not in PROXY_ENV_VARS and not k.startswith("TULLE_PROXY_")}
    env["HOST"] = "0.0.0.0" if p.isolation == "netns" else p.address
    if w.ports:
        env["PORT"] = str(w.ports[0].container_port)
    for port in w.ports:
        if port.name:
            env[port_env_name(port.name)] = str(port.container_port)
    env.update(TULLE_WORKLOAD=w.meta.name, TULLE_NAMESPACE=w.meta.namespace, POD_IP=p.address,
               POD_NAME=w.meta.name, POD_NAMESPACE=w.meta.namespace)
    if p.isolation == "none" and p.meshed:
        proxy = f"http://{p.address}:{OUTBOUND_PORT}"
        no_proxy = f"{p.address},localhost,127.0.0.1"
        env.update(HTTP_PROXY=proxy, http_proxy=proxy, NO_PROXY=no_proxy, no_proxy=no_proxy)
    env.update(dict(w.env))
    return env


def install_values(*, trust_anchors_pem: str, nats_url: str, trust_domain: str = "cluster.local",
                   cluster_domain: str = "cluster.local", default_inbound_policy: str = "all-unauthenticated",
                   networks: Iterable[str] = (), shutdown_grace: str = "3s") -> Values:
    """The install values local mode injects its workloads with: the run's trust anchors,
    bus, domains, cluster networks and default inbound policy. The proxy's ports stay
    DESIGN.md's (local mode's addresses, probes and iptables rules are built on them);
    the shutdown grace is short because `tulle down` waits for it."""
    kw: dict[str, Any] = {}
    networks = ",".join(networks)
    if networks:
        kw["cluster_networks"] = networks
    return Values(trust_anchors_pem=trust_anchors_pem, nats_url=nats_url, trust_domain=trust_domain,
                  cluster_domain=cluster_domain, default_inbound_policy=default_inbound_policy,
                  shutdown_grace_period=shutdown_grace, **kw)


def declared_pod(w: m.Workload) -> dict:
    """The Workload as the Pod its manifest declares, before any injection: its name,
    labels, annotations and service account, and one container with its command, ports
    and probes."""
    app: dict = {"name": w.meta.name, "command": list(w.command)}
    if w.ports:
        app["ports"] = [{"containerPort": port.container_port, "protocol": port.protocol,
                         **({"name": port.name} if port.name else {})} for port in w.ports]
    for key, probe in zip(("readinessProbe", "livenessProbe", "startupProbe"), w.probes):
        app[key] = {"httpGet": {"path": probe.path, "port": probe.port}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": w.meta.name, "namespace": w.meta.namespace, "labels": dict(w.meta.labels),
                     "annotations": dict(w.meta.annotations)},
        "spec": {"serviceAccountName": w.service_account, "containers": [app]},
    }


@dataclass(frozen=True)
class Injection:
    """What the injector's core made of a Workload's pod."""

    plan: injector.Plan  # inject or skip (and why), the resolved proxy settings, the patch
    pod: dict  # the pod with the patch applied; as declared when skipped

    @property
    def injected(self) -> bool:
        return self.plan.inject


def inject(w: m.Workload, namespace: Optional[m.Namespace], values: Values) -> Injection:
    """Run the Workload's pod through the injection core, as the admission webhook would
    (pod > namespace > install values for every config annotation; the same skips)."""
    pod = declared_pod(w)
    if w.injected:
        # Local mode meshes a Workload unless it says `tulle.dev/inject: disabled`: to the
        # core that is a pod opted in by its own annotation.
        pod["metadata"]["annotations"].setdefault(m.INJECT_ANNOTATION, "enabled")
    ns_annotations = dict(namespace.meta.annotations) if namespace is not None else {}
    plan = injector.plan_pod(injector.Target("Pod", w.meta.name, w.meta.namespace, pod), ns_annotations, values,
                             injector.WEBHOOK)
    return Injection(plan, jsonpatch.apply_patch(pod, plan.ops) if plan.inject else pod)


def proxy_container(pod: Mapping[str, Any]) -> dict:
    spec = pod.get("spec") or {}
    for c in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
        if c.get("name") == PROXY_CONTAINER:
            return c
    raise ValueError(f"pod {pod['metadata']['namespace']}/{pod['metadata']['name']} has no {PROXY_CONTAINER} container")


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """A downward-API fieldRef (`metadata.name`, `spec.serviceAccountName`,
    `metadata.annotations['k']`) read from the pod, as the kubelet resolves it."""
    node: Any = pod
    head, bracket, key = path.partition("[")
    for part in head.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if bracket:
        node = (node or {}).get(key.rstrip("]").strip("'\""))
    if node is None:
        raise ValueError(f"fieldRef {path}: the pod has no such field")
    return str(node)


PASSED_TO_PROXIES = ("TULLE_PROXY_IDENTITY_MIN_REFRESH", "TULLE_PROXY_IDENTITY_MAX_REFRESH")


def proxy_env(base: Mapping[str, str], w: m.Workload, p: Placement, injection: Injection, *, token_file: str,
              nats_ca: str = "") -> dict[str, str]:
    """The proxy's environment: the injected pod's `tulle-proxy` env (proxy/config.py's
    contract, fieldRefs resolved from the pod), plus what only local mode has: the
    run's token file and bus CA, and the addresses of this placement."""
    if not injection.injected:
        raise ValueError(f"workload {w.meta.namespace}/{w.meta.name} was not injected: {injection.plan.reason}")
    env = {k: v for k, v in base.items() if k not in PROXY_ENV_VARS and not k.startswith("TULLE_PROXY_")
           and k not in ("TULLE_NATS_CREDS", "TULLE_NATS_CA")}
    for var in proxy_container(injection.pod).get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            env[var["name"]] = field_value(injection.pod, var["valueFrom"]["fieldRef"]["fieldPath"])
    env["TULLE_PROXY_TOKEN_FILE"] = token_file
    # Certificate renewal pacing is the one proxy setting `tulle up`'s own environment may
    # pass on (short lifetimes for fault tests: TULLE_IDENTITY_LIFETIME reaches identity).
    env.update({k: base[k] for k in PASSED_TO_PROXIES if base.get(k)})
    if nats_ca:
        env["TULLE_NATS_CA"] = nats_ca
    if p.isolation == "netns":
        env.update({
            "TULLE_PROXY_INBOUND_ADDR": f"0.0.0.0:{INBOUND_PORT}",
            "TULLE_PROXY_OUTBOUND_ADDR": f"127.0.0.1:{OUTBOUND_PORT}",
            "TULLE_PROXY_ADMIN_ADDR": f"0.0.0.0:{ADMIN_PORT}",
            "TULLE_PROXY_APP_HOST": "127.0.0.1",
            "TULLE_PROXY_TRANSPARENT": "true",
        })
    else:
        env.update({
            "TULLE_PROXY_INBOUND_ADDR": f"{p.address}:{INBOUND_PORT}",
            "TULLE_PROXY_OUTBOUND_ADDR": f"{p.address}:{OUTBOUND_PORT}",
            "TULLE_PROXY_ADMIN_ADDR": f"{p.address}:{ADMIN_PORT}",
            "TULLE_PROXY_APP_HOST": p.address,
            "TULLE_PROXY_TRANSPARENT": "false",
            "TULLE_PROXY_APP_DEFAULT_PORT": str(w.ports[0].container_port) if w.ports else "0",
        })
    return env


def cluster_networks(isolation: str, n: int) -> list[str]:
    """What counts as "the cluster" for cluster-* policies: the run's pod subnet with
    namespaces; without them every peer is on the loopback (a proxy's outgoing
    connections may come from 127.0.0.1, not its own 127.<n>.x.y)."""
    return [str(subnet_of("netns", n))] if isolation == "netns" else ["127.0.0.0/8"]


def workload_identity(w: m.Workload, trust_domain: str = "cluster.local") -> str:
    return identity_name(w.service_account, w.meta.namespace, trust_domain)


# --- the Pod the runner writes (the kubelet's view of a workload) ------------------------------------


def pod_manifest(w: m.Workload, p: Placement, *, ready: bool, injection: Optional[Injection] = None,
                 node_name: str = "local") -> dict:
    """A `v1 Pod` for a running Workload, as a cluster would hold it: when meshed, the
    pod the injector's core made of it (the `tulle-proxy` container and everything else
    the webhook adds), else as declared; with status.podIP and a Ready condition."""
    if p.meshed:
        if injection is None or not injection.injected:
            why = injection.plan.reason if injection is not None else "no injection given"
            raise ValueError(f"workload {w.meta.namespace}/{w.meta.name} is meshed but was not injected: {why}")
        pod = copy.deepcopy(injection.pod)
    else:
        pod = declared_pod(w)
    if p.meshed and p.isolation == "none":
        # No iptables: peers dial the proxy's own port (endpoints carry proxy_port).
        pod["metadata"].setdefault("annotations", {})[m.PROXY_INBOUND_PORT_ANNOTATION] = str(INBOUND_PORT)
    pod["spec"]["nodeName"] = node_name
    pod["status"] = {
        "phase": "Running",
        "podIP": p.address,
        "podIPs": [{"ip": p.address}],
        "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"},
            {"type": "ContainersReady", "status": "True" if ready else "False"},
        ],
    }
    return pod


def pod_file_name(namespace: str, name: str) -> str:
    return f"pod-{namespace}-{name}.json"


# --- hosts files (the cluster DNS of a namespace) ----------------------------------------------------


def service_names(svc: m.Service, cluster_domain: str = "cluster.local") -> list[str]:
    ns, name = svc.meta.namespace, svc.meta.name
    return [f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{cluster_domain}"]


def hosts_file(pod_name: str, pod_ip: str, pod_namespace: str, services: Iterable[m.Service],
               cluster_domain: str = "cluster.local") -> str:
    """/etc/hosts for one namespace: its own name, and every Service's DNS names mapped
    to its cluster IP; short names only for the pod's own namespace, as the cluster
    DNS search path would resolve them."""
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", f"{pod_ip}\t{pod_name}"]
    for svc in sorted(services, key=lambda s: (s.meta.namespace, s.meta.name)):
        if not svc.cluster_ip or svc.cluster_ip == "None":
            continue
        names = service_names(svc, cluster_domain)
        if svc.meta.namespace == pod_namespace:
            names.insert(0, svc.meta.name)
        lines.append(f"{svc.cluster_ip}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


# A namespace has no route to a DNS server: names are the cluster's, from its hosts file.
# Pointing the resolver at the namespace's own loopback, where nothing listens, makes any
# other lookup fail at once instead of after the resolver's timeouts (10 s and more).
RESOLV_CONF = "# tulle local mode: service names come from /etc/hosts\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


# --- iptables, as Linkerd's proxy-init writes them (tulle/proxyinit/rules.py) ---------------------------

REDIRECT_CHAIN = proxyinit_rules.REDIRECT_CHAIN
OUTPUT_CHAIN = proxyinit_rules.OUTPUT_CHAIN


def proxy_init_rules(*, proxy_uid: int = PROXY_UID, proxy_gid: int = PROXY_UID, inbound_port: int = INBOUND_PORT,
                     outbound_port: int = OUTBOUND_PORT,
                     inbound_ports_to_ignore: Iterable[int] = (CONTROL_PORT, ADMIN_PORT),
                     outbound_ports_to_ignore: Iterable[int] = ()) -> str:
    """`iptables-restore --noflush` input for the nat table of one namespace, as
    `tulle proxy-init` writes it. Local mode adds the gid rule: a proxy that must keep
    uid 0 (a checkout uid 2102 cannot read) still runs with gid 2102, and its traffic
    is still not redirected."""
    def ranges(ports: Iterable[int]) -> tuple:
        return tuple(proxyinit_rules.PortRange(p, p) for p in sorted(set(ports)))

    return proxyinit_rules.restore_input(proxyinit_rules.Config(
        inbound_port=inbound_port, outbound_port=outbound_port, proxy_uid=proxy_uid, proxy_gid=proxy_gid,
        inbound_ports_to_ignore=ranges(inbound_ports_to_ignore),
        outbound_ports_to_ignore=ranges(outbound_ports_to_ignore)))


def bridge_forward_rule(bridge: str) -> list[str]:
    """Host FORWARD rule letting pods talk across the bridge even when the host's
    FORWARD policy drops (Docker sets it so, and br_netfilter applies it to bridges)."""
    return ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT", "-m", "comment", "--comment", f"tulle/{bridge}"]


# --- what the status view shows -------------------------------------------------------------------------


def selected_workloads(svc: m.Service, workloads: Iterable[m.Workload]) -> list[m.Workload]:
    if not svc.selector:
        return []
    return [w for w in workloads
            if w.meta.namespace == svc.meta.namespace and all(w.meta.labels.get(k) == v for k, v in svc.selector.items())]


def services_view(services: Iterable[m.Service], workloads: Iterable[m.Workload],
                  ready: Mapping[str, bool]) -> list[dict]:
    """Each Service with its cluster IP, ports and the workloads behind it (ready or not)."""
    workloads = list(workloads)
    out = []
    for svc in sorted(services, key=lambda s: (s.meta.namespace, s.meta.name)):
        out.append({
            "name": svc.meta.name,
            "namespace": svc.meta.namespace,
            "cluster_ip": svc.cluster_ip,
            "ports": [{"name": p.name, "port": p.port, "target_port": p.target_port, "protocol": p.protocol}
                      for p in svc.ports],
            "endpoints": [{"workload": w.meta.name, "ready": bool(ready.get(workload_key(w.meta.namespace, w.meta.name)))}
                          for w in selected_workloads(svc, workloads)],
        })
    return out


def restart_delay(consecutive_failures: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Back-off before restarting a crashed process: 0.5 s, 1 s, 2 s ... at most 30 s."""
    if consecutive_failures <= 0:
        return 0.0
    return min(cap, base * (2 ** (consecutive_failures - 1)))


def resolve_port(w: m.Workload, port: int | str) -> Optional[int]:
    if isinstance(port, int):
        return port
    for p in w.ports:
        if p.name == port:
            return p.container_port
    return None
