"""The resource model: what the control plane reads, from Kubernetes or from a folder.

Both sources produce these same objects, so every service has one code path. Field
names follow Kubernetes and Linkerd; values are already validated (see parse.py).

Kinds:
  v1                         Namespace, Service, Pod
  discovery.k8s.io/v1        EndpointSlice
  tulle.dev/v1alpha1         Workload (a local-mode pod: what to run), ServiceProfile
  policy.tulle.dev/v1alpha1  Server, ServerAuthorization

In local mode the runner turns each Workload into a Pod (with its address and
readiness), as the kubelet would; services read Pods in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

PROXY_CONTAINER = "tulle-proxy"
INJECT_ANNOTATION = "tulle.dev/inject"
CONFIG_PREFIX = "config.tulle.dev/"
DEFAULT_POLICY_ANNOTATION = "config.tulle.dev/default-inbound-policy"
OPAQUE_PORTS_ANNOTATION = "config.tulle.dev/opaque-ports"
# Local mode without iptables: where the pod's inbound proxy listens.
PROXY_INBOUND_PORT_ANNOTATION = "tulle.dev/proxy-inbound-port"


@dataclass(frozen=True, slots=True)
class Meta:
    name: str
    namespace: str = ""  # empty for cluster-scoped kinds (Namespace)
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    annotations: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    resource_version: str = field(default="", compare=False)
    uid: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class LabelSelectorRequirement:
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """Kubernetes LabelSelector. An empty selector matches everything."""

    match_labels: dict[str, str] = field(default_factory=dict, hash=False)
    match_expressions: tuple[LabelSelectorRequirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and (not present or labels[req.key] not in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


# --- core kinds -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Namespace:
    meta: Meta
    kind: str = "Namespace"


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: Union[int, str]  # number, or the name of a container port
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    meta: Meta
    ports: tuple[ServicePort, ...]
    # None: no selector (endpoints come only from EndpointSlices).
    selector: Optional[dict[str, str]] = field(default=None, hash=False)
    cluster_ip: str = ""  # "" unassigned, "None" headless
    type: str = "ClusterIP"
    kind: str = "Service"


@dataclass(frozen=True, slots=True)
class ContainerPort:
    container_port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class HTTPProbe:
    """An httpGet probe; the policy service always admits it from the local health checker."""

    path: str
    port: Union[int, str]


@dataclass(frozen=True, slots=True)
class Container:
    name: str
    ports: tuple[ContainerPort, ...] = ()
    probes: tuple[HTTPProbe, ...] = ()


@dataclass(frozen=True, slots=True)
class Pod:
    meta: Meta
    service_account: str = "default"
    containers: tuple[Container, ...] = ()
    ip: str = ""
    ready: bool = False
    node_name: str = ""
    host_network: bool = False
    phase: str = ""
    kind: str = "Pod"

    @property
    def meshed(self) -> bool:
        """Whether the pod runs a Tulle proxy (its endpoints then get an identity)."""
        return any(c.name == PROXY_CONTAINER for c in self.containers)

    def port_number(self, port: Union[int, str]) -> Optional[int]:
        """Resolve a port number or a container port name."""
        if isinstance(port, int):
            return port
        for c in self.containers:
            for p in c.ports:
                if p.name == port:
                    return p.container_port
        return None

    @property
    def ports(self) -> tuple[ContainerPort, ...]:
        return tuple(p for c in self.containers if c.name != PROXY_CONTAINER for p in c.ports)

    @property
    def probes(self) -> tuple[HTTPProbe, ...]:
        return tuple(pr for c in self.containers if c.name != PROXY_CONTAINER for pr in c.probes)


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    target_pod: str = ""  # targetRef.name when kind is Pod
    zone: str = ""
    node_name: str = ""


@dataclass(frozen=True, slots=True)
class SlicePort:
    port: int
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    meta: Meta
    service: str  # label kubernetes.io/service-name
    address_type: str
    endpoints: tuple[SliceEndpoint, ...]
    ports: tuple[SlicePort, ...]
    kind: str = "EndpointSlice"


# --- tulle.dev ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """A local-mode pod: what to run, and the pod it becomes.

    `command` runs in the manifest's folder, with PORT (the first port) and
    TULLE_WORKLOAD set; `env` adds more.
    """

    meta: Meta
    command: tuple[str, ...]
    service_account: str = "default"
    ports: tuple[ContainerPort, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    probes: tuple[HTTPProbe, ...] = ()
    # Folder of the manifest that declared it (commands run there).
    base_dir: str = field(default="", compare=False)
    kind: str = "Workload"

    @property
    def injected(self) -> bool:
        return self.meta.annotations.get(INJECT_ANNOTATION, "enabled") in ("enabled", "ingress")


@dataclass(frozen=True, slots=True)
class StatusRange:
    min: int = 100
    max: int = 599


@dataclass(frozen=True, slots=True)
class RequestMatch:
    method: Optional[str] = None
    path_regex: Optional[str] = None
    all: Optional[tuple["RequestMatch", ...]] = None
    any: Optional[tuple["RequestMatch", ...]] = None
    not_: Optional["RequestMatch"] = None


@dataclass(frozen=True, slots=True)
class ResponseMatch:
    status: Optional[StatusRange] = None
    all: Optional[tuple["ResponseMatch", ...]] = None
    any: Optional[tuple["ResponseMatch", ...]] = None
    not_: Optional["ResponseMatch"] = None


@dataclass(frozen=True, slots=True)
class ResponseClass:
    condition: ResponseMatch
    is_failure: bool = False


@dataclass(frozen=True, slots=True)
class RouteSpec:
    name: str
    condition: RequestMatch
    response_classes: tuple[ResponseClass, ...] = ()
    is_retryable: bool = False
    timeout_ms: int = 0


@dataclass(frozen=True, slots=True)
class RetryBudgetSpec:
    retry_ratio: float = 0.2
    min_retries_per_second: int = 10
    ttl_ms: int = 10000


@dataclass(frozen=True, slots=True)
class ServiceProfile:
    """Named `<service>.<namespace>.svc.<cluster-domain>`, in the service's namespace."""

    meta: Meta
    routes: tuple[RouteSpec, ...] = ()
    retry_budget: Optional[RetryBudgetSpec] = None
    opaque_ports: tuple[int, ...] = ()
    kind: str = "ServiceProfile"

    @property
    def service(self) -> str:
        return self.meta.name.split(".", 1)[0]


# --- policy.tulle.dev -----------------------------------------------------------------------

ProxyProtocol = Literal["unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque", "TLS"]


@dataclass(frozen=True, slots=True)
class Server:
    meta: Meta
    pod_selector: LabelSelector
    port: Union[int, str]
    proxy_protocol: ProxyProtocol = "unknown"
    kind: str = "Server"


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    cidr: str
    except_: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServiceAccountRef:
    name: str
    namespace: str = ""  # empty: the ServerAuthorization's namespace


@dataclass(frozen=True, slots=True)
class MeshTLS:
    """Exactly one of the three is set."""

    unauthenticated_tls: bool = False
    identities: tuple[str, ...] = ()
    service_accounts: tuple[ServiceAccountRef, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerAuthorization:
    meta: Meta
    # Exactly one of server_name / server_selector.
    server_name: str = ""
    server_selector: Optional[LabelSelector] = None
    mesh_tls: Optional[MeshTLS] = None
    unauthenticated: bool = False
    networks: tuple[NetworkSpec, ...] = ()
    kind: str = "ServerAuthorization"


Resource = Union[Namespace, Service, Pod, EndpointSlice, Workload, ServiceProfile, Server, ServerAuthorization]

KINDS: dict[str, str] = {
    "Namespace": "v1",
    "Service": "v1",
    "Pod": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "Workload": "tulle.dev/v1alpha1",
    "ServiceProfile": "tulle.dev/v1alpha1",
    "Server": "policy.tulle.dev/v1alpha1",
    "ServerAuthorization": "policy.tulle.dev/v1alpha1",
}


def key_of(obj: Resource) -> tuple[str, str, str]:
    """(kind, namespace, name): what identifies an object across events."""
    return (obj.kind, obj.meta.namespace, obj.meta.name)
