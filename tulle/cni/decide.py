"""Is a pod meshed, and with which proxy-init settings (pure).

With the Kubernetes API, a pod is meshed when it carries the `tulle-proxy` container
(the webhook put it there before the pod was scheduled); its config.tulle.dev/*
annotations (the namespace's are copied onto it by the webhook) set the ports and
subnets to skip. Without the API, the plugin configuration says which namespaces are
meshed (`mesh_namespaces`, "*" for all); `exclude_namespaces` always wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from tulle.proxyinit import rules

PROXY_CONTAINER = "tulle-proxy"
CONFIG = "config.tulle.dev/"
DEFAULT_EXCLUDED = ("kube-system", "tulle")


class ConfigError(ValueError):
    """The plugin configuration or an annotation cannot be used (one line)."""


@dataclass(frozen=True)
class Decision:
    mesh: bool
    reason: str
    config: Optional[rules.Config] = None


def cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1" -> dict."""
    out = {}
    for part in (text or "").split(";"):
        key, sep, value = part.partition("=")
        if sep and key:
            out[key.strip()] = value.strip()
    return out


def _defaults(conf: Mapping[str, Any]) -> Mapping[str, Any]:
    proxy = conf.get("proxy") or {}
    if not isinstance(proxy, Mapping):
        raise ConfigError('"proxy" in the plugin configuration must be an object')
    return proxy


def proxy_init_config(conf: Mapping[str, Any], annotations: Mapping[str, str]) -> rules.Config:
    """proxy-init settings: the pod's annotations over the plugin configuration's `proxy`
    section over proxy-init's defaults."""
    proxy = _defaults(conf)

    def get(annotation: str, key: str, default: Any) -> tuple[str, str]:
        if CONFIG + annotation in annotations:
            return str(annotations[CONFIG + annotation]), f'annotation "{CONFIG}{annotation}"'
        return str(proxy.get(key, default)), f'plugin configuration "proxy.{key}"'

    def port(annotation: str, key: str, default: int) -> int:
        value, where = get(annotation, key, default)
        try:
            return rules.check_port(int(value), where)
        except (ValueError, rules.RulesError):
            raise ConfigError(f"{where}: {value!r} is not a port") from None

    def number(annotation: str, key: str, default: int) -> int:
        value, where = get(annotation, key, default)
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a number") from None

    try:
        admin, control = port("admin-port", "admin_port", rules.ADMIN_PORT), port("control-port", "control_port",
                                                                                 rules.CONTROL_PORT)
        skip_in, where_in = get("skip-inbound-ports", "inbound_ports_to_ignore", "")
        skip_out, where_out = get("skip-outbound-ports", "outbound_ports_to_ignore", "")
        subnets, where_sub = get("skip-subnets", "subnets_to_ignore", "")
        gid = number("proxy-gid", "gid", -1)
        return rules.Config(
            inbound_port=port("inbound-port", "inbound_port", rules.INBOUND_PORT),
            outbound_port=port("outbound-port", "outbound_port", rules.OUTBOUND_PORT),
            proxy_uid=number("proxy-uid", "uid", rules.PROXY_UID),
            proxy_gid=None if gid < 0 else gid,
            inbound_ports_to_ignore=rules.parse_ports(f"{control},{admin},{skip_in}", where_in),
            outbound_ports_to_ignore=rules.parse_ports(skip_out, where_out),
            subnets_to_ignore=rules.parse_subnets(subnets, where_sub),
        )
    except rules.RulesError as e:
        raise ConfigError(str(e)) from None


def has_proxy(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    return any(isinstance(c, Mapping) and c.get("name") == PROXY_CONTAINER
               for c in list(spec.get("initContainers") or []) + list(spec.get("containers") or []))


def decide(conf: Mapping[str, Any], args: Mapping[str, str], pod: Optional[Mapping[str, Any]]) -> Decision:
    """`pod` is the pod read from the API, or None when the plugin has no API."""
    namespace, name = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
    excluded = conf.get("exclude_namespaces", list(DEFAULT_EXCLUDED))
    if not isinstance(excluded, list):
        raise ConfigError('"exclude_namespaces" in the plugin configuration must be a list')
    if not namespace or not name:
        return Decision(False, "not a Kubernetes pod (CNI_ARGS has no K8S_POD_NAMESPACE and K8S_POD_NAME)")
    if namespace in excluded:
        return Decision(False, f"namespace {namespace} is excluded")
    if pod is not None:
        if (pod.get("spec") or {}).get("hostNetwork"):
            return Decision(False, "the pod uses the host's network")
        if not has_proxy(pod):
            return Decision(False, f"pod {namespace}/{name} has no {PROXY_CONTAINER} container")
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        return Decision(True, "the pod has a proxy", proxy_init_config(conf, annotations))
    meshed = conf.get("mesh_namespaces", [])
    if not isinstance(meshed, list):
        raise ConfigError('"mesh_namespaces" in the plugin configuration must be a list')
    if "*" in meshed or namespace in meshed:
        return Decision(True, f"namespace {namespace} is meshed by the plugin configuration",
                        proxy_init_config(conf, {}))
    return Decision(False, f"no Kubernetes API configured and namespace {namespace} is not in mesh_namespaces")
