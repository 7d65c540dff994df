"""The injection core: decide inject or skip, and produce the RFC 6902 patch.

Pure (no I/O): the webhook and `tulle inject` both call `plan_pod()` with the pod (or a
workload's pod template), its namespace's annotations and the install values, and get
back a `Plan`: inject or skip (with the reason), warnings, and the JSON patch ops.

    plan = plan_pod(Target(kind="Deployment", name="web", namespace="shop",
                           pod=deployment["spec"]["template"], prefix="/spec/template",
                           owner_kind="deployment", owner_name="web"),
                    ns_annotations={}, values=Values(...), origin=CLI)

The patch follows Linkerd's (charts/patch): `add` ops in the order metadata,
annotations, labels, volumes, init containers, the proxy-init (or in CNI mode the
network validator) init container, identity volumes, then the proxy — as an init
container with `restartPolicy: Always` right after proxy-init (native sidecar), as the
first container (await), or the last. A pod that already carries a proxy of another
version first gets `remove` ops for everything an earlier injection added, so the new
proxy takes its place and is never duplicated.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from services.injector.values import Values
from tulle import __version__
from tulle.proxyinit import rules as proxyinit_rules
from tulle.resources.parse import _Invalid, parse_duration_ms
from tulle.schemas import DEFAULT_POLICIES

# --- names -------------------------------------------------------------------------------

INJECT = "tulle.dev/inject"
PREFIX = "tulle.dev/"
CONFIG_PREFIX = "config.tulle.dev/"
CREATED_BY = "tulle.dev/created-by"
PROXY_VERSION = "tulle.dev/proxy-version"
TRUST_ROOT_SHA256 = "tulle.dev/trust-root-sha256"
NATS_CA_ANNOTATION = "tulle.dev/nats-ca"
OPAQUE_PORTS = "config.tulle.dev/opaque-ports"
CONTROL_PLANE_NS_LABEL = "tulle.dev/control-plane-ns"
WORKLOAD_NS_LABEL = "tulle.dev/workload-ns"
OWNER_LABEL = "tulle.dev/proxy-{kind}"  # deployment, replicaset, statefulset, daemonset, job, cronjob, ...

PROXY_CONTAINER = "tulle-proxy"
INIT_CONTAINER = "tulle-init"
VALIDATOR_CONTAINER = "tulle-network-validator"
IDENTITY_VOLUME = "tulle-identity-end-entity"
TOKEN_VOLUME = "tulle-identity-token"
XTABLES_VOLUME = "tulle-proxy-init-xtables-lock"
NATS_CA_VOLUME = "tulle-nats-ca"
INJECTED_CONTAINERS = (PROXY_CONTAINER, INIT_CONTAINER, VALIDATOR_CONTAINER)
INJECTED_VOLUMES = (IDENTITY_VOLUME, TOKEN_VOLUME, XTABLES_VOLUME, NATS_CA_VOLUME)

TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_FILE = f"{TOKEN_DIR}/{TOKEN_VOLUME}"
IDENTITY_DIR = "/var/run/tulle/identity/end-entity"
NATS_CA_DIR = "/var/run/tulle/nats"
TOKEN_EXPIRATION_S = 86400

WEBHOOK, CLI = "webhook", "cli"
OWNER_KINDS = ("deployment", "replicaset", "statefulset", "daemonset", "job", "cronjob", "replicationcontroller")
NEVER_INJECTED_NAMESPACES = ("kube-system",)

# config.tulle.dev/<key> annotations the core reads; a namespace's are copied onto its pods.
CONFIG_KEYS = (
    "proxy-image", "proxy-version", "image-pull-policy", "init-image", "init-image-version",
    "proxy-log-level", "proxy-log-format", "default-inbound-policy", "opaque-ports",
    "skip-inbound-ports", "skip-outbound-ports", "skip-subnets",
    "inbound-port", "outbound-port", "admin-port", "control-port",
    "proxy-cpu-request", "proxy-cpu-limit", "proxy-memory-request", "proxy-memory-limit",
    "proxy-ephemeral-storage-request", "proxy-ephemeral-storage-limit",
    "proxy-uid", "proxy-gid", "proxy-await", "proxy-enable-native-sidecar",
    "shutdown-grace-period", "proxy-admin-shutdown",
)

_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_LOG_LEVEL = re.compile(r"^[a-zA-Z_.:=,\[\]{}0-9-]+$")
_IMAGE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._/:@-]*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


# --- inputs and outputs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What is injected: a Pod, or a workload's pod template."""

    kind: str  # the object's kind, for reports: Pod, Deployment, CronJob ...
    name: str  # the object's name (a pod's generateName when it has no name yet)
    namespace: str
    pod: Mapping[str, Any]  # {"metadata": ..., "spec": ...}: the pod or the template
    prefix: str = ""  # JSON pointer of `pod` in the object: "", /spec/template, /spec/jobTemplate/spec/template
    owner_kind: str = ""  # lower case, for the tulle.dev/proxy-<kind> label
    owner_name: str = ""


@dataclass(frozen=True)
class ProxyConfig:
    """The proxy's settings once pod > namespace > values precedence has been applied."""

    image: str
    version: str
    pull_policy: str
    init_image: str
    init_version: str
    log_level: str
    log_format: str
    default_inbound_policy: str
    opaque_ports: str
    skip_inbound_ports: str
    skip_outbound_ports: str
    skip_subnets: str
    inbound_port: int
    outbound_port: int
    admin_port: int
    control_port: int
    resources: dict
    uid: int
    gid: int
    await_proxy: bool
    native_sidecar: bool
    shutdown_grace_period: str
    shutdown_endpoint: bool


@dataclass
class Plan:
    inject: bool
    reason: str = ""  # why not, when skipped
    ops: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: Optional[ProxyConfig] = None
    replaced_version: str = ""  # the proxy version an earlier injection left, now replaced


class InvalidConfig(Exception):
    """An annotation value the core cannot use; the message names the annotation and the value."""


# --- small pure helpers -------------------------------------------------------------------------------


def escape(key: str) -> str:
    """One JSON pointer token (RFC 6901): '~' -> '~0', '/' -> '~1'."""
    return key.replace("~", "~0").replace("/", "~1")


def annotations_of(pod: Mapping[str, Any]) -> dict[str, str]:
    meta = pod.get("metadata") or {}
    return {str(k): "" if v is None else str(v) for k, v in (meta.get("annotations") or {}).items()}


def labels_of(pod: Mapping[str, Any]) -> dict[str, str]:
    meta = pod.get("metadata") or {}
    return {str(k): "" if v is None else str(v) for k, v in (meta.get("labels") or {}).items()}


def spec_of(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = pod.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def container_ports(pod: Mapping[str, Any]) -> list[tuple[int, str]]:
    """(containerPort, protocol) of every app container (init containers included)."""
    spec = spec_of(pod)
    out = []
    for c in list(spec.get("containers") or []) + list(spec.get("initContainers") or []):
        if not isinstance(c, Mapping) or c.get("name") in INJECTED_CONTAINERS:
            continue
        for p in c.get("ports") or []:
            if isinstance(p, Mapping) and isinstance(p.get("containerPort"), int):
                out.append((p["containerPort"], str(p.get("protocol") or "TCP")))
    return out


def port_set(text: str) -> set[int]:
    ports: set[int] = set()
    for r in proxyinit_rules.parse_ports(text, "ports"):
        ports.update(range(r.first, r.last + 1))
    return ports


def default_opaque_annotation(ports: Iterable[int], default_opaque: str) -> str:
    """The `config.tulle.dev/opaque-ports` value for a pod or Service exposing `ports`:
    the default opaque ports among them, or "" when there are none."""
    hit = sorted(set(ports) & port_set(default_opaque))
    return ",".join(map(str, hit))


def existing_proxy_version(pod: Mapping[str, Any]) -> Optional[str]:
    """The version of a proxy an earlier injection added (None: not injected; "" when
    the version cannot be told)."""
    spec = spec_of(pod)
    for c in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
        if isinstance(c, Mapping) and c.get("name") == PROXY_CONTAINER:
            return annotations_of(pod).get(PROXY_VERSION) or str(c.get("image", "")).rpartition(":")[2]
    return None


# --- the decision ---------------------------------------------------------------------------------


def copied_namespace_annotations(pod_annotations: Mapping[str, str], ns_annotations: Mapping[str, str]) -> dict[str, str]:
    """The namespace's config.tulle.dev/* (and inject) annotations the pod lacks."""
    return {k: str(v) for k, v in sorted(ns_annotations.items())
            if (k.startswith(CONFIG_PREFIX) or k == INJECT) and k not in pod_annotations}


def inject_decision(pod_value: str, ns_value: str, origin: str) -> tuple[bool, str]:
    """Linkerd's truth table for the inject annotation: (inject?, reason when not)."""
    valid = ("", "enabled", "disabled", "ingress")
    if origin == CLI:
        if pod_value == "disabled":
            return False, f'pod has the annotation "{INJECT}: disabled"'
        return True, ""
    if ns_value not in valid:
        return False, f'invalid value "{ns_value}" for annotation "{INJECT}" at namespace (expected enabled, disabled or ingress)'
    if pod_value not in valid:
        return False, f'invalid value "{pod_value}" for annotation "{INJECT}" at workload (expected enabled, disabled or ingress)'
    if ns_value in ("enabled", "ingress"):
        if pod_value == "disabled":
            return False, f'pod has the annotation "{INJECT}: disabled"'
        return True, ""
    if pod_value in ("enabled", "ingress"):
        return True, ""
    if ns_value == "disabled":
        return False, f'namespace has the annotation "{INJECT}: disabled"'
    return False, f'neither the namespace nor the pod have the annotation "{INJECT}: enabled"'


def resolve_config(annotations: Mapping[str, str], ns_annotations: Mapping[str, str], values: Values) -> ProxyConfig:
    """pod > namespace > values. InvalidConfig names the first bad annotation."""

    def get(key: str, default: Any) -> tuple[Any, str]:
        name = CONFIG_PREFIX + key
        if name in annotations:
            return annotations[name], name
        if name in ns_annotations:
            return str(ns_annotations[name]), f"{name} (from the namespace)"
        return default, ""

    def bad(where: str, value: Any, why: str) -> InvalidConfig:
        return InvalidConfig(f'invalid value "{value}" for annotation "{where}": {why}')

    def text(key: str, default: str, pattern: Optional[re.Pattern] = None, why: str = "") -> str:
        value, where = get(key, default)
        if where and pattern is not None and not pattern.match(value):
            raise bad(where, value, why)
        return value

    def number(key: str, default: int, lo: int, hi: int) -> int:
        value, where = get(key, default)
        if not where:
            return default
        try:
            n = int(value)
        except ValueError:
            raise bad(where, value, "expected a whole number") from None
        if not lo <= n <= hi:
            raise bad(where, value, f"expected a number from {lo} to {hi}")
        return n

    def flag(key: str, default: bool, yes: tuple[str, ...], no: tuple[str, ...]) -> bool:
        value, where = get(key, default)
        if not where:
            return default
        if value.lower() in yes:
            return True
        if value.lower() in no:
            return False
        raise bad(where, value, f"expected {' or '.join((yes[0], no[0]))}")

    def ports(key: str, default: str) -> str:
        value, where = get(key, default)
        if where:
            try:
                proxyinit_rules.parse_ports(value, where)
            except proxyinit_rules.RulesError:
                raise bad(where, value, "expected ports and ranges such as 25,3306,8000-8100") from None
        return value

    def quantity(key: str, default: str) -> str:
        value, where = get(key, default)
        if where and not _QUANTITY.match(value):
            raise bad(where, value, "not a Kubernetes quantity such as 100m, 64Mi or 1Gi")
        return value

    policy, where = get("default-inbound-policy", values.default_inbound_policy)
    if policy not in DEFAULT_POLICIES:
        raise bad(where, policy, f"expected one of {', '.join(DEFAULT_POLICIES)}")
    subnets, where = get("skip-subnets", values.skip_subnets)
    if where:
        try:
            proxyinit_rules.parse_subnets(subnets, where)
        except proxyinit_rules.RulesError:
            raise bad(where, subnets, "expected IPv4 CIDRs such as 10.0.0.0/8,192.168.0.0/16") from None
    grace, where = get("shutdown-grace-period", values.shutdown_grace_period)
    if where:
        try:
            parse_duration_ms(grace, where)
        except _Invalid:
            raise bad(where, grace, "expected a duration such as 30s or 2m") from None
    pull, where = get("image-pull-policy", values.proxy_pull_policy or values.image_pull_policy)
    if where and pull not in ("Always", "IfNotPresent", "Never"):
        raise bad(where, pull, "expected Always, IfNotPresent or Never")
    log_format = text("proxy-log-format", values.log_format)
    if log_format not in ("json", "plain", "console"):
        raise bad(CONFIG_PREFIX + "proxy-log-format", log_format, "expected json or plain")

    resources: dict = {}
    for res, req_default, lim_default in (("cpu", values.cpu_request, values.cpu_limit),
                                          ("memory", values.memory_request, values.memory_limit),
                                          ("ephemeral-storage", values.ephemeral_storage_request,
                                           values.ephemeral_storage_limit)):
        for kind, default in (("request", req_default), ("limit", lim_default)):
            q = quantity(f"proxy-{res}-{kind}", default)
            if q:
                resources.setdefault("limits" if kind == "limit" else "requests", {})[res] = q

    image = text("proxy-image", values.proxy_image, _IMAGE, "not an image name")
    version = text("proxy-version", values.proxy_version, _TAG, "not an image tag")
    return ProxyConfig(
        image=image,
        version=version,
        pull_policy=pull,
        init_image=text("init-image", values.proxy_init_image or image, _IMAGE, "not an image name"),
        init_version=text("init-image-version", values.proxy_init_version or version, _TAG, "not an image tag"),
        log_level=text("proxy-log-level", values.log_level, _LOG_LEVEL, "not a log level such as info or debug"),
        log_format=log_format,
        default_inbound_policy=policy,
        opaque_ports=ports("opaque-ports", values.opaque_ports),
        skip_inbound_ports=ports("skip-inbound-ports", values.ignore_inbound_ports),
        skip_outbound_ports=ports("skip-outbound-ports", values.ignore_outbound_ports),
        skip_subnets=subnets,
        inbound_port=number("inbound-port", values.inbound_port, 1, 65535),
        outbound_port=number("outbound-port", values.outbound_port, 1, 65535),
        admin_port=number("admin-port", values.admin_port, 1, 65535),
        control_port=number("control-port", values.control_port, 1, 65535),
        resources=resources,
        uid=number("proxy-uid", values.proxy_uid, 1, 2**31 - 1),
        gid=number("proxy-gid", values.proxy_gid, -1, 2**31 - 1),
        await_proxy=flag("proxy-await", values.await_proxy, ("enabled", "true"), ("disabled", "false")),
        native_sidecar=flag("proxy-enable-native-sidecar", values.native_sidecar, ("true", "enabled"),
                            ("false", "disabled")),
        shutdown_grace_period=grace,
        shutdown_endpoint=flag("proxy-admin-shutdown", values.enable_shutdown_endpoint, ("enabled", "true"),
                               ("disabled", "false")),
    )


# --- the containers and volumes ---------------------------------------------------------------------


def proxy_env(cfg: ProxyConfig, values: Values) -> list[dict]:
    """The proxy's environment, by proxy/config.py's contract (ARCHITECTURE.md)."""
    def field_ref(name: str, path: str) -> dict:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    env = [{"name": "TULLE_NATS_URL", "value": values.nats_url}]
    if values.nats_ca_pem:
        env.append({"name": "TULLE_NATS_CA", "value": f"{NATS_CA_DIR}/ca.crt"})
    env += [
        field_ref("TULLE_PROXY_NAMESPACE", "metadata.namespace"),
        field_ref("TULLE_PROXY_WORKLOAD", "metadata.name"),
        field_ref("TULLE_PROXY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        {"name": "TULLE_PROXY_TRUST_DOMAIN", "value": values.trust_domain},
        {"name": "TULLE_PROXY_CLUSTER_DOMAIN", "value": values.cluster_domain},
        {"name": "TULLE_PROXY_TOKEN_FILE", "value": TOKEN_FILE},
        {"name": "TULLE_PROXY_IDENTITY_TRUST_ANCHORS", "value": values.trust_anchors_pem},
        {"name": "TULLE_PROXY_DEFAULT_INBOUND_POLICY", "value": cfg.default_inbound_policy},
        {"name": "TULLE_PROXY_OPAQUE_PORTS", "value": cfg.opaque_ports},
        {"name": "TULLE_PROXY_CLUSTER_NETWORKS", "value": values.cluster_networks},
        {"name": "TULLE_PROXY_INBOUND_ADDR", "value": f"0.0.0.0:{cfg.inbound_port}"},
        {"name": "TULLE_PROXY_OUTBOUND_ADDR", "value": f"127.0.0.1:{cfg.outbound_port}"},
        {"name": "TULLE_PROXY_ADMIN_ADDR", "value": f"0.0.0.0:{cfg.admin_port}"},
        {"name": "TULLE_PROXY_LOG_LEVEL", "value": cfg.log_level},
        {"name": "TULLE_LOG_FORMAT", "value": "json" if cfg.log_format == "json" else "console"},
    ]
    if cfg.shutdown_grace_period:  # empty (the chart's default): the proxy's own, 120 s
        env.append({"name": "TULLE_PROXY_SHUTDOWN_GRACE_PERIOD", "value": cfg.shutdown_grace_period})
    env.append({"name": "TULLE_PROXY_SHUTDOWN_ENDPOINT", "value": "true" if cfg.shutdown_endpoint else "false"})
    return env


def _security_context(uid: int, gid: int, *, add: tuple[str, ...] = (), root: bool = False) -> dict:
    ctx: dict = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if add:
        ctx["capabilities"]["add"] = list(add)
    ctx["privileged"] = False
    ctx["readOnlyRootFilesystem"] = True
    ctx["runAsNonRoot"] = not root
    ctx["runAsUser"] = uid
    if gid >= 0:
        ctx["runAsGroup"] = gid
    ctx["seccompProfile"] = {"type": "RuntimeDefault"}
    return ctx


def proxy_container(cfg: ProxyConfig, values: Values, *, native: bool) -> dict:
    admin = cfg.admin_port
    c: dict = {
        "name": PROXY_CONTAINER,
        "image": f"{cfg.image}:{cfg.version}",
        "imagePullPolicy": cfg.pull_policy,
        "command": ["tulle", "proxy", "run"],
        "env": proxy_env(cfg, values),
        "ports": [{"containerPort": cfg.inbound_port, "name": "tulle-proxy"},
                  {"containerPort": admin, "name": "tulle-admin"}],
        "livenessProbe": {"httpGet": {"path": "/live", "port": admin},
                          "initialDelaySeconds": values.liveness_initial_delay_s,
                          "timeoutSeconds": values.liveness_timeout_s},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": admin},
                           "initialDelaySeconds": values.readiness_initial_delay_s,
                           "timeoutSeconds": values.readiness_timeout_s},
    }
    if native and cfg.await_proxy:
        # The kubelet starts the next init container (and then the app) only once this
        # probe passes: the proxy is ready before anything else runs.
        c["startupProbe"] = {"httpGet": {"path": "/ready", "port": admin},
                             "initialDelaySeconds": values.startup_initial_delay_s,
                             "periodSeconds": values.startup_period_s,
                             "failureThreshold": values.startup_failure_threshold}
    if cfg.resources:
        c["resources"] = copy.deepcopy(cfg.resources)
    c["securityContext"] = _security_context(cfg.uid, cfg.gid)
    c["terminationMessagePolicy"] = "FallbackToLogsOnError"
    if not native and cfg.await_proxy:
        # The kubelet starts the next container only once postStart returns.
        c["lifecycle"] = {"postStart": {"exec": {"command": [
            "tulle", "proxy", "await", "--timeout", "2m", "--admin-addr", f"127.0.0.1:{admin}"]}}}
    mounts = [{"mountPath": IDENTITY_DIR, "name": IDENTITY_VOLUME},
              {"mountPath": TOKEN_DIR, "name": TOKEN_VOLUME, "readOnly": True}]
    if values.nats_ca_pem:
        mounts.append({"mountPath": NATS_CA_DIR, "name": NATS_CA_VOLUME, "readOnly": True})
    c["volumeMounts"] = mounts
    if native:
        c["restartPolicy"] = "Always"
    return c


def proxy_init_args(cfg: ProxyConfig, values: Values) -> list[str]:
    fw = proxyinit_rules.MODES[values.iptables_mode]
    args = ["--firewall-bin-path", fw, "--firewall-save-bin-path", proxyinit_rules.FIREWALLS[fw][1],
            "--incoming-proxy-port", str(cfg.inbound_port), "--outgoing-proxy-port", str(cfg.outbound_port),
            "--proxy-uid", str(cfg.uid)]
    if cfg.gid >= 0:
        args += ["--proxy-gid", str(cfg.gid)]
    inbound = ",".join(p for p in (f"{cfg.control_port},{cfg.admin_port}", cfg.skip_inbound_ports) if p)
    args += ["--inbound-ports-to-ignore", inbound]
    if cfg.skip_outbound_ports:
        args += ["--outbound-ports-to-ignore", cfg.skip_outbound_ports]
    if cfg.skip_subnets:
        args += ["--subnets-to-ignore", cfg.skip_subnets]
    return args


def proxy_init_resources(cfg: ProxyConfig, values: Values) -> dict:
    """proxyInit.resources (Linkerd's); when none is set, the proxy's."""
    resources: dict = {}
    for res, attr in (("cpu", "cpu"), ("memory", "memory"), ("ephemeral-storage", "ephemeral_storage")):
        for kind, section in (("request", "requests"), ("limit", "limits")):
            q = getattr(values, f"proxy_init_{attr}_{kind}")
            if q:
                resources.setdefault(section, {})[res] = q
    return resources or copy.deepcopy(cfg.resources)


def proxy_init_container(cfg: ProxyConfig, values: Values) -> dict:
    root = values.proxy_init_run_as_root
    c = {
        "name": INIT_CONTAINER,
        "image": f"{cfg.init_image}:{cfg.init_version}",
        "imagePullPolicy": cfg.pull_policy,
        "command": ["tulle", "proxy-init"],
        "args": proxy_init_args(cfg, values),
    }
    resources = proxy_init_resources(cfg, values)
    if resources:
        c["resources"] = resources
    c["securityContext"] = _security_context(0 if root else 65534, 0 if root else 65534,
                                             add=("NET_ADMIN", "NET_RAW"), root=root)
    c["terminationMessagePolicy"] = "FallbackToLogsOnError"
    # iptables takes its lock in /run; the root filesystem is read-only.
    c["volumeMounts"] = [{"mountPath": "/run", "name": XTABLES_VOLUME}]
    return c


def network_validator_container(cfg: ProxyConfig, values: Values) -> dict:
    c = {
        "name": VALIDATOR_CONTAINER,
        "image": f"{cfg.image}:{cfg.version}",
        "imagePullPolicy": cfg.pull_policy,
        "command": ["tulle", "network-validator"],
        "args": ["--connect-addr", values.validator_connect_addr,
                 "--listen-addr", values.validator_listen_addr, "--timeout", values.validator_timeout],
    }
    if cfg.resources:
        c["resources"] = copy.deepcopy(cfg.resources)
    c["securityContext"] = _security_context(65534, 65534)
    c["terminationMessagePolicy"] = "FallbackToLogsOnError"
    return c


def token_volume(values: Values) -> dict:
    return {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
        "path": TOKEN_VOLUME, "expirationSeconds": TOKEN_EXPIRATION_S,
        "audience": f"identity.tulle.{values.trust_domain}"}}]}}


def nats_ca_volume() -> dict:
    # The CA reaches every namespace through the pod's own annotation (the downward
    # API): no ConfigMap has to be copied into each namespace.
    return {"name": NATS_CA_VOLUME, "downwardAPI": {"items": [{
        "path": "ca.crt", "fieldRef": {"fieldPath": f"metadata.annotations['{NATS_CA_ANNOTATION}']"}}]}}


# --- uninject ------------------------------------------------------------------------------------------


def uninject_ops(pod: Mapping[str, Any], prefix: str, default_opaque: str, *, keep_inject: bool = False) -> list[dict]:
    """`remove` ops undoing an injection: the proxy, proxy-init and validator containers,
    their volumes, tulle.dev/* annotations (but `tulle.dev/inject: disabled`) and labels,
    and an opaque-ports annotation equal to what injection would derive (injecting again
    derives it again). A map or list left empty by this goes too. `keep_inject` keeps
    the inject annotation whatever its value (a proxy being replaced, not removed)."""
    ops: list[dict] = []
    meta = pod.get("metadata") or {}
    spec = spec_of(pod)
    removed_meta_keys = 0
    for section in ("annotations", "labels"):
        items = meta.get(section) or {}
        gone = []
        for k, v in items.items():
            if section == "annotations" and k == INJECT and (v == "disabled" or keep_inject):
                continue
            if k.startswith(PREFIX):
                gone.append(k)
            elif (section == "annotations" and k == OPAQUE_PORTS
                  and v == default_opaque_annotation((p for p, _ in container_ports(pod)), default_opaque)):
                gone.append(k)
        if gone and len(gone) == len(items):
            ops.append({"op": "remove", "path": f"{prefix}/metadata/{section}"})
            removed_meta_keys += 1
        else:
            ops += [{"op": "remove", "path": f"{prefix}/metadata/{section}/{escape(k)}"} for k in gone]
    if removed_meta_keys and removed_meta_keys == len(meta) and prefix:
        ops = [op for op in ops if not op["path"].startswith(f"{prefix}/metadata/")]
        ops.append({"op": "remove", "path": f"{prefix}/metadata"})
    for section, names in (("initContainers", INJECTED_CONTAINERS), ("containers", INJECTED_CONTAINERS),
                           ("volumes", INJECTED_VOLUMES)):
        items = spec.get(section) or []
        idx = [i for i, item in enumerate(items) if isinstance(item, Mapping) and item.get("name") in names]
        if idx and len(idx) == len(items) and section != "containers":
            ops.append({"op": "remove", "path": f"{prefix}/spec/{section}"})
        else:
            ops += [{"op": "remove", "path": f"{prefix}/spec/{section}/{i}"} for i in reversed(idx)]
    return ops


def apply_ops(doc: Any, ops: list[dict]) -> Any:
    """Apply ops of the shapes this module makes (add/remove on maps and lists) to a deep
    copy. The webhook never needs it; the core uses it to see the pod after uninject."""
    doc = copy.deepcopy(doc)
    for op in ops:
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        parent = doc
        for t in tokens[:-1]:
            parent = parent[int(t)] if isinstance(parent, list) else parent[t]
        last = tokens[-1]
        if op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
        else:
            parent[last] = copy.deepcopy(op["value"])
    return doc


# --- the plan --------------------------------------------------------------------------------------


def shape_problem(pod: Mapping[str, Any]) -> str:
    """What makes a pod unreadable for injection ("" when nothing). Mutating webhooks run
    before the API server validates an object, so any shape can arrive here."""
    meta = pod.get("metadata")
    if meta is not None and not isinstance(meta, Mapping):
        return "metadata is not a mapping"
    for key in ("annotations", "labels"):
        if (meta or {}).get(key) is not None and not isinstance(meta[key], Mapping):
            return f"metadata.{key} is not a mapping"
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        return "spec is not a mapping"
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return "spec.containers is not a list of containers"
    for key in ("containers", "initContainers", "volumes"):
        items = spec.get(key)
        if items is not None and (not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items)):
            return f"spec.{key} is not a list of objects"
    return ""


@dataclass
class Decision:
    inject: bool
    reason: str = ""
    warnings: list[str] = field(default_factory=list)


def decide(target: Target, ns_annotations: Mapping[str, str], origin: str, values: Values) -> Decision:
    """Inject or skip, with the reason: hostNetwork, a namespace never meshed, the
    inject annotation (Linkerd's truth table). Bad config annotations are found later,
    when the proxy's settings are resolved."""
    pod = target.pod
    problem = shape_problem(pod)
    if problem:
        return Decision(False, f"the pod template cannot be read: {problem}")
    spec = spec_of(pod)
    warnings = []
    if any(proto == "UDP" for _, proto in container_ports(pod)):
        warnings.append("UDP port(s) configured on pod spec: UDP traffic is not proxied")
    if spec.get("hostNetwork") is True:
        return Decision(False, "hostNetwork is enabled", warnings)
    if target.namespace in NEVER_INJECTED_NAMESPACES:
        return Decision(False, f'pods in namespace "{target.namespace}" are never injected', warnings)
    if target.namespace and target.namespace == values.control_plane_namespace:
        return Decision(False, f'pods in the control plane\'s namespace "{target.namespace}" are not injected', warnings)
    ok, reason = inject_decision(annotations_of(pod).get(INJECT, ""), str(ns_annotations.get(INJECT, "") or ""), origin)
    return Decision(ok, reason, warnings)


def plan_pod(target: Target, ns_annotations: Mapping[str, str], values: Values, origin: str = WEBHOOK) -> Plan:
    """Decide, and when injecting, the patch (relative to the object `target.pod` sits in)."""
    ns_annotations = {str(k): "" if v is None else str(v) for k, v in (ns_annotations or {}).items()}
    decision = decide(target, ns_annotations, origin, values)
    warnings = decision.warnings
    if not decision.inject:
        return Plan(False, decision.reason, warnings=warnings)
    pod = target.pod
    spec = spec_of(pod)
    annotations = annotations_of(pod)

    # Undo an earlier injection first: its proxy is replaced where it stood.
    previous = existing_proxy_version(pod)
    ops: list[dict] = []
    if previous is not None:
        ops = uninject_ops(pod, target.prefix, values.opaque_ports, keep_inject=True)
        pod = apply_ops({"metadata": pod.get("metadata"), "spec": pod.get("spec")}, [
            {**op, "path": op["path"][len(target.prefix):]} for op in ops])
        if pod.get("metadata") is None:
            pod.pop("metadata")
        spec = spec_of(pod)
        annotations = annotations_of(pod)

    copied = copied_namespace_annotations(annotations, ns_annotations)
    merged = {**annotations, **copied}
    try:
        cfg = resolve_config(annotations, ns_annotations, values)
    except InvalidConfig as e:
        return Plan(False, str(e), warnings=warnings)
    if previous is not None and previous == cfg.version and origin == WEBHOOK:
        return Plan(False, f"pod has a proxy of version {previous} injected already", warnings=warnings)
    if not values.trust_anchors_pem:
        return Plan(False, "the install values have no trust anchors (identityTrustAnchorsPEM)", warnings=warnings)

    new_annotations = dict(copied)
    new_annotations[CREATED_BY] = f"tulle/{'proxy-injector' if origin == WEBHOOK else 'cli'} {__version__}"
    new_annotations[PROXY_VERSION] = cfg.version
    new_annotations[TRUST_ROOT_SHA256] = values.trust_root_sha256
    if OPAQUE_PORTS not in merged:
        opaque = default_opaque_annotation((p for p, _ in container_ports(pod)), values.opaque_ports)
        if opaque:
            new_annotations[OPAQUE_PORTS] = opaque
    if values.nats_ca_pem:
        new_annotations[NATS_CA_ANNOTATION] = values.nats_ca_pem
    labels = {CONTROL_PLANE_NS_LABEL: values.control_plane_namespace}
    if target.owner_kind in OWNER_KINDS and target.owner_name:
        labels[OWNER_LABEL.format(kind=target.owner_kind)] = target.owner_name
    if target.namespace:
        labels[WORKLOAD_NS_LABEL] = target.namespace

    p = target.prefix
    meta = pod.get("metadata")
    if meta is None:
        ops.append({"op": "add", "path": f"{p}/metadata", "value": {}})
        meta = {}
    if not meta.get("annotations"):
        ops.append({"op": "add", "path": f"{p}/metadata/annotations", "value": {}})
    ops += [{"op": "add", "path": f"{p}/metadata/annotations/{escape(k)}", "value": v}
            for k, v in new_annotations.items()]
    if not meta.get("labels"):
        ops.append({"op": "add", "path": f"{p}/metadata/labels", "value": {}})
    ops += [{"op": "add", "path": f"{p}/metadata/labels/{escape(k)}", "value": v} for k, v in labels.items()]
    if not spec.get("volumes"):
        ops.append({"op": "add", "path": f"{p}/spec/volumes", "value": []})
    if not spec.get("initContainers"):
        ops.append({"op": "add", "path": f"{p}/spec/initContainers", "value": []})
    # Native sidecar: proxy-init (or the validator) first, the proxy right after it, so
    # the app's own init containers already run with a ready proxy.
    # Without it, proxy-init runs after the app's own init containers (which then reach
    # the network directly), as Linkerd does.
    init_at = "0" if cfg.native_sidecar else "-"
    if not values.cni_enabled:
        ops.append({"op": "add", "path": f"{p}/spec/volumes/-", "value": {"emptyDir": {}, "name": XTABLES_VOLUME}})
        ops.append({"op": "add", "path": f"{p}/spec/initContainers/{init_at}",
                    "value": proxy_init_container(cfg, values)})
    else:
        ops.append({"op": "add", "path": f"{p}/spec/initContainers/{init_at}",
                    "value": network_validator_container(cfg, values)})
    ops.append({"op": "add", "path": f"{p}/spec/volumes/-",
                "value": {"emptyDir": {"medium": "Memory"}, "name": IDENTITY_VOLUME}})
    ops.append({"op": "add", "path": f"{p}/spec/volumes/-", "value": token_volume(values)})
    if values.nats_ca_pem:
        ops.append({"op": "add", "path": f"{p}/spec/volumes/-", "value": nats_ca_volume()})
    if cfg.native_sidecar:
        where = f"{p}/spec/initContainers/1"
    elif cfg.await_proxy:
        where = f"{p}/spec/containers/0"
    else:
        where = f"{p}/spec/containers/-"
    ops.append({"op": "add", "path": where, "value": proxy_container(cfg, values, native=cfg.native_sidecar)})
    return Plan(True, ops=ops, warnings=warnings, config=cfg,
                replaced_version=previous if previous is not None else "")


# --- Services -------------------------------------------------------------------------------------------


def service_ports(svc: Mapping[str, Any]) -> list[int]:
    """A Service's ports and numeric target ports."""
    out = []
    for p in (spec_of(svc).get("ports") or []):
        if isinstance(p, Mapping):
            for key in ("port", "targetPort"):
                if isinstance(p.get(key), int) and not isinstance(p.get(key), bool):
                    out.append(p[key])
    return out


def service_ops(svc: Mapping[str, Any], values: Values) -> list[dict]:
    """A Service exposing default opaque ports gets them as `config.tulle.dev/opaque-ports`
    (unless it says already); nothing else about a Service changes."""
    meta = svc.get("metadata") or {}
    if OPAQUE_PORTS in (meta.get("annotations") or {}):
        return []
    opaque = default_opaque_annotation(service_ports(svc), values.opaque_ports)
    if not opaque:
        return []
    ops = [] if meta.get("annotations") else [{"op": "add", "path": "/metadata/annotations", "value": {}}]
    return ops + [{"op": "add", "path": f"/metadata/annotations/{escape(OPAQUE_PORTS)}", "value": opaque}]
