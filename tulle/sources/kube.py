"""The Kubernetes source: list + watch through the official `kubernetes` client.

One worker thread per kind runs the classic reflector loop with the synchronous client:

    list (remember the list's resourceVersion)
    watch from it, tracking the resourceVersion of every event and bookmark
      - the watch ends (timeoutSeconds, dropped connection): watch again from there
      - an error: back off (0.1 s doubling, capped at 2 s), watch again from there
      - 410 Gone (the server no longer has that history): relist, and emit only the
        differences between the relist and what was already delivered, then `synced`

Threads feed the asyncio side through `loop.call_soon_threadsafe`, so events keep
their order. What to emit is decided by `KindState`, a pure class (no I/O) that
remembers the last good version of each object: an object that fails to parse yields
one `error` event and its previous version stays.

Objects are read as the API's own JSON (`_preload_content=False` for lists, raw
objects for watch events) rather than through the client's generated models: our
parser is the one authority on what a field means, and custom resources come as
plain dicts anyway.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable, Optional

from tulle.errors import UserError
from tulle.log import get_logger
from tulle.metrics import REGISTRY
from tulle.resources import model as m
from tulle.resources.parse import ManifestError, parse_object
from tulle.sources.base import ResourceEvent

RELISTS = REGISTRY.counter("tulle_kube_relists_total",
                           "Relists of a kind after the API server answered 410 Gone", ["kind"])
WATCH_RESTARTS = REGISTRY.counter("tulle_kube_watch_restarts_total",
                                  "Watches started again after one ended (ended) or failed (error)",
                                  ["kind", "reason"])
PARSE_ERRORS = REGISTRY.counter("tulle_kube_parse_errors_total",
                                "Objects from the API that failed validation (the last good version is kept)",
                                ["kind"])

BACKOFF_START = 0.1
BACKOFF_MAX = 2.0


@dataclass(frozen=True)
class KubeKind:
    """How one kind of the resource model is listed and watched."""

    kind: str
    group: str  # "" for core
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def custom(self) -> bool:
        return self.group not in ("", "discovery.k8s.io")

    def list_call(self, api_client, namespace: Optional[str]) -> tuple[Callable[..., Any], tuple, dict]:
        """(function, args, kwargs) listing this kind with the official client."""
        from kubernetes import client

        if self.custom:
            api = client.CustomObjectsApi(api_client)
            if not self.namespaced:
                return api.list_cluster_custom_object, (self.group, self.version, self.plural), {}
            if namespace is None:
                return api.list_custom_object_for_all_namespaces, (self.group, self.version, self.plural), {}
            return api.list_namespaced_custom_object, (self.group, self.version, namespace, self.plural), {}
        api = client.DiscoveryV1Api(api_client) if self.group == "discovery.k8s.io" else client.CoreV1Api(api_client)
        snake = _BUILTIN_METHOD[self.kind]
        if not self.namespaced:
            kwargs = {"field_selector": f"metadata.name={namespace}"} if namespace is not None else {}
            return getattr(api, f"list_{snake}"), (), kwargs
        if namespace is None:
            return getattr(api, f"list_{snake}_for_all_namespaces"), (), {}
        return getattr(api, f"list_namespaced_{snake}"), (namespace,), {}


_BUILTIN_METHOD = {"Namespace": "namespace", "Service": "service", "Pod": "pod", "EndpointSlice": "endpoint_slice"}

KUBE_KINDS: dict[str, KubeKind] = {
    k.kind: k for k in (
        KubeKind("Namespace", "", "v1", "namespaces", namespaced=False),
        KubeKind("Service", "", "v1", "services"),
        KubeKind("Pod", "", "v1", "pods"),
        KubeKind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices"),
        KubeKind("ServiceProfile", "tulle.dev", "v1alpha1", "serviceprofiles"),
        KubeKind("Server", "policy.tulle.dev", "v1alpha1", "servers"),
        KubeKind("ServerAuthorization", "policy.tulle.dev", "v1alpha1", "serverauthorizations"),
    )
}


def object_key(kind: KubeKind, raw: dict) -> tuple[str, str, str]:
    """(kind, namespace, name) of an API object, the same key as `model.key_of`."""
    meta = raw.get("metadata") or {}
    return (kind.kind, (meta.get("namespace") or "") if kind.namespaced else "", str(meta.get("name") or ""))


def describe_error(e: ManifestError) -> str:
    """One line: `ServerAuthorization demo/web: spec.server: set exactly one of name or selector`."""
    return f"{e.what or 'object'}: {e.path + ': ' if e.path else ''}{e.message}"


class KindState:
    """What has been delivered for one kind, and the events that move it forward (pure).

    `known` holds the last good version of each object. Parse failures are reported once
    per resourceVersion and never replace a good version.
    """

    def __init__(self, kind: KubeKind):
        self.kind = kind
        self.known: dict[tuple[str, str, str], m.Resource] = {}
        self._bad: dict[tuple[str, str, str], str] = {}  # key -> resourceVersion already reported

    def _parse(self, raw: dict) -> tuple[Optional[m.Resource], Optional[ResourceEvent]]:
        raw.setdefault("kind", self.kind.kind)
        raw.setdefault("apiVersion", self.kind.api_version)
        key = object_key(self.kind, raw)
        try:
            obj = parse_object(raw)
        except ManifestError as e:
            rv = str((raw.get("metadata") or {}).get("resourceVersion") or "")
            if key in self._bad and self._bad[key] == rv:
                return None, None
            self._bad[key] = rv
            return None, ResourceEvent("error", error=describe_error(e))
        self._bad.pop(key, None)
        return obj, None

    def _upsert(self, obj: m.Resource) -> Optional[ResourceEvent]:
        key = m.key_of(obj)
        previous = self.known.get(key)
        self.known[key] = obj
        if previous is None:
            return ResourceEvent("added", obj)
        # Equality ignores resourceVersion: a change to fields we do not read is no event.
        return ResourceEvent("modified", obj) if previous != obj else None

    def apply(self, event_type: str, raw: dict) -> list[ResourceEvent]:
        """One watch event (ADDED / MODIFIED / DELETED) into the events to emit."""
        if event_type == "DELETED":
            key = object_key(self.kind, raw)
            self._bad.pop(key, None)
            previous = self.known.pop(key, None)
            if previous is None:
                return []
            obj, _ = self._parse(raw)
            self._bad.pop(key, None)
            return [ResourceEvent("deleted", obj if obj is not None else previous)]
        obj, error = self._parse(raw)
        if obj is None:
            return [error] if error else []
        ev = self._upsert(obj)
        return [ev] if ev else []

    def relist(self, items: Iterable[dict]) -> list[ResourceEvent]:
        """A full list into exactly the events that converge `known` onto it."""
        events: list[ResourceEvent] = []
        listed: set[tuple[str, str, str]] = set()
        for raw in items:
            listed.add(object_key(self.kind, raw))
            obj, error = self._parse(raw)
            if error:
                events.append(error)
            if obj is not None:
                ev = self._upsert(obj)
                if ev:
                    events.append(ev)
        for key in [k for k in self.known if k not in listed]:
            events.append(ResourceEvent("deleted", self.known.pop(key)))
        for key in [k for k in self._bad if k not in listed]:
            del self._bad[key]
        return events


class _Gone(Exception):
    """The API server no longer has the history we asked for (410)."""

    status = 410


_SYNCED = object()  # a worker's marker: its (re)list has been delivered


class _KindWorker:
    """The reflector loop for one kind, in its own thread."""

    def __init__(self, kind: KubeKind, configuration, namespace: Optional[str], watch_timeout: int,
                 backoff_max: float, emit: Callable[[Any], None], count: Callable[[Callable[[], None]], None]):
        self.kind, self.configuration, self.namespace = kind, configuration, namespace
        self.watch_timeout, self.backoff_max = watch_timeout, backoff_max
        self.emit, self.count = emit, count
        self.state = KindState(kind)
        # Metric children made here, on the loop's thread: the worker only increments them,
        # through the loop (count), so a concurrent /metrics render never sees them change shape.
        self._relists = RELISTS.labels(kind.kind)
        self._ended = WATCH_RESTARTS.labels(kind.kind, "ended")
        self._failed = WATCH_RESTARTS.labels(kind.kind, "error")
        self._parse_errors = PARSE_ERRORS.labels(kind.kind)
        self.resource_version: Optional[str] = None
        self._listed_at = 0.0
        self.stopping = threading.Event()
        self._watch = None
        self._log = get_logger(source="kubernetes", kind=kind.kind)
        ctx = contextvars.copy_context()  # keeps the log context (component) in the thread
        self.thread = threading.Thread(target=ctx.run, args=(self._run,), name=f"kube-{kind.plural}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to end; shuts the open watch's socket so a blocked read returns."""
        self.stopping.set()
        w = self._watch
        if w is not None:
            w.stop()

    def _run(self) -> None:
        from kubernetes import client

        api_client = client.ApiClient(self.configuration)
        backoff = BACKOFF_START
        need_list, first = True, True
        try:
            while not self.stopping.is_set():
                try:
                    if need_list:
                        self._list(api_client, relist=not first)
                        need_list, first = False, False
                        backoff = BACKOFF_START
                    started = time.monotonic()
                    delivered = self._watch_once(api_client)
                    if self.stopping.is_set():
                        break
                    self.count(self._ended.inc)
                    if delivered or time.monotonic() - started > 1.0:
                        backoff = BACKOFF_START
                    else:  # a watch that ends at once, again and again, must not spin
                        self.stopping.wait(backoff)
                        backoff = min(backoff * 2, self.backoff_max)
                except Exception as e:  # noqa: BLE001 - any failure: back off and try again
                    if self.stopping.is_set():
                        break
                    if getattr(e, "status", None) == 410:  # ApiException from the client, or our _Gone
                        self._log.info("watch expired (410 Gone), relisting", resource_version=self.resource_version)
                        self.count(self._relists.inc)
                        need_list = True
                        if time.monotonic() - self._listed_at < 1.0:  # Gone again right after a list: do not spin
                            self.stopping.wait(backoff)
                            backoff = min(backoff * 2, self.backoff_max)
                        continue
                    self._log.warning("list/watch failed, retrying", error=_one_line(e), retry_in_s=backoff,
                                      relist=need_list)
                    if not need_list:
                        self.count(self._failed.inc)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, self.backoff_max)
        finally:
            api_client.close()

    def _list(self, api_client, relist: bool) -> None:
        fn, args, kwargs = self.kind.list_call(api_client, self.namespace)
        resp = fn(*args, **kwargs, _preload_content=False, _request_timeout=(10, 60))
        try:
            body = json.loads(resp.data)
        finally:
            resp.release_conn()
        self._listed_at = time.monotonic()
        items = body.get("items") or []
        self.resource_version = str((body.get("metadata") or {}).get("resourceVersion") or "") or None
        events = self.state.relist(items)
        for ev in events:
            if ev.type == "error":
                self.count(self._parse_errors.inc)
                self._log.warning("invalid object in the API, keeping its last good version", error=ev.error)
            self.emit(ev)
        self.emit((_SYNCED, self.kind.kind))
        if relist:
            self._log.info("relisted", objects=len(self.state.known), changes=len(events))

    def _watch_once(self, api_client) -> int:
        """One watch from the current resourceVersion; returns how many events it delivered."""
        from kubernetes import watch

        fn, args, kwargs = self.kind.list_call(api_client, self.namespace)
        # return_type "object": events carry the API's JSON as a dict (no model round trip).
        w = watch.Watch(return_type="object")
        self._watch = w
        if self.stopping.is_set():  # stop() ran before self._watch was set
            return 0
        delivered = 0
        try:
            for ev in w.stream(fn, *args, **kwargs, resource_version=self.resource_version,
                               allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout,
                               _request_timeout=(10, self.watch_timeout + 30)):
                if self.stopping.is_set():
                    break
                if not isinstance(ev, dict):
                    continue
                raw = ev.get("raw_object")
                if not isinstance(raw, dict):
                    continue
                rv = str((raw.get("metadata") or {}).get("resourceVersion") or "")
                typ = ev.get("type")
                if typ == "ERROR":  # the client raises for these; in case a version does not
                    if raw.get("code") == 410:
                        raise _Gone()
                    raise RuntimeError(f"watch error: {raw.get('reason')}: {raw.get('message')}")
                if typ in ("ADDED", "MODIFIED", "DELETED"):
                    for out in self.state.apply(typ, raw):
                        if out.type == "error":
                            self.count(self._parse_errors.inc)
                            self._log.warning("invalid object in the API, keeping its last good version",
                                              error=out.error)
                        self.emit(out)
                    delivered += 1
                if rv:  # events and bookmarks alike move our position forward
                    self.resource_version = rv
        finally:
            self._watch = None
        return delivered


def _one_line(e: BaseException) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return (str(e).splitlines() or [type(e).__name__])[0] or type(e).__name__


def load_configuration():
    """In-cluster service account if running in a pod, else the user's kubeconfig.

    Raises UserError (one line) when there is neither."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
        return cfg
    except config.ConfigException:
        pass
    try:
        config.load_kube_config(client_configuration=cfg)
    except (config.ConfigException, OSError) as e:
        raise UserError(f"no Kubernetes API to talk to: not running in a pod and no usable kubeconfig ({e})") from None
    return cfg


default_configuration = load_configuration  # the same, under the other name callers use


class KubeSource:
    """Resources from the Kubernetes API, as ResourceEvents (see tulle/sources/base.py).

    kinds: kinds of the resource model (Namespace, Service, Pod, EndpointSlice,
    ServiceProfile, Server, ServerAuthorization). namespace: watch one namespace only.
    watch_timeout: seconds the server keeps one watch open (then it is resumed).
    """

    def __init__(self, configuration=None, *, kinds: Iterable[str], namespace: Optional[str] = None,
                 watch_timeout: int = 300, backoff_max: float = BACKOFF_MAX):
        kinds = list(dict.fromkeys(kinds))
        unknown = [k for k in kinds if k not in KUBE_KINDS]
        if unknown:
            raise ValueError(f"KubeSource cannot watch {', '.join(unknown)} "
                             f"(supported: {', '.join(sorted(KUBE_KINDS))})")
        if not kinds:
            raise ValueError("KubeSource needs at least one kind")
        self.kinds = [KUBE_KINDS[k] for k in kinds]
        self.namespace = namespace
        self.configuration = configuration if configuration is not None else load_configuration()
        self.watch_timeout = int(watch_timeout)
        self.backoff_max = backoff_max
        self._workers: list[_KindWorker] = []

    async def events(self) -> AsyncIterator[ResourceEvent]:
        """Every object as `added`, one `synced` once every kind is listed, then changes;
        after a relist (410 Gone), the differences and another `synced`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        def count(inc: Callable[[], None]) -> None:
            try:
                loop.call_soon_threadsafe(inc)
            except RuntimeError:
                pass

        workers = [_KindWorker(k, self.configuration, self.namespace, self.watch_timeout, self.backoff_max,
                               emit, count) for k in self.kinds]
        self._workers.extend(workers)
        for w in workers:
            w.start()
        waiting = {k.kind for k in self.kinds}
        try:
            while True:
                item = await queue.get()
                if isinstance(item, tuple) and item and item[0] is _SYNCED:
                    if waiting:
                        waiting.discard(item[1])
                        if waiting:
                            continue
                    yield ResourceEvent("synced")
                else:
                    yield item
        finally:
            for w in workers:
                w.stop()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop every worker thread and wait (up to `timeout`) for them to end."""
        deadline = time.monotonic() + timeout
        while True:
            for w in self._workers:
                w.stop()  # again each round: a watch opened just before the first stop()
            self._workers = [w for w in self._workers if w.thread.is_alive()]
            if not self._workers:
                return
            if time.monotonic() > deadline:
                get_logger(source="kubernetes").warning("worker threads still running after close",
                                                        threads=[w.thread.name for w in self._workers])
                return
            await asyncio.sleep(0.02)

    @property
    def threads(self) -> list[threading.Thread]:
        """The worker threads currently running (for tests and diagnostics)."""
        return [w.thread for w in self._workers if w.thread.is_alive()]
