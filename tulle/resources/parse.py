"""Kubernetes-style YAML/JSON into the resource model, with errors a user can act on.

Every error names the file, the document (its index and, when known, kind and name)
and the field path, e.g.:

    demo/web.yaml: document 2 (Service demo/web): spec.ports[0].port: expected an integer from 1 to 65535, got 'http'

Unknown fields are ignored (Kubernetes objects carry many we do not read); fields we
read are checked strictly.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import yaml

from tulle.durations import parse_ms
from tulle.errors import UserError
from tulle.resources import model as m

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
PROXY_PROTOCOLS = ("unknown", "HTTP/1", "HTTP/2", "gRPC", "opaque", "TLS")


# libyaml's loader when PyYAML was built with it: ten times faster on large folders.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ManifestError(UserError):
    def __init__(self, file: str, doc: Optional[int], what: str, path: str, message: str):
        self.file, self.doc, self.what, self.path, self.message = file, doc, what, path, message
        where = file or "<input>"
        if doc is not None:
            where += f": document {doc}" + (f" ({what})" if what else "")
        super().__init__(f"{where}: {path + ': ' if path else ''}{message}")


class _Invalid(Exception):
    """A field error inside one object; turned into a ManifestError with file context."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def parse_duration_ms(value: Any, path: str) -> int:
    """A Go duration string ('300ms', '1m30s', '10s') in whole milliseconds (tulle.durations)."""
    try:
        return parse_ms(value)
    except ValueError as e:
        raise _Invalid(path, str(e)) from None


# --- a small typed reader over one object ---------------------------------------------


class _Obj:
    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise _Invalid(path or "(document)", f"expected a mapping, got {_type(data)}")
        self.data, self.path = data, path

    def _p(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def obj(self, key: str, required: bool = False) -> Optional["_Obj"]:
        v = self.data.get(key)
        if v is None:
            if required:
                raise _Invalid(self._p(key), "required")
            return None
        return _Obj(v, self._p(key))

    def str(self, key: str, default: Optional[str] = None, required: bool = False,
            pattern: Optional[re.Pattern] = None, what: str = "") -> Optional[str]:
        v = self.data.get(key)
        if v is None:
            if required:
                raise _Invalid(self._p(key), "required")
            return default
        if not isinstance(v, str):
            raise _Invalid(self._p(key), f"expected a string, got {_type(v)} {v!r}")
        if pattern is not None and not pattern.match(v):
            raise _Invalid(self._p(key), f"{v!r} is not a valid {what or 'value'}")
        return v

    def int(self, key: str, default: Optional[int] = None, required: bool = False,
            lo: Optional[int] = None, hi: Optional[int] = None) -> Optional[int]:
        v = self.data.get(key)
        if v is None:
            if required:
                raise _Invalid(self._p(key), "required")
            return default
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f" from {lo} to {hi}" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
            raise _Invalid(self._p(key), f"expected an integer{rng}, got {v!r}")
        return v

    def number(self, key: str, default: float, lo: float | None = None) -> float:
        v = self.data.get(key)
        if v is None:
            return default
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise _Invalid(self._p(key), f"expected a number, got {v!r}") from None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (lo is not None and v < lo):
            raise _Invalid(self._p(key), f"expected a number{f' >= {lo}' if lo is not None else ''}, got {v!r}")
        return float(v)

    def bool(self, key: str, default: bool = False) -> bool:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise _Invalid(self._p(key), f"expected true or false, got {v!r}")
        return v

    def list(self, key: str, required: bool = False) -> list[tuple[Any, str]]:
        v = self.data.get(key)
        if v is None:
            if required:
                raise _Invalid(self._p(key), "required")
            return []
        if not isinstance(v, list):
            raise _Invalid(self._p(key), f"expected a list, got {_type(v)}")
        return [(item, f"{self._p(key)}[{i}]") for i, item in enumerate(v)]

    def str_map(self, key: str) -> Optional[dict[str, str]]:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, dict):
            raise _Invalid(self._p(key), f"expected a mapping, got {_type(v)}")
        out = {}
        for k, val in v.items():
            if not isinstance(k, str):
                raise _Invalid(self._p(key), f"key {k!r} must be a string")
            if isinstance(val, bool) or not isinstance(val, (str, int, float)):
                raise _Invalid(f"{self._p(key)}.{k}", f"expected a string, got {_type(val)}")
            if not isinstance(val, str):
                raise _Invalid(f"{self._p(key)}.{k}", f"expected a string, got {_type(val)} {val!r} (quote it)")
            out[k] = val
        return out


def _type(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(v), type(v).__name__)


def _int_or_name(v: Any, path: str) -> int | str:
    if isinstance(v, int) and not isinstance(v, bool):
        if not 1 <= v <= 65535:
            raise _Invalid(path, f"expected a port from 1 to 65535, got {v}")
        return v
    if isinstance(v, str):
        if v.isdigit():
            return _int_or_name(int(v), path)
        if PORT_NAME.match(v) and len(v) <= 15:
            return v
    raise _Invalid(path, f"expected a port number or a port name, got {v!r}")


# --- per-kind parsers --------------------------------------------------------------------


def _meta(o: _Obj, namespaced: bool, default_namespace: str) -> m.Meta:
    meta = o.obj("metadata", required=True)
    name = meta.str("name", required=True, pattern=DNS_SUBDOMAIN, what="name (lowercase letters, digits, '-' and '.')")
    ns = ""
    if namespaced:
        ns = meta.str("namespace", default=default_namespace, pattern=DNS_LABEL, what="namespace")
    return m.Meta(name=name, namespace=ns, labels=meta.str_map("labels") or {},
                  annotations=meta.str_map("annotations") or {},
                  resource_version=str(meta.data.get("resourceVersion") or ""), uid=str(meta.data.get("uid") or ""))


def _selector(o: Optional[_Obj]) -> m.LabelSelector:
    if o is None:
        return m.LabelSelector()
    exprs = []
    for item, path in o.list("matchExpressions"):
        e = _Obj(item, path)
        op = e.str("operator", required=True)
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise _Invalid(f"{path}.operator", f"expected In, NotIn, Exists or DoesNotExist, got {op!r}")
        values = tuple(v for v, p in e.list("values") if _is_str(v, p))
        if op in ("In", "NotIn") and not values:
            raise _Invalid(f"{path}.values", f"required for operator {op}")
        exprs.append(m.LabelSelectorRequirement(e.str("key", required=True), op, values))
    return m.LabelSelector(o.str_map("matchLabels") or {}, tuple(exprs))


def _is_str(v: Any, path: str) -> bool:
    if not isinstance(v, str):
        raise _Invalid(path, f"expected a string, got {_type(v)} {v!r}")
    return True


def _namespace(o: _Obj, ns: str) -> m.Namespace:
    return m.Namespace(_meta(o, False, ns))


def _service(o: _Obj, ns: str) -> m.Service:
    meta = _meta(o, True, ns)
    spec = o.obj("spec", required=True)
    ports = []
    for item, path in spec.list("ports"):
        p = _Obj(item, path)
        port = p.int("port", required=True, lo=1, hi=65535)
        target = _int_or_name(p.data["targetPort"], f"{path}.targetPort") if p.has("targetPort") else port
        protocol = p.str("protocol", default="TCP")
        if protocol not in ("TCP", "UDP", "SCTP"):
            raise _Invalid(f"{path}.protocol", f"expected TCP, UDP or SCTP, got {protocol!r}")
        ports.append(m.ServicePort(port, target, p.str("name", default=""), protocol, p.str("appProtocol", default="")))
    cluster_ip = spec.str("clusterIP", default="")
    svc_type = spec.str("type", default="ClusterIP")
    # As the API server: only headless and ExternalName Services may have no ports.
    if not ports and cluster_ip != "None" and svc_type != "ExternalName":
        raise _Invalid("spec.ports", "a Service needs at least one port")
    if cluster_ip and cluster_ip != "None":
        _ip(cluster_ip, "spec.clusterIP")
    return m.Service(meta, tuple(ports), spec.str_map("selector"), cluster_ip, svc_type)


def _ip(v: str, path: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise _Invalid(path, f"{v!r} is not an IP address") from None


def _container_ports(o: _Obj, key: str = "ports") -> tuple[m.ContainerPort, ...]:
    out = []
    for item, path in o.list(key):
        p = _Obj(item, path)
        name = p.str("name", default="", pattern=PORT_NAME, what="port name")
        out.append(m.ContainerPort(p.int("containerPort", required=True, lo=1, hi=65535), name,
                                   p.str("protocol", default="TCP")))
    return tuple(out)


def _probes(o: _Obj) -> tuple[m.HTTPProbe, ...]:
    out = []
    for key in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = o.obj(key)
        if probe is None:
            continue
        get = probe.obj("httpGet")
        if get is None:
            continue
        path = get.str("path", default="/")
        if not path.startswith("/"):
            raise _Invalid(f"{get.path}.path", f"must start with '/', got {path!r}")
        if not get.has("port"):
            raise _Invalid(f"{get.path}.port", "required")
        out.append(m.HTTPProbe(path, _int_or_name(get.data["port"], f"{get.path}.port")))
    return tuple(out)


def _pod(o: _Obj, ns: str) -> m.Pod:
    meta = _meta(o, True, ns)
    spec = o.obj("spec") or _Obj({}, "spec")
    status = o.obj("status") or _Obj({}, "status")
    containers = []
    for item, path in spec.list("containers") + spec.list("initContainers"):
        c = _Obj(item, path)
        containers.append(m.Container(c.str("name", required=True), _container_ports(c), _probes(c)))
    ready = False
    for item, path in status.list("conditions"):
        cond = _Obj(item, path)
        if cond.str("type") == "Ready":
            ready = cond.str("status") == "True"
    ip = status.str("podIP", default="")
    if ip:
        _ip(ip, "status.podIP")
    return m.Pod(meta, spec.str("serviceAccountName", default=None) or spec.str("serviceAccount", default="default"),
                 tuple(containers), ip, ready, spec.str("nodeName", default=""), spec.bool("hostNetwork"),
                 status.str("phase", default=""))


def _endpoint_slice(o: _Obj, ns: str) -> m.EndpointSlice:
    meta = _meta(o, True, ns)
    service = meta.labels.get("kubernetes.io/service-name", "")
    endpoints = []
    for item, path in o.list("endpoints"):
        e = _Obj(item, path)
        conditions = e.obj("conditions") or _Obj({}, f"{path}.conditions")
        ready = conditions.data.get("ready")
        target = e.obj("targetRef")
        target_pod = target.str("name", default="") if target is not None and target.str("kind") == "Pod" else ""
        addresses = tuple(a for a, p in e.list("addresses", required=True) if _is_str(a, p))
        endpoints.append(m.SliceEndpoint(addresses, ready is not False, target_pod, e.str("zone", default=""),
                                         e.str("nodeName", default="")))
    ports = []
    for item, path in o.list("ports"):
        p = _Obj(item, path)
        ports.append(m.SlicePort(p.int("port", required=True, lo=1, hi=65535), p.str("name", default=""),
                                 p.str("protocol", default="TCP"), p.str("appProtocol", default="")))
    return m.EndpointSlice(meta, service, o.str("addressType", default="IPv4"), tuple(endpoints), tuple(ports))


def _workload(o: _Obj, ns: str) -> m.Workload:
    meta = _meta(o, True, ns)
    spec = o.obj("spec", required=True)
    command = spec.data.get("command")
    if isinstance(command, str):
        command = command.split()
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise _Invalid("spec.command", f"expected a non-empty list of strings, got {command!r}")
    env: list[tuple[str, str]] = []
    raw_env = spec.data.get("env")
    if isinstance(raw_env, dict):
        env = sorted((spec.str_map("env") or {}).items())
    else:
        for item, path in spec.list("env"):
            e = _Obj(item, path)
            env.append((e.str("name", required=True), e.str("value", default="")))
    sa = spec.str("serviceAccountName", default="default", pattern=DNS_SUBDOMAIN, what="service account name")
    return m.Workload(meta, tuple(command), sa, _container_ports(spec), tuple(env), _probes(spec))


def _request_match(o: _Obj) -> m.RequestMatch:
    keys = [k for k in ("method", "pathRegex", "all", "any", "not") if o.has(k)]
    if not keys:
        raise _Invalid(o.path, "a condition needs one of method, pathRegex, all, any, not")
    method = o.str("method")
    if method is not None:
        method = method.upper()
        if method not in HTTP_METHODS:
            raise _Invalid(f"{o.path}.method", f"unknown HTTP method {o.data['method']!r}")
    path_regex = o.str("pathRegex")
    if path_regex is not None:
        try:
            re.compile(path_regex)
        except re.error as e:
            raise _Invalid(f"{o.path}.pathRegex", f"invalid regular expression {path_regex!r}: {e}") from None
    all_ = tuple(_request_match(_Obj(v, p)) for v, p in o.list("all")) if o.has("all") else None
    any_ = tuple(_request_match(_Obj(v, p)) for v, p in o.list("any")) if o.has("any") else None
    if all_ == () or any_ == ():
        raise _Invalid(f"{o.path}.{'all' if all_ == () else 'any'}", "must not be empty")
    not_ = _request_match(o.obj("not")) if o.has("not") else None
    return m.RequestMatch(method, path_regex, all_, any_, not_)


def _response_match(o: _Obj) -> m.ResponseMatch:
    if not any(o.has(k) for k in ("status", "all", "any", "not")):
        raise _Invalid(o.path, "a response condition needs one of status, all, any, not")
    status = None
    if o.has("status"):
        s = o.obj("status")
        lo, hi = s.int("min", lo=100, hi=599), s.int("max", lo=100, hi=599)
        if lo is None and hi is None:
            raise _Invalid(s.path, "needs min, max or both")
        lo, hi = lo if lo is not None else hi, hi if hi is not None else lo
        if lo > hi:
            raise _Invalid(s.path, f"min ({lo}) is greater than max ({hi})")
        status = m.StatusRange(lo, hi)
    all_ = tuple(_response_match(_Obj(v, p)) for v, p in o.list("all")) if o.has("all") else None
    any_ = tuple(_response_match(_Obj(v, p)) for v, p in o.list("any")) if o.has("any") else None
    if all_ == () or any_ == ():
        raise _Invalid(f"{o.path}.{'all' if all_ == () else 'any'}", "must not be empty")
    not_ = _response_match(o.obj("not")) if o.has("not") else None
    return m.ResponseMatch(status, all_, any_, not_)


# Conditions in a canonical form, to find routes that can never match: nested `all`
# flattened, `all`/`any` members unordered, several fields of one condition = `all`.
_CATCH_ALL_REGEXES = frozenset({".*", "^.*", ".*$", "^.*$", "/.*", "^/.*", "/.*$", "^/.*$"})


def _canonical(rm: m.RequestMatch) -> tuple:
    parts: set[tuple] = set()
    if rm.method is not None:
        parts.add(("method", rm.method))
    if rm.path_regex is not None:
        parts.add(("path", rm.path_regex))
    for sub in rm.all or ():
        c = _canonical(sub)
        parts.update(c[1] if c[0] == "all" else (c,))
    if rm.any is not None:
        members = frozenset(_canonical(sub) for sub in rm.any)
        parts.add(next(iter(members)) if len(members) == 1 else ("any", members))
    if rm.not_ is not None:
        parts.add(("not", _canonical(rm.not_)))
    return next(iter(parts)) if len(parts) == 1 else ("all", frozenset(parts))


def _matches_everything(c: tuple) -> bool:
    if c[0] == "path":
        return c[1] in _CATCH_ALL_REGEXES
    if c[0] == "all":
        return all(_matches_everything(x) for x in c[1])
    if c[0] == "any":
        return any(_matches_everything(x) for x in c[1])
    return False


def _never_matches(c: tuple) -> Optional[str]:
    """Why a condition can match no request at all, if it obviously cannot."""
    if c[0] == "all":
        methods = sorted(x[1] for x in c[1] if x[0] == "method")
        if len(methods) > 1:
            return f"it requires the method to be {' and '.join(methods)} at once"
        for x in c[1]:
            if ("not", x) in c[1]:
                return "it requires a condition and its negation at once"
    if c[0] == "not" and _matches_everything(c[1]):
        return "it negates a condition that matches every request"
    return None


def _service_profile(o: _Obj, ns: str) -> m.ServiceProfile:
    meta = _meta(o, True, ns)
    parts = meta.name.split(".")
    if len(parts) < 4 or parts[2] != "svc":
        raise _Invalid("metadata.name", f"must be <service>.<namespace>.svc.<cluster-domain>, got {meta.name!r}")
    if parts[1] != meta.namespace:
        raise _Invalid("metadata.namespace",
                       f"a ServiceProfile lives in its service's namespace {parts[1]!r}, not {meta.namespace!r}")
    spec = o.obj("spec", required=True)
    routes, names = [], set()
    earlier: dict[tuple, tuple[str, str]] = {}  # canonical condition -> (path, name) of the first route with it
    catch_all: Optional[tuple[str, str]] = None  # the first route that matches every request
    for item, path in spec.list("routes"):
        r = _Obj(item, path)
        name = r.str("name", required=True)
        if not name.strip():
            raise _Invalid(f"{path}.name", "must not be empty")
        if name in names:
            raise _Invalid(f"{path}.name", f"duplicate route name {name!r}")
        names.add(name)
        classes, seen_classes = [], {}
        for c, p in r.list("responseClasses"):
            cls = m.ResponseClass(_response_match(_Obj(c, p).obj("condition", required=True)), _Obj(c, p).bool("isFailure"))
            if cls.condition in seen_classes:
                raise _Invalid(f"{p}.condition", f"never applies: {seen_classes[cls.condition]} has the same condition "
                                                 "and is checked first")
            seen_classes[cls.condition] = p
            classes.append(cls)
        timeout = parse_duration_ms(r.data["timeout"], f"{path}.timeout") if r.has("timeout") else 0
        if r.has("timeout") and timeout <= 0:
            raise _Invalid(f"{path}.timeout", "must be positive (leave it out for no timeout)")
        condition = _request_match(r.obj("condition", required=True))
        canonical = _canonical(condition)
        why = _never_matches(canonical)
        if why:
            raise _Invalid(f"{path}.condition", f"route {name!r} can never match: {why}")
        if catch_all is not None:
            raise _Invalid(f"{path}.condition", f"route {name!r} can never match: route {catch_all[1]!r} "
                                                f"({catch_all[0]}) matches every request and comes first")
        if canonical in earlier:
            raise _Invalid(f"{path}.condition", f"route {name!r} can never match: route {earlier[canonical][1]!r} "
                                                f"({earlier[canonical][0]}) has the same condition and comes first")
        earlier[canonical] = (path, name)
        if _matches_everything(canonical):
            catch_all = (path, name)
        routes.append(m.RouteSpec(name, condition, tuple(classes), r.bool("isRetryable"), timeout))
    budget = None
    b = spec.obj("retryBudget")
    if b is not None:
        ttl = parse_duration_ms(b.data["ttl"], f"{b.path}.ttl") if b.has("ttl") else 10000
        # The proxy's budget slides over ttl in tenths; Linkerd's proxy refuses a ttl outside 1s..60s.
        if not 1000 <= ttl <= 60000:
            raise _Invalid(f"{b.path}.ttl", f"must be from 1s to 60s, got {b.data['ttl']!r}")
        ratio = b.number("retryRatio", 0.2, lo=0.0)
        if ratio > 1000:
            raise _Invalid(f"{b.path}.retryRatio", f"must be at most 1000, got {ratio!r}")
        budget = m.RetryBudgetSpec(ratio, b.int("minRetriesPerSecond", 10, lo=0), ttl)
    opaque = []
    raw_opaque = spec.data.get("opaquePorts")
    if isinstance(raw_opaque, dict):
        raw_opaque = list(raw_opaque)
    for v in raw_opaque or []:
        opaque.append(_int_or_name(v, "spec.opaquePorts"))
    return m.ServiceProfile(meta, tuple(routes), budget, tuple(p for p in opaque if isinstance(p, int)))


def _server(o: _Obj, ns: str) -> m.Server:
    meta = _meta(o, True, ns)
    spec = o.obj("spec", required=True)
    if not spec.has("podSelector"):
        raise _Invalid("spec.podSelector", "required")
    if not spec.has("port"):
        raise _Invalid("spec.port", "required")
    proto = spec.str("proxyProtocol", default="unknown")
    if proto not in PROXY_PROTOCOLS:
        raise _Invalid("spec.proxyProtocol", f"expected one of {', '.join(PROXY_PROTOCOLS)}, got {proto!r}")
    return m.Server(meta, _selector(spec.obj("podSelector")), _int_or_name(spec.data["port"], "spec.port"), proto)


def _cidr(v: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not isinstance(v, str):
        raise _Invalid(path, f"expected a CIDR such as 10.0.0.0/8, got {v!r}")
    try:
        return ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise _Invalid(path, f"{v!r} is not a valid CIDR") from None


def _server_authorization(o: _Obj, ns: str) -> m.ServerAuthorization:
    meta = _meta(o, True, ns)
    spec = o.obj("spec", required=True)
    server = spec.obj("server", required=True)
    name, selector = server.str("name", default=""), server.obj("selector")
    if bool(name) == (selector is not None):
        raise _Invalid("spec.server", "set exactly one of name or selector")
    client = spec.obj("client", required=True)
    mesh, unauth = client.obj("meshTLS"), client.bool("unauthenticated")
    if (mesh is not None) == unauth:
        raise _Invalid("spec.client", "set exactly one of meshTLS or unauthenticated: true")
    mesh_tls = None
    if mesh is not None:
        set_fields = [k for k in ("unauthenticatedTLS", "identities", "serviceAccounts") if mesh.has(k)]
        if len(set_fields) != 1:
            raise _Invalid("spec.client.meshTLS", "set exactly one of unauthenticatedTLS, identities or serviceAccounts")
        identities = tuple(v for v, p in mesh.list("identities") if _identity(v, p))
        sas = []
        for item, path in mesh.list("serviceAccounts"):
            sa = _Obj(item, path)
            sas.append(m.ServiceAccountRef(sa.str("name", required=True, pattern=DNS_SUBDOMAIN, what="service account name"),
                                           sa.str("namespace", default="", pattern=re.compile(r"^$|" + DNS_LABEL.pattern),
                                                  what="namespace")))
        if mesh.has("identities") and not identities or mesh.has("serviceAccounts") and not sas:
            raise _Invalid(f"spec.client.meshTLS.{set_fields[0]}", "must not be empty")
        mesh_tls = m.MeshTLS(mesh.bool("unauthenticatedTLS"), identities, tuple(sas))
    networks = []
    for item, path in client.list("networks"):
        n = _Obj(item, path)
        net = _cidr(n.data.get("cidr"), f"{path}.cidr")
        excepts = []
        for e, p in n.list("except"):
            sub = _cidr(e, p)
            if sub.version != net.version or not sub.subnet_of(net):
                raise _Invalid(p, f"{e!r} is not inside {n.data['cidr']!r}")
            excepts.append(str(sub))
        networks.append(m.NetworkSpec(str(net), tuple(excepts)))
    return m.ServerAuthorization(meta, name, _selector(selector) if selector is not None else None,
                                 mesh_tls, unauth, tuple(networks))


def _identity(v: Any, path: str) -> bool:
    if not isinstance(v, str) or not v:
        raise _Invalid(path, f"expected an identity string, got {v!r}")
    if v != "*" and "*" in v and not (v.startswith("*.") and "*" not in v[2:]):
        raise _Invalid(path, f"{v!r}: a wildcard is '*' or a '*.' prefix only")
    return True


_PARSERS: dict[tuple[str, str], Callable[[_Obj, str], m.Resource]] = {
    ("v1", "Namespace"): _namespace,
    ("v1", "Service"): _service,
    ("v1", "Pod"): _pod,
    ("discovery.k8s.io/v1", "EndpointSlice"): _endpoint_slice,
    ("tulle.dev/v1alpha1", "Workload"): _workload,
    ("tulle.dev/v1alpha1", "ServiceProfile"): _service_profile,
    ("tulle.dev/v1alpha2", "ServiceProfile"): _service_profile,
    ("policy.tulle.dev/v1alpha1", "Server"): _server,
    ("policy.tulle.dev/v1beta1", "Server"): _server,
    ("policy.tulle.dev/v1alpha1", "ServerAuthorization"): _server_authorization,
    ("policy.tulle.dev/v1beta1", "ServerAuthorization"): _server_authorization,
}


# No Kubernetes object we read nests deeper than this or holds more values; YAML aliases can
# make a document recursive (`&a [*a]`) or exponentially large, which the parsers below
# would otherwise follow until Python's recursion limit (or forever).
MAX_DEPTH = 64
MAX_VALUES = 100_000


def _check_shape(data: Any) -> None:
    """Refuse a document deeper than MAX_DEPTH or with more than MAX_VALUES values (each
    alias counted each time it is used), without recursion."""
    stack = [(data, 0)]
    seen = 0
    while stack:
        v, depth = stack.pop()
        seen += 1
        if depth > MAX_DEPTH or seen > MAX_VALUES:
            why = f"nested deeper than {MAX_DEPTH} levels" if depth > MAX_DEPTH else f"more than {MAX_VALUES} values"
            raise _Invalid("(document)", f"{why} (a recursive or repeated YAML alias?)")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def parse_object(data: Any, *, file: str = "", doc: Optional[int] = None, default_namespace: str = "default",
                 kinds: Optional[Iterable[str]] = None) -> m.Resource:
    """One object (a dict from YAML/JSON) into the model, or a ManifestError."""
    what = ""
    try:
        _check_shape(data)
        o = _Obj(data, "")
        kind = o.str("kind", required=True)
        api = o.str("apiVersion", required=True)
        meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
        name, ns = meta.get("name"), meta.get("namespace") or (default_namespace if kind != "Namespace" else "")
        ns = ns if isinstance(ns, str) else ""  # a wrong type is reported by the kind's parser
        what = f"{kind} {ns + '/' if ns else ''}{name}" if isinstance(name, str) else kind
        parser = _PARSERS.get((api, kind))
        if parser is None or (kinds is not None and kind not in kinds):
            supported = sorted({f"{a} {k}" for a, k in _PARSERS if kinds is None or k in kinds})
            if kind in m.KINDS and (kinds is None or kind in kinds):
                raise _Invalid("apiVersion", f"{kind} is served as {m.KINDS[kind]}, not {api!r}")
            raise _Invalid("kind", f"{api} {kind} is not supported here (supported: {', '.join(supported)})")
        return parser(o, default_namespace)
    except _Invalid as e:
        raise ManifestError(file, doc, what, e.path, e.message) from None


def load_documents(text: str, file: str = "") -> list[tuple[int, Any]]:
    """(1-based document index, data) for each non-empty YAML document; `List` kinds unrolled."""
    try:
        docs = list(yaml.load_all(text, Loader=_YAML_LOADER))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ManifestError(file, None, "", "", f"{where}invalid YAML: {problem}") from None
    out = []
    for i, d in enumerate(docs, 1):
        if d is None:
            continue
        if isinstance(d, dict) and d.get("kind") == "List" or (isinstance(d, dict) and str(d.get("kind", "")).endswith("List") and "items" in d):
            items = d.get("items")
            if not isinstance(items, list):
                raise ManifestError(file, i, "List", "items", "expected a list")
            out.extend((i, item) for item in items)
        else:
            out.append((i, d))
    return out


def load_file(path: str | Path, *, default_namespace: str = "default",
              kinds: Optional[Iterable[str]] = None, display: str | None = None) -> list[m.Resource]:
    return [obj for _, obj in _load_file_documents(path, default_namespace=default_namespace, kinds=kinds,
                                                   display=display)]


def _load_file_documents(path: str | Path, *, default_namespace: str = "default",
                         kinds: Optional[Iterable[str]] = None,
                         display: str | None = None) -> list[tuple[int, m.Resource]]:
    """(document index, object) for each object in a file."""
    path = Path(path)
    shown = display or str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ManifestError(shown, None, "", "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ManifestError(shown, None, "", "", "not a text file") from None
    objects = []
    for index, data in load_documents(text, shown):
        obj = parse_object(data, file=shown, doc=index, default_namespace=default_namespace, kinds=kinds)
        if isinstance(obj, m.Workload):
            obj = _with_base_dir(obj, str(path.parent.resolve()))
        objects.append((index, obj))
    return objects


def _with_base_dir(w: m.Workload, base: str) -> m.Workload:
    from dataclasses import replace

    return replace(w, base_dir=base)


MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def manifest_files(directory: str | Path) -> list[Path]:
    """Manifest files under a folder, recursively, skipping hidden folders; sorted."""
    directory = Path(directory)
    return sorted(p for p in directory.rglob("*")
                  if p.suffix in MANIFEST_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def load_dir(directory: str | Path, *, kinds: Optional[Iterable[str]] = None,
             seen: Optional[dict[tuple[str, str, str], str]] = None) -> list[m.Resource]:
    """Every object in a folder of manifests; the first bad one raises ManifestError.

    Two objects of the same kind, namespace and name are an error too (across several
    folders when they share one `seen` dict: key -> file that defined it).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(str(directory), None, "", "", "not a folder")
    seen = {} if seen is None else seen
    objects = []
    for f in manifest_files(directory):
        shown = str(f.relative_to(directory.parent)) if directory.parent != f else str(f)
        for index, obj in _load_file_documents(f, kinds=kinds, display=shown):
            key = m.key_of(obj)
            if key in seen:
                raise ManifestError(shown, index, f"{key[0]} {key[1] + '/' if key[1] else ''}{key[2]}",
                                    "metadata.name", f"already defined in {seen[key]}")
            seen[key] = shown
            objects.append(obj)
    return objects
