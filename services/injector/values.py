"""The install values the injector works from, with Linkerd's names.

One flat frozen dataclass; a values file (YAML or JSON, nested as Linkerd's Helm
values: `proxy.image.version`, `proxyInit.iptablesMode`, `identityTrustAnchorsPEM`)
or `--set proxy.nativeSidecar=false` overrides fill it through `VALUE_KEYS`, strictly:
an unknown key or a value of the wrong type is a UserError naming the key and where.
Pure: reading the file is the caller's business.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from tulle import __version__
from tulle.errors import UserError
from tulle.schemas import DEFAULT_CLUSTER_NETWORKS, DEFAULT_POLICIES

DEFAULT_IMAGE = "ghcr.io/tulle-mesh/tulle"
# Linkerd's default opaque ports: server-speaks-first or TLS-first protocols.
DEFAULT_OPAQUE_PORTS = "25,587,3306,4444,5432,6379,9300,11211"


@dataclass(frozen=True)
class Values:
    control_plane_namespace: str = "tulle"
    cluster_domain: str = "cluster.local"
    trust_domain: str = "cluster.local"
    trust_anchors_pem: str = ""
    cluster_networks: str = ",".join(DEFAULT_CLUSTER_NETWORKS)
    cni_enabled: bool = False
    nats_url: str = "nats://nats.tulle.svc.cluster.local:4222"
    nats_ca_pem: str = ""  # the bus's CA (TLS in a cluster); mounted as a file for the proxy
    image_pull_policy: str = "IfNotPresent"
    # proxy.*
    proxy_image: str = DEFAULT_IMAGE
    proxy_version: str = __version__
    proxy_pull_policy: str = ""  # empty: image_pull_policy
    native_sidecar: bool = True  # the proxy as an init container with restartPolicy: Always (K8s >= 1.29)
    await_proxy: bool = True  # the app starts only once the proxy is ready
    log_level: str = "info"
    log_format: str = "json"
    default_inbound_policy: str = "all-unauthenticated"
    opaque_ports: str = DEFAULT_OPAQUE_PORTS
    proxy_uid: int = 2102
    proxy_gid: int = -1  # -1: none
    inbound_port: int = 4143
    outbound_port: int = 4140
    admin_port: int = 4191
    control_port: int = 4190
    cpu_request: str = "100m"
    cpu_limit: str = ""
    memory_request: str = "64Mi"
    memory_limit: str = "256Mi"
    ephemeral_storage_request: str = ""
    ephemeral_storage_limit: str = ""
    shutdown_grace_period: str = "120s"
    enable_shutdown_endpoint: bool = False
    liveness_initial_delay_s: int = 10
    liveness_timeout_s: int = 1
    readiness_initial_delay_s: int = 2
    readiness_timeout_s: int = 1
    startup_initial_delay_s: int = 0
    startup_period_s: int = 1
    startup_failure_threshold: int = 120
    # proxyInit.*
    proxy_init_image: str = ""  # empty: the proxy's image (one image runs everything)
    proxy_init_version: str = ""
    iptables_mode: str = "nft"
    ignore_inbound_ports: str = "4567,4568"
    ignore_outbound_ports: str = "4567,4568"
    skip_subnets: str = ""
    proxy_init_run_as_root: bool = False
    # proxyInit.resources.*; all empty: the init container gets the proxy's resources
    proxy_init_cpu_request: str = ""
    proxy_init_cpu_limit: str = ""
    proxy_init_memory_request: str = ""
    proxy_init_memory_limit: str = ""
    proxy_init_ephemeral_storage_request: str = ""
    proxy_init_ephemeral_storage_limit: str = ""
    # networkValidator.* (CNI mode). 192.0.2.0/24 is TEST-NET-1: never routed anywhere,
    # so a pod whose redirection is missing sends nothing to a real host.
    validator_connect_addr: str = "192.0.2.1:20001"
    validator_listen_addr: str = "0.0.0.0:4140"
    validator_timeout: str = "10s"

    @property
    def trust_root_sha256(self) -> str:
        # The same fingerprint a proxy's heartbeat carries, so `tulle check` can compare them.
        from tulle.pki import trust_root_sha256

        return trust_root_sha256(self.trust_anchors_pem)

    def with_overrides(self, pairs: Mapping[str, Any], where: str) -> "Values":
        """A copy with Linkerd-style keys (`proxy.nativeSidecar`) set; UserError naming
        the key and `where` on an unknown key or a bad value."""
        changes = {}
        for key, raw in pairs.items():
            attr = VALUE_KEYS.get(key)
            if attr is None:
                raise UserError(f"{where}: unknown value {key!r} (known: {', '.join(sorted(VALUE_KEYS))})")
            changes[attr] = _coerce(raw, FIELD_TYPES[attr], f"{where}: {key}")
        out = dataclasses.replace(self, **changes)
        out.check(where)
        return out

    def check(self, where: str = "values") -> None:
        if self.default_inbound_policy not in DEFAULT_POLICIES:
            raise UserError(f"{where}: proxy.defaultInboundPolicy {self.default_inbound_policy!r} is not one of "
                            f"{', '.join(DEFAULT_POLICIES)}")
        if self.iptables_mode not in ("nft", "legacy"):
            raise UserError(f"{where}: proxyInit.iptablesMode must be nft or legacy, got {self.iptables_mode!r}")
        if self.trust_anchors_pem and "-----BEGIN CERTIFICATE-----" not in self.trust_anchors_pem:
            raise UserError(f"{where}: identityTrustAnchorsPEM is not a PEM certificate bundle")


# Linkerd-style dotted key -> attribute.
VALUE_KEYS = {
    "controlPlaneNamespace": "control_plane_namespace",
    "clusterDomain": "cluster_domain",
    "identityTrustDomain": "trust_domain",
    "identityTrustAnchorsPEM": "trust_anchors_pem",
    "clusterNetworks": "cluster_networks",
    "cniEnabled": "cni_enabled",
    "natsURL": "nats_url",
    "natsCAPEM": "nats_ca_pem",
    "imagePullPolicy": "image_pull_policy",
    "proxy.image.name": "proxy_image",
    "proxy.image.version": "proxy_version",
    "proxy.image.pullPolicy": "proxy_pull_policy",
    "proxy.nativeSidecar": "native_sidecar",
    "proxy.await": "await_proxy",
    "proxy.logLevel": "log_level",
    "proxy.logFormat": "log_format",
    "proxy.defaultInboundPolicy": "default_inbound_policy",
    "proxy.opaquePorts": "opaque_ports",
    "proxy.uid": "proxy_uid",
    "proxy.gid": "proxy_gid",
    "proxy.ports.inbound": "inbound_port",
    "proxy.ports.outbound": "outbound_port",
    "proxy.ports.admin": "admin_port",
    "proxy.ports.control": "control_port",
    "proxy.resources.cpu.request": "cpu_request",
    "proxy.resources.cpu.limit": "cpu_limit",
    "proxy.resources.memory.request": "memory_request",
    "proxy.resources.memory.limit": "memory_limit",
    "proxy.resources.ephemeral-storage.request": "ephemeral_storage_request",
    "proxy.resources.ephemeral-storage.limit": "ephemeral_storage_limit",
    "proxy.shutdownGracePeriod": "shutdown_grace_period",
    "proxy.enableShutdownEndpoint": "enable_shutdown_endpoint",
    "proxy.livenessProbe.initialDelaySeconds": "liveness_initial_delay_s",
    "proxy.livenessProbe.timeoutSeconds": "liveness_timeout_s",
    "proxy.readinessProbe.initialDelaySeconds": "readiness_initial_delay_s",
    "proxy.readinessProbe.timeoutSeconds": "readiness_timeout_s",
    "proxy.startupProbe.initialDelaySeconds": "startup_initial_delay_s",
    "proxy.startupProbe.periodSeconds": "startup_period_s",
    "proxy.startupProbe.failureThreshold": "startup_failure_threshold",
    "proxyInit.image.name": "proxy_init_image",
    "proxyInit.image.version": "proxy_init_version",
    "proxyInit.iptablesMode": "iptables_mode",
    "proxyInit.ignoreInboundPorts": "ignore_inbound_ports",
    "proxyInit.ignoreOutboundPorts": "ignore_outbound_ports",
    "proxyInit.skipSubnets": "skip_subnets",
    "proxyInit.runAsRoot": "proxy_init_run_as_root",
    "proxyInit.resources.cpu.request": "proxy_init_cpu_request",
    "proxyInit.resources.cpu.limit": "proxy_init_cpu_limit",
    "proxyInit.resources.memory.request": "proxy_init_memory_request",
    "proxyInit.resources.memory.limit": "proxy_init_memory_limit",
    "proxyInit.resources.ephemeral-storage.request": "proxy_init_ephemeral_storage_request",
    "proxyInit.resources.ephemeral-storage.limit": "proxy_init_ephemeral_storage_limit",
    "networkValidator.connectAddr": "validator_connect_addr",
    "networkValidator.listenAddr": "validator_listen_addr",
    "networkValidator.timeout": "validator_timeout",
}
FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Values)}


def _coerce(raw: Any, typ: str, what: str) -> Any:
    if typ == "bool":
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("true", "false"):
            return str(raw).lower() == "true"
        raise UserError(f"{what}: expected true or false, got {raw!r}")
    if typ == "int":
        try:
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        except (TypeError, ValueError):
            raise UserError(f"{what}: expected a whole number, got {raw!r}") from None
    if isinstance(raw, (dict, list)):
        raise UserError(f"{what}: expected a string, got {type(raw).__name__}")
    if raw is None:
        return ""
    return str(raw)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"proxy": {"image": {"version": "x"}}} -> {"proxy.image.version": "x"}; a mapping
    under a key that names a value (none do) would stay whole."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key not in VALUE_KEYS:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def from_tree(tree: Any, where: str, base: Values | None = None) -> Values:
    """Values from a parsed values file (nested mappings, Linkerd's names)."""
    if tree is None:
        return base or Values()
    if not isinstance(tree, Mapping):
        raise UserError(f"{where}: expected a mapping of values at the top")
    return (base or Values()).with_overrides(flatten(tree), where)
