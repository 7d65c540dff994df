"""The logs of a cluster: pods/log through the official client, one request per pod and
container (`follow=true` keeps it open, and the kubelet sends each new line).

A component is its workload's pods (tulle/installation.py) and its container there; the
proxies are the `tulle-proxy` container of every meshed pod (a regular container, or a
native sidecar among the init containers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from tulle import installation as names
from tulle.errors import UserError
from tulle.logs import LogStream
from tulle.logs.select import Selection, Window, name_matches

REQUEST_TIMEOUT_S = 10


@dataclass(frozen=True)
class PodContainer:
    namespace: str
    pod: str
    container: str


def _containers(pod: Any) -> list[str]:
    """A pod's containers, native sidecars first (they start first), then the regular ones."""
    sidecars = [c.name for c in pod.spec.init_containers or [] if getattr(c, "restart_policy", None) == "Always"]
    return sidecars + [c.name for c in pod.spec.containers or []]


def _list(core: Any, namespace: Optional[str]) -> list[Any]:
    from kubernetes.client import ApiException

    try:
        if namespace is None:
            return core.list_pod_for_all_namespaces(_request_timeout=REQUEST_TIMEOUT_S).items
        return core.list_namespaced_pod(namespace, _request_timeout=REQUEST_TIMEOUT_S).items
    except ApiException as e:
        where = f"in {namespace}" if namespace else "in any namespace"
        raise UserError(f"logs: cannot list pods {where}: HTTP {e.status} {e.reason or ''}".rstrip()) from None
    except Exception as e:  # no API to talk to
        raise UserError(f"logs: cannot reach the Kubernetes API: {str(e).splitlines()[0] if str(e) else e}") from None


def select(core: Any, sel: Selection, control_namespace: str) -> list[PodContainer]:
    """The pods and containers a selection names; UserError (one line) when none."""
    if sel.component and sel.component != "proxy":
        comp = names.COMPONENTS[sel.component]
        namespace = sel.namespace or control_namespace
        pods = [p for p in _list(core, namespace) if name_matches(p.metadata.name, comp.workload.name)
                and (sel.name is None or name_matches(p.metadata.name, sel.name))]
        chosen = [PodContainer(namespace, p.metadata.name, comp.container) for p in pods
                  if comp.container in _containers(p)]
        if not chosen:
            raise UserError(f"logs: no pod of {comp.workload.kind} {comp.workload.name} with a {comp.container} "
                            f"container in namespace {namespace} (is Tulle installed there? -n NAMESPACE)")
        return chosen
    if sel.component == "proxy":
        namespace = sel.namespace if sel.namespace or not sel.name else "default"
        chosen = [PodContainer(p.metadata.namespace, p.metadata.name, names.PROXY_CONTAINER)
                  for p in _list(core, namespace) if names.PROXY_CONTAINER in _containers(p)
                  and (sel.name is None or name_matches(p.metadata.name, sel.name))]
        if not chosen:
            what = f" named {sel.name}" if sel.name else ""
            raise UserError(f"logs: no meshed pod{what} in {f'namespace {namespace}' if namespace else 'any namespace'}")
        return chosen
    if not sel.name:
        raise UserError("logs: name a pod or workload, or pick --component (destination, identity, policy, injector, "
                        "nats, proxy)")
    namespace = sel.namespace or "default"
    pods = _list(core, namespace)
    exact = [p for p in pods if p.metadata.name == sel.name]
    pods = exact or [p for p in pods if name_matches(p.metadata.name, sel.name)]
    if not pods:
        raise UserError(f"logs: no pod named {sel.name} (or of a workload {sel.name}) in namespace {namespace}")
    chosen = []
    for p in pods:
        for c in _containers(p):
            if sel.container is None or c == sel.container:
                chosen.append(PodContainer(namespace, p.metadata.name, c))
    if not chosen:
        have = sorted({c for p in pods for c in _containers(p)})
        raise UserError(f"logs: {sel.name} has no container {sel.container} (it has {', '.join(have)})")
    return chosen


def streams(configuration: Any, sel: Selection, window: Window, control_namespace: str) -> list[LogStream]:
    from kubernetes import client

    api = client.ApiClient(configuration)
    core = client.CoreV1Api(api)
    chosen = select(core, sel, control_namespace)
    several_namespaces = len({pc.namespace for pc in chosen}) > 1
    out = []
    for pc in chosen:
        label = f"{pc.namespace}/{pc.pod}/{pc.container}" if several_namespaces else f"pod/{pc.pod}/{pc.container}"
        holder: dict[str, Any] = {}
        out.append(LogStream(label, (lambda pc=pc, holder=holder: pod_lines(core, pc, window, holder)),
                             (lambda holder=holder: _shutdown(holder))))
    return out


def pod_lines(core: Any, pc: PodContainer, window: Window, holder: dict) -> Iterator[str]:
    """One container's lines; while following, each new line as the API sends it."""
    from kubernetes.client import ApiException

    kwargs: dict[str, Any] = {"container": pc.container, "follow": window.follow, "_preload_content": False}
    if not window.follow:  # a followed log may stay quiet for hours: no read timeout then
        kwargs["_request_timeout"] = REQUEST_TIMEOUT_S
    if window.tail is not None:
        kwargs["tail_lines"] = window.tail
    if window.since is not None:
        kwargs["since_seconds"] = max(1, math.ceil(window.since.total_seconds()))
    try:
        resp = core.read_namespaced_pod_log(pc.pod, pc.namespace, **kwargs)
    except ApiException as e:
        raise StreamError(_api_message(e)) from None
    except Exception as e:  # the API went away
        raise StreamError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    holder["resp"] = resp
    partial = b""
    try:
        for chunk in resp.stream(65536, decode_content=True):
            data = partial + chunk
            last = data.rfind(b"\n")
            if last < 0:
                partial = data
                continue
            partial = data[last + 1:]
            yield from data[:last].decode("utf-8", "replace").split("\n")
        if partial:
            yield partial.decode("utf-8", "replace")
    except Exception as e:  # the connection went away (the pod was deleted, the API restarted)
        if not holder.get("closed"):
            raise StreamError(f"the log stream ended: {type(e).__name__}") from None
    finally:
        resp.release_conn()


class StreamError(Exception):
    """A stream that could not start or ended badly; the message is one line."""


def _api_message(e: Any) -> str:
    import json

    try:
        return json.loads(e.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"HTTP {e.status} {e.reason or ''}".rstrip()


def _shutdown(holder: dict) -> None:
    holder["closed"] = True
    resp = holder.get("resp")
    if resp is not None:
        try:
            resp.shutdown()  # urllib3 2.3+: unblocks a read in another thread
        except Exception:
            pass
