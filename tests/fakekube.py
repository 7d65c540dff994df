"""A fake Kubernetes API server that speaks the real list/watch wire protocol.

The only fake the test suite allows: the production code path (the official `kubernetes`
client, with its urllib3 transport) talks HTTP/1.1 to this server exactly as it would to
a real API server, so list, get, watch (chunked newline-delimited JSON), bookmarks,
`410 Gone` after compaction and dropped connections are all exercised for real.

    kube = FakeKube().start()
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "demo"}, ...})
    api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(kube.configuration()))
    ...
    kube.stop()

Behaviour copied from the API server:
- one global, monotonically increasing resourceVersion; every write bumps it;
- list items of built-in kinds carry no kind/apiVersion (custom resources do);
- a watch from a resourceVersion older than the retained history gets one `ERROR` event
  with a `Status` of code 410, reason `Expired`, and the stream ends;
- a watch without a resourceVersion (or "0") starts with synthetic ADDED events;
- `timeoutSeconds` ends the stream cleanly; bookmarks are sent when asked for;
- Services get a cluster IP when they have none; Secrets' `stringData` is folded into `data`.

- `GET /version` answers `server_version`; SelfSubjectAccessReview allows everything but
  what `deny_access` names;
- `pods/<name>/log` serves what `append_log` wrote, with `container` (required when the pod
  has several), `tailLines`, `sinceSeconds`, `timestamps`, and `follow=true` streaming new
  lines (chunked) until the pod is deleted or `end_logs` is called.
- `pods/<name>/portforward?ports=N` upgrades to a WebSocket as the API server does (the
  `kubernetes.stream.portforward` client: subprotocol `v4.channel.k8s.io`; per port a data
  channel 2i and an error channel 2i+1, each first sending the port in two little-endian
  bytes; every message starts with its channel byte) and carries the stream to where
  `forward_pod_port` says the pod's port really is — a real server the test started. A
  port with nothing behind it gets the kubelet's error on the error channel; the pod must
  be Running.

Test controls (thread-safe): apply, delete, get, compact, drop_watches, watches_down,
token_reviews / add_token, deny_access, forbid, append_log / end_logs, forward_pod_port,
port_forwards, write_kubeconfig, request_log.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import itertools
import json
import re
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class KindInfo:
    api_version: str  # "v1" or "<group>/<version>"
    kind: str
    plural: str
    namespaced: bool = True
    # Custom resources keep kind/apiVersion on list items; built-in kinds do not.
    custom: bool = False


# Add a line here to serve another kind.
KINDS: tuple[KindInfo, ...] = (
    KindInfo("v1", "Namespace", "namespaces", namespaced=False),
    KindInfo("v1", "Service", "services"),
    KindInfo("v1", "Pod", "pods"),
    KindInfo("v1", "Secret", "secrets"),
    KindInfo("v1", "ConfigMap", "configmaps"),
    KindInfo("v1", "ServiceAccount", "serviceaccounts"),
    KindInfo("discovery.k8s.io/v1", "EndpointSlice", "endpointslices"),
    KindInfo("apps/v1", "ReplicaSet", "replicasets"),
    KindInfo("batch/v1", "Job", "jobs"),
    KindInfo("apps/v1", "Deployment", "deployments"),
    KindInfo("apps/v1", "StatefulSet", "statefulsets"),
    KindInfo("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration", "mutatingwebhookconfigurations",
             namespaced=False),
    KindInfo("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", namespaced=False),
    KindInfo("tulle.dev/v1alpha1", "ServiceProfile", "serviceprofiles", custom=True),
    KindInfo("policy.tulle.dev/v1alpha1", "Server", "servers", custom=True),
    KindInfo("policy.tulle.dev/v1alpha1", "ServerAuthorization", "serverauthorizations", custom=True),
)

TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
ACCESS_REVIEW_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
VERSION_PATH = "/version"


def _status(code: int, reason: str, message: str, details: Optional[dict] = None) -> dict:
    out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code}
    if details:
        out["details"] = details
    return out


class _HTTPError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: Optional[dict] = None):
        super().__init__(message)
        self.code, self.status = code, _status(code, reason, message, details)


# --- selectors -------------------------------------------------------------------------

_SET_EXPR = re.compile(r"^([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)$")


def _split_selector(text: str) -> list[str]:
    """Split on commas that are not inside a `(...)` value set."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return [p for p in parts if p]


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label selector syntax: k=v, k==v, k!=v, k in (a,b), k notin (a,b), k, !k."""
    for req in _split_selector(selector):
        m = _SET_EXPR.match(req)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            if op == "in" and labels.get(key) not in values:
                return False
            if op == "notin" and key in labels and labels[key] in values:
                return False
        elif "!=" in req:
            key, value = (s.strip() for s in req.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in req:
            key, value = (s.strip() for s in req.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif req.startswith("!"):
            if req[1:].strip() in labels:
                return False
        elif req not in labels:
            return False
    return True


def _field_selector(selector: str) -> list[tuple[str, bool, str]]:
    """(field, equal?, value) per requirement; only metadata.name and metadata.namespace."""
    out = []
    for req in _split_selector(selector):
        if "!=" in req:
            field, value, eq = *req.split("!=", 1), False
        elif "=" in req:
            field, value, eq = *req.replace("==", "=").split("=", 1), True
        else:
            raise _HTTPError(400, "BadRequest", f"invalid field selector {req!r}")
        field = field.strip()
        if field not in ("metadata.name", "metadata.namespace"):
            raise _HTTPError(400, "BadRequest", f'field label not supported: {field}')
        out.append((field, eq, value.strip()))
    return out


def _fields_match(reqs: list[tuple[str, bool, str]], obj: dict) -> bool:
    meta = obj.get("metadata", {})
    for field, eq, value in reqs:
        actual = meta.get(field.split(".", 1)[1], "")
        if (actual == value) != eq:
            return False
    return True


# --- watches -----------------------------------------------------------------------------


class _Watcher:
    """One open watch: its filter, and the events queued for it."""

    def __init__(self, info: KindInfo, namespace: Optional[str], labels: Optional[str],
                 fields: list[tuple[str, bool, str]], conn: socket.socket):
        self.info, self.namespace, self.labels, self.fields, self.conn = info, namespace, labels, fields, conn
        self.queue: deque[tuple[str, dict]] = deque()
        self.dropped = False

    def wants(self, info: KindInfo, obj: dict) -> bool:
        if info != self.info:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.labels and not label_selector_matches(self.labels, meta.get("labels") or {}):
            return False
        return _fields_match(self.fields, obj)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class FakeKube:
    """An in-memory Kubernetes API server on 127.0.0.1 (see the module docstring)."""

    def __init__(self, *, bookmark_interval: float = 1.0, kinds: tuple[KindInfo, ...] = KINDS):
        self.bookmark_interval = bookmark_interval
        self.kinds: dict[tuple[str, str], KindInfo] = {(k.api_version, k.plural): k for k in kinds}
        self._by_kind: dict[tuple[str, str], KindInfo] = {(k.api_version, k.kind): k for k in kinds}
        self._cond = threading.Condition()
        self._rv = 0
        self._compacted_rv = 0  # watches from an older resourceVersion get 410
        self._objects: dict[KindInfo, dict[tuple[str, str], dict]] = {k: {} for k in kinds}
        # (resourceVersion, event type, kind, object) of every change since the last compaction.
        self._history: list[tuple[int, str, KindInfo, dict]] = []
        self._watchers: list[_Watcher] = []
        self._refuse_watches = False
        self._cluster_ips = itertools.count(10)
        # token -> (username, [audiences] or None for any, bound pod name or None).
        self.token_reviews: dict[str, Any] = {}
        self.request_log: list[tuple[str, str]] = []
        self.server_version = {"major": "1", "minor": "30", "gitVersion": "v1.30.2", "gitCommit": "0" * 40,
                               "gitTreeState": "clean", "buildDate": "2024-06-11T20:20:00Z", "goVersion": "go1.22.4",
                               "compiler": "gc", "platform": "linux/amd64"}
        # (verb, group, resource, namespace or None for any) that SelfSubjectAccessReview refuses.
        self._denied: list[tuple[str, str, str, Optional[str]]] = []
        # (namespace, pod, container) -> [(time, line)], the containers' output for pods/log.
        self._logs: dict[tuple[str, str, str], list[tuple[datetime.datetime, str]]] = {}
        self._logs_ended = 0  # bumped by end_logs: following streams end
        # (namespace, pod, port) -> (host, port) the pod's port really is, for pods/portforward.
        self._pod_ports: dict[tuple[str, str, int], tuple[str, int]] = {}
        self.port_forwards: list[tuple[str, str, int]] = []  # every port-forward stream opened
        self._forward_sockets: set[socket.socket] = set()
        # (verb, resource[/subresource], namespace or None) answered 403 Forbidden, as RBAC would.
        self._forbidden: list[tuple[str, str, Optional[str]]] = []
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> "FakeKube":
        handler = type("Handler", (_Handler,), {"kube": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakekube", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self.drop_watches()
        self.end_logs()
        with self._cond:
            sockets, self._forward_sockets = list(self._forward_sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._server = None

    def __enter__(self) -> "FakeKube":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def configuration(self):
        """A `kubernetes.client.Configuration` pointing at this server."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return cfg

    def write_kubeconfig(self, path, context: str = "fake") -> str:
        """A kubeconfig file whose context `context` points at this server, for CLI commands."""
        from pathlib import Path

        Path(path).write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "fake-token"}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "tester"}}],
        }))
        return str(path)

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    # --- test controls ---------------------------------------------------------------------

    def apply(self, obj: dict) -> dict:
        """Create or replace an object; returns the stored copy (with uid, resourceVersion ...)."""
        obj = copy.deepcopy(obj)
        info = self._info_for(obj.get("apiVersion", ""), obj.get("kind", ""))
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError("apply: metadata.name is required")
        if info.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (meta.get("namespace", ""), meta["name"])
        if info.kind == "Secret" and "stringData" in obj:
            data = obj.setdefault("data", {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(v.encode()).decode()
        with self._cond:
            old = self._objects[info].get(key)
            if info.kind == "Service":
                spec = obj.setdefault("spec", {})
                if not spec.get("clusterIP"):
                    ip = (old or {}).get("spec", {}).get("clusterIP") or self._next_cluster_ip()
                    spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
            self._rv += 1
            meta["uid"] = (old or {}).get("metadata", {}).get("uid") or str(uuid.uuid4())
            meta["creationTimestamp"] = (old or {}).get("metadata", {}).get("creationTimestamp") or _now()
            meta["resourceVersion"] = str(self._rv)
            self._objects[info][key] = obj
            self._record("MODIFIED" if old is not None else "ADDED", info, obj)
            return copy.deepcopy(obj)

    def delete(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> dict:
        """Delete an object; returns its last state. KeyError when it does not exist."""
        info = self._info_for(api_version, kind)
        key = ((namespace or "default") if info.namespaced else "", name)
        with self._cond:
            obj = self._objects[info].pop(key)
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._record("DELETED", info, obj)
            return copy.deepcopy(obj)

    def get(self, api_version: str, kind: str, namespace: Optional[str], name: str) -> Optional[dict]:
        info = self._info_for(api_version, kind)
        key = ((namespace or "default") if info.namespaced else "", name)
        with self._cond:
            obj = self._objects[info].get(key)
            return copy.deepcopy(obj) if obj is not None else None

    def compact(self) -> None:
        """Forget the change history: watches from any older resourceVersion now get 410 Gone.

        Open watches are not affected (as on a real API server, whose watch cache keeps
        feeding them)."""
        with self._cond:
            self._history.clear()
            self._compacted_rv = self._rv

    def drop_watches(self) -> int:
        """Abruptly close every open watch connection (no terminating chunk). Returns how many."""
        with self._cond:
            watchers, self._watchers = self._watchers, []
            for w in watchers:
                w.dropped = True
                with contextlib.suppress(OSError):
                    w.conn.shutdown(socket.SHUT_RDWR)
            self._cond.notify_all()
        return len(watchers)

    def refuse_watches(self, refuse: bool = True) -> None:
        """While set, new watch requests get 503 Service Unavailable (lists still work)."""
        with self._cond:
            self._refuse_watches = refuse

    @contextlib.contextmanager
    def watches_down(self) -> Iterator["FakeKube"]:
        """Drop every watch and refuse new ones until the block ends: changes made inside
        are only seen by clients that resume their watch (or relist) afterwards."""
        self.refuse_watches(True)
        self.drop_watches()
        try:
            yield self
        finally:
            self.refuse_watches(False)

    def watch_count(self, plural: Optional[str] = None) -> int:
        """Open watches (of one resource, e.g. "pods", when given)."""
        with self._cond:
            return sum(1 for w in self._watchers if plural is None or w.info.plural == plural)

    def add_token(self, token: str, username: str, audiences: Optional[list[str]] = None, *,
                  pod: Optional[str] = None) -> None:
        """Make TokenReview accept `token` as `username` (for `audiences` only, when given);
        with `pod`, as a projected token bound to that pod (the API server then names it in
        `user.extra`)."""
        self.token_reviews[token] = (username, list(audiences) if audiences is not None else None, pod)

    def deny_access(self, verb: str, resource: str, group: str = "", namespace: Optional[str] = None) -> None:
        """SelfSubjectAccessReview answers allowed: false for this verb on this resource
        (in `namespace`, or anywhere when None)."""
        with self._cond:
            self._denied.append((verb, group, resource, namespace))

    def forbid(self, verb: str, resource: str, namespace: Optional[str] = None) -> None:
        """Requests for this verb on this resource (`secrets`, `pods/portforward`; in
        `namespace`, or anywhere when None) get 403 Forbidden, as from RBAC."""
        with self._cond:
            self._forbidden.append((verb, resource, namespace))

    def _check_allowed(self, verb: str, resource: str, namespace: Optional[str]) -> None:
        with self._cond:
            denied = any(v == verb and r == resource and (ns is None or ns == namespace)
                         for v, r, ns in self._forbidden)
        if denied:
            where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
            raise _HTTPError(403, "Forbidden", f'{resource} is forbidden: User "tester" cannot {verb} resource '
                                               f'"{resource}" in API group ""{where}', {"kind": resource})

    def forward_pod_port(self, namespace: str, pod: str, port: int, to: tuple[str, int]) -> None:
        """pods/portforward to `pod`'s `port` reaches `to` (a real server the test runs)."""
        with self._cond:
            self._pod_ports[(namespace, pod, port)] = to

    def append_log(self, namespace: str, pod: str, container: str, *lines: str,
                   at: Optional[datetime.datetime] = None) -> None:
        """The container printed these lines (now, or at `at`); following streams get them at once."""
        when = at or datetime.datetime.now(datetime.timezone.utc)
        with self._cond:
            self._logs.setdefault((namespace, pod, container), []).extend((when, line) for line in lines)
            self._cond.notify_all()

    def end_logs(self) -> None:
        """End every following pods/log stream (as when the containers stop)."""
        with self._cond:
            self._logs_ended += 1
            self._cond.notify_all()

    def log_follow_count(self) -> int:
        """pods/log requests with follow=true still streaming."""
        with self._cond:
            return self._following

    _following = 0

    # --- internals --------------------------------------------------------------------------

    def _info_for(self, api_version: str, kind: str) -> KindInfo:
        info = self._by_kind.get((api_version, kind))
        if info is None:
            raise ValueError(f"FakeKube does not serve {api_version} {kind}; add it to KINDS")
        return info

    def _next_cluster_ip(self) -> str:
        n = next(self._cluster_ips)
        return f"10.96.{n // 250}.{n % 250 + 1}"

    def _record(self, typ: str, info: KindInfo, obj: dict) -> None:
        snapshot = copy.deepcopy(obj)
        self._history.append((self._rv, typ, info, snapshot))
        for w in self._watchers:
            if w.wants(info, snapshot):
                w.queue.append((typ, snapshot))
        self._cond.notify_all()

    def _list(self, info: KindInfo, namespace: Optional[str], labels: Optional[str],
              fields: list[tuple[str, bool, str]]) -> tuple[int, list[dict]]:
        with self._cond:
            items = [copy.deepcopy(o) for (ns, _), o in sorted(self._objects[info].items())
                     if (namespace is None or ns == namespace)
                     and (not labels or label_selector_matches(labels, o["metadata"].get("labels") or {}))
                     and _fields_match(fields, o)]
            return self._rv, items

    def _access_review(self, review: dict) -> dict:
        attrs = (review.get("spec") or {}).get("resourceAttributes") or {}
        verb, group, resource = attrs.get("verb", ""), attrs.get("group", ""), attrs.get("resource", "")
        namespace = attrs.get("namespace") or None
        with self._cond:
            denied = any(v in (verb, "*") and g == group and r == resource and (ns is None or ns == namespace)
                         for v, g, r, ns in self._denied)
        status: dict[str, Any] = {"allowed": not denied}
        if denied:
            status.update(denied=True, reason=f'no RBAC policy matched: cannot {verb} resource "{resource}"')
        else:
            status["reason"] = 'RBAC: allowed by ClusterRoleBinding "cluster-admin"'
        return {"kind": "SelfSubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": review.get("spec") or {}, "status": status}

    def _token_review(self, review: dict) -> dict:
        spec = review.get("spec") or {}
        token, wanted = spec.get("token", ""), spec.get("audiences") or []
        entry = self.token_reviews.get(token)
        status: dict[str, Any] = {"user": {}}
        if entry is not None:
            username, registered, pod = entry
            granted = wanted if registered is None else [a for a in wanted if a in registered]
            if not wanted or granted:
                parts = username.split(":")
                groups = ["system:authenticated"]
                if username.startswith("system:serviceaccount:") and len(parts) == 4:
                    groups = ["system:serviceaccounts", f"system:serviceaccounts:{parts[2]}", "system:authenticated"]
                user = {"username": username, "uid": str(uuid.uuid5(uuid.NAMESPACE_OID, username)), "groups": groups}
                if pod is not None:
                    user["extra"] = {"authentication.kubernetes.io/pod-name": [pod],
                                     "authentication.kubernetes.io/pod-uid": [str(uuid.uuid5(uuid.NAMESPACE_OID, pod))]}
                status = {"authenticated": True, "user": user, "audiences": granted or (registered or [])}
            else:
                status["error"] = "[invalid bearer token, token audiences don't match the requested audiences]"
        else:
            status["error"] = "[invalid bearer token, token lookup failed]"
        # As the API server: `authenticated` is omitted when false.
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339nano(t: datetime.datetime) -> str:
    """As the kubelet stamps log lines with timestamps=true: 2024-06-11T20:20:00.123456789Z."""
    t = t.astimezone(datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond:06d}000Z"


def _truthy(v: Optional[str]) -> bool:
    return v is not None and v.lower() in ("1", "true")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kube: FakeKube  # set on the subclass made by FakeKube.start()

    def log_message(self, format, *args):  # silence the default stderr access log
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # --- plumbing ----------------------------------------------------------------------

    def _send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise _HTTPError(400, "BadRequest", "request body is not JSON") from None

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        self.kube.request_log.append((method, url.path))
        try:
            self._route(method, url.path, query)
        except _HTTPError as e:
            self._send_json(e.code, e.status)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, method: str, path: str, query: dict[str, str]) -> None:
        kube = self.kube
        if path == TOKEN_REVIEW_PATH:
            if method != "POST":
                raise _HTTPError(405, "MethodNotAllowed", f"{method} is not allowed on tokenreviews")
            self._send_json(201, kube._token_review(self._read_body()))
            return
        if path == ACCESS_REVIEW_PATH:
            if method != "POST":
                raise _HTTPError(405, "MethodNotAllowed", f"{method} is not allowed on selfsubjectaccessreviews")
            self._send_json(201, kube._access_review(self._read_body()))
            return
        if path.rstrip("/") == VERSION_PATH:
            self._send_json(200, dict(kube.server_version))
            return
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            api_version, rest = "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            api_version, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            raise _HTTPError(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace: Optional[str] = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise _HTTPError(404, "NotFound", f"the server could not find the requested resource ({path})")
        info = kube.kinds.get((api_version, rest[0]))
        if info is None or (namespace is not None and not info.namespaced):
            raise _HTTPError(404, "NotFound", f"the server could not find the requested resource ({path})")
        if method != "GET":
            raise _HTTPError(405, "MethodNotAllowed", f"{method} is not supported by this fake API server")
        if len(rest) == 3:
            # The API server authorizes a port-forward's upgrade as `create pods/portforward`.
            verb = "create" if rest[2] in ("portforward", "exec", "attach") else "get"
            kube._check_allowed(verb, f"{info.plural}/{rest[2]}", namespace)
        else:
            kube._check_allowed("watch" if _truthy(query.get("watch")) else ("get" if len(rest) == 2 else "list"),
                                info.plural, namespace)
        if len(rest) == 3:
            handler = _SUBRESOURCES.get((info.kind, rest[2]))
            if handler is None:
                raise _HTTPError(404, "NotFound", f"the server could not find the requested resource ({path})")
            handler(self, info, namespace, rest[1], query)
            return
        if len(rest) == 2:
            self._get(info, namespace, rest[1])
            return
        labels = query.get("labelSelector") or None
        fields = _field_selector(query.get("fieldSelector") or "")
        if _truthy(query.get("watch")):
            self._watch(info, namespace, labels, fields, query)
        else:
            rv, items = kube._list(info, namespace, labels, fields)
            if not info.custom:
                for item in items:
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
            self._send_json(200, {"kind": f"{info.kind}List", "apiVersion": info.api_version,
                                  "metadata": {"resourceVersion": str(rv)}, "items": items})

    def _get(self, info: KindInfo, namespace: Optional[str], name: str) -> None:
        if info.namespaced and namespace is None:
            raise _HTTPError(404, "NotFound", f"the server could not find the requested resource")
        obj = self.kube.get(info.api_version, info.kind, namespace, name)
        if obj is None:
            raise _HTTPError(404, "NotFound", f'{info.plural} "{name}" not found',
                             {"name": name, "group": info.api_version.rpartition("/")[0], "kind": info.plural})
        self._send_json(200, obj)

    # --- pods/log ----------------------------------------------------------------------------

    def _pod_log(self, info: KindInfo, namespace: Optional[str], name: str, query: dict[str, str]) -> None:
        kube = self.kube
        pod = kube.get("v1", "Pod", namespace, name)
        if pod is None:
            raise _HTTPError(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
        spec = pod.get("spec") or {}
        names = [c.get("name") for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])]
        regular = [c.get("name") for c in spec.get("containers") or []]
        container = query.get("container") or ""
        if not container:
            if len(regular) != 1:
                raise _HTTPError(400, "BadRequest", f"a container name must be specified for pod {name}, "
                                                    f"choose one of: [{' '.join(regular)}]")
            container = regular[0]
        if container not in names:
            raise _HTTPError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        key = (namespace or "", name, container)
        timestamps = _truthy(query.get("timestamps"))
        since = None
        if query.get("sinceSeconds"):
            since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=int(query["sinceSeconds"]))
        with kube._cond:
            entries = [e for e in kube._logs.get(key, []) if since is None or e[0] >= since]
            if query.get("tailLines"):
                tail = int(query["tailLines"])
                entries = entries[-tail:] if tail else []
            sent = len(kube._logs.get(key, []))
            ended = kube._logs_ended

        def render(entries) -> bytes:
            return b"".join(((_rfc3339nano(t) + " ") if timestamps else "").encode() + line.encode() + b"\n"
                            for t, line in entries)

        if not _truthy(query.get("follow")):
            body = render(entries)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with kube._cond:
            kube._following += 1
        try:
            if entries:
                self._raw_chunk(render(entries))
            while True:
                with kube._cond:
                    while (len(kube._logs.get(key, [])) == sent and kube._logs_ended == ended
                           and kube.get("v1", "Pod", namespace, name) is not None and kube._server is not None):
                        kube._cond.wait(0.5)
                    new = kube._logs.get(key, [])[sent:]
                    sent += len(new)
                    done = (kube._logs_ended != ended or kube.get("v1", "Pod", namespace, name) is None
                            or kube._server is None)
                if new:
                    self._raw_chunk(render(new))
                if done:
                    self._end_stream()
                    return
        except OSError:
            self.close_connection = True
        finally:
            with kube._cond:
                kube._following -= 1

    # --- pods/portforward ----------------------------------------------------------------------

    # What the API server (the kubelet's websocket port-forward) speaks: binary channels.
    PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io", "channel.k8s.io")

    def _pod_portforward(self, info: KindInfo, namespace: Optional[str], name: str, query: dict[str, str]) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request

        kube = self.kube
        pod = kube.get("v1", "Pod", namespace, name)
        if pod is None:
            raise _HTTPError(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
        if (pod.get("status") or {}).get("phase") != "Running":
            raise _HTTPError(400, "BadRequest", f"unable to upgrade connection: pod {name} is not running")
        try:
            ports = [int(p) for p in (query.get("ports") or "").split(",") if p]
        except ValueError:
            raise _HTTPError(400, "BadRequest", f"invalid port in {query.get('ports')!r}") from None
        if len(ports) != 1:
            raise _HTTPError(400, "BadRequest", "this fake API server forwards exactly one port per request")
        if self.headers.get("Upgrade", "").lower() != "websocket":
            raise _HTTPError(400, "BadRequest", "Upgrade request required")
        offered = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        chosen = next((p for p in offered if p in self.PORTFORWARD_PROTOCOLS), None)
        if offered and chosen is None:
            raise _HTTPError(400, "BadRequest", f"requested protocol(s) are not supported: {offered}")
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data((self.requestline + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
                         + "\r\n").encode("latin-1"))
        if not any(isinstance(e, Request) for e in ws.events()):
            raise _HTTPError(400, "BadRequest", "not a WebSocket upgrade")
        conn = self.connection
        self.close_connection = True
        conn.sendall(ws.send(AcceptConnection(subprotocol=chosen)))
        port = ports[0]
        with kube._cond:
            kube._forward_sockets.add(conn)
            target = kube._pod_ports.get((namespace or "", name, port))
            kube.port_forwards.append((namespace or "", name, port))
        upstream = None
        try:
            for channel in (0, 1):  # the data and error channels each announce the port first
                self._ws_message(ws, bytes([channel]) + port.to_bytes(2, "little"))
            try:
                if target is None:
                    raise ConnectionRefusedError(111, "connect: connection refused")
                upstream = socket.create_connection(target, timeout=5)
                upstream.settimeout(None)
            except OSError as e:
                self._ws_message(ws, b"\x01" + (
                    f"error forwarding port {port} to pod {pod['metadata'].get('uid', '')}, uid : failed to execute "
                    f"portforward in network namespace: failed to connect to localhost:{port} inside namespace: "
                    f"{e.strerror or e}").encode())
                self._ws_close(ws)
                return
            with kube._cond:
                kube._forward_sockets.add(upstream)
            self._ws_bridge(ws, conn, upstream)
        except OSError:
            pass
        finally:
            with kube._cond:
                kube._forward_sockets.discard(conn)
                if upstream is not None:
                    kube._forward_sockets.discard(upstream)
            if upstream is not None:
                upstream.close()

    def _ws_message(self, ws, data: bytes) -> None:
        from wsproto.events import BytesMessage

        self.connection.sendall(ws.send(BytesMessage(data=data)))

    def _ws_close(self, ws) -> None:
        from wsproto.events import CloseConnection

        with contextlib.suppress(Exception):
            self.connection.sendall(ws.send(CloseConnection(code=1000)))

    def _ws_bridge(self, ws, conn: socket.socket, upstream: socket.socket) -> None:
        """Client messages on the data channel go to `upstream`; its bytes come back as
        data-channel messages. Either end closing ends both."""
        import select

        from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

        first_of_message = True  # a message's first byte names its channel; wsproto may split messages
        while True:
            readable, _, _ = select.select([conn, upstream], [], [])
            if upstream in readable:
                data = upstream.recv(65536)
                if not data:
                    self._ws_close(ws)
                    return
                self._ws_message(ws, b"\x00" + data)
            if conn in readable:
                data = conn.recv(65536)
                ws.receive_data(data or None)
                for event in ws.events():
                    if isinstance(event, (BytesMessage, TextMessage)):
                        payload = event.data if isinstance(event.data, bytes) else event.data.encode()
                        if first_of_message:
                            if payload[:1] != b"\x00":
                                raise OSError("a message on a channel other than data")
                            payload = payload[1:]
                        first_of_message = event.message_finished
                        if payload:
                            upstream.sendall(payload)
                    elif isinstance(event, Ping):
                        conn.sendall(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        with contextlib.suppress(Exception):
                            conn.sendall(ws.send(event.response()))
                        return
                if not data:
                    return

    def _raw_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    # --- watch -------------------------------------------------------------------------------

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, info: KindInfo, namespace: Optional[str], labels: Optional[str],
               fields: list[tuple[str, bool, str]], query: dict[str, str]) -> None:
        kube = self.kube
        rv_param = query.get("resourceVersion", "")
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        watcher = _Watcher(info, namespace, labels, fields, self.connection)
        initial: list[tuple[str, dict]] = []
        expired: Optional[dict] = None
        with kube._cond:
            if kube._refuse_watches:
                raise _HTTPError(503, "ServiceUnavailable", "the watch cache is not ready (FakeKube.watches_down)")
            if rv_param in ("", "0"):
                # No starting point: the current state as synthetic ADDED events.
                _, items = kube._list(info, namespace, labels, fields)
                initial = [("ADDED", o) for o in items]
            else:
                try:
                    since = int(rv_param)
                except ValueError:
                    raise _HTTPError(400, "BadRequest", f"invalid resourceVersion {rv_param!r}") from None
                if since < kube._compacted_rv:
                    expired = _status(410, "Expired",
                                      f"too old resource version: {since} ({kube._compacted_rv})")
                else:
                    initial = [(typ, obj) for rv, typ, i, obj in kube._history
                               if rv > since and watcher.wants(i, obj)]
            if expired is None:
                kube._watchers.append(watcher)
            last_bookmark_rv = kube._rv
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if expired is not None:
                self._chunk({"type": "ERROR", "object": expired})
                self._end_stream()
                return
            for typ, obj in initial:
                self._chunk({"type": typ, "object": obj})
            deadline = time.monotonic() + timeout if timeout is not None else None
            next_bookmark = time.monotonic() + kube.bookmark_interval
            while True:
                with kube._cond:
                    while not watcher.queue and not watcher.dropped:
                        now = time.monotonic()
                        wake = next_bookmark if bookmarks else now + 3600
                        if deadline is not None:
                            wake = min(wake, deadline)
                        if now >= wake:
                            break
                        kube._cond.wait(wake - now)
                    if watcher.dropped:
                        self.close_connection = True
                        return
                    pending = list(watcher.queue)
                    watcher.queue.clear()
                    current_rv = kube._rv
                for typ, obj in pending:
                    self._chunk({"type": typ, "object": obj})
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    self._end_stream()
                    return
                if bookmarks and now >= next_bookmark:
                    next_bookmark = now + kube.bookmark_interval
                    if current_rv != last_bookmark_rv:
                        last_bookmark_rv = current_rv
                        self._chunk({"type": "BOOKMARK", "object": {
                            "kind": info.kind, "apiVersion": info.api_version,
                            "metadata": {"resourceVersion": str(current_rv)}}})
        except OSError:
            self.close_connection = True
        finally:
            with kube._cond:
                if watcher in kube._watchers:
                    kube._watchers.remove(watcher)

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


# (kind, subresource) -> handler(self, info, namespace, name, query): GET <object>/<subresource>.
_SUBRESOURCES = {
    ("Pod", "log"): _Handler._pod_log,
    ("Pod", "portforward"): _Handler._pod_portforward,
}
