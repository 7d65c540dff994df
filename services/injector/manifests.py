"""inject / uninject on whole Kubernetes objects, as `tulle inject` reads them from
manifests (pure: an object in, the object out with report lines).

Pods and workloads (their pod template, at the path Linkerd uses) go through the core;
Namespaces get the inject annotation; Services their opaque ports; a `List` has each
item done; any other kind passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import jsonpatch

from services.injector import core
from services.injector.values import Values

# kind -> (JSON pointer of the pod template, owner label kind)
WORKLOADS = {
    "Pod": ("", ""),
    "Deployment": ("/spec/template", "deployment"),
    "StatefulSet": ("/spec/template", "statefulset"),
    "DaemonSet": ("/spec/template", "daemonset"),
    "ReplicaSet": ("/spec/template", "replicaset"),
    "ReplicationController": ("/spec/template", "replicationcontroller"),
    "Job": ("/spec/template", "job"),
    "CronJob": ("/spec/jobTemplate/spec/template", "cronjob"),
}


@dataclass
class Outcome:
    obj: Any
    changed: bool = False
    lines: list[str] = field(default_factory=list)  # the report, one line each


@dataclass(frozen=True)
class Options:
    manual: bool = False  # render the proxy (else only the inject annotation)
    ingress: bool = False  # tulle.dev/inject: ingress instead of enabled
    annotations: Mapping[str, str] = field(default_factory=dict)  # config.tulle.dev/* to set


def _pointer_get(obj: Any, pointer: str) -> Any:
    for token in pointer.split("/")[1:]:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(token)
    return obj


def _label(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    name = meta.get("name") or meta.get("generateName") or ""
    return f'{str(obj.get("kind", "")).lower()} "{name}"'


def _is_list(obj: Any) -> bool:
    return isinstance(obj, Mapping) and str(obj.get("kind", "")).endswith("List") and isinstance(obj.get("items"), list)


def _apply(obj: Any, ops: list[dict]) -> Any:
    return jsonpatch.apply_patch(obj, ops) if ops else obj


def _annotation_ops(meta: Optional[Mapping[str, Any]], prefix: str, wanted: Mapping[str, str]) -> list[dict]:
    """add ops setting `wanted` annotations, creating metadata and its map when absent."""
    have = (meta or {}).get("annotations") or {}
    missing = {k: v for k, v in wanted.items() if have.get(k) != v}
    if not missing:
        return []
    ops: list[dict] = []
    if meta is None:
        ops.append({"op": "add", "path": f"{prefix}/metadata", "value": {}})
    if not have:
        ops.append({"op": "add", "path": f"{prefix}/metadata/annotations", "value": {}})
    return ops + [{"op": "add", "path": f"{prefix}/metadata/annotations/{core.escape(k)}", "value": v}
                  for k, v in missing.items()]


def inject_object(obj: Any, values: Values, opts: Options = Options()) -> Outcome:
    if _is_list(obj):
        return _each_item(obj, lambda item: inject_object(item, values, opts))
    if not isinstance(obj, Mapping):
        return Outcome(obj)
    kind = obj.get("kind")
    inject_value = "ingress" if opts.ingress else "enabled"
    if kind == "Namespace":
        ops = _annotation_ops(obj.get("metadata"), "", {core.INJECT: inject_value, **opts.annotations})
        return Outcome(_apply(obj, ops), bool(ops), [f"{_label(obj)} annotated"])
    if kind == "Service":
        ops = core.service_ops(obj, values)
        return Outcome(_apply(obj, ops), bool(ops), [f"{_label(obj)} annotated"] if ops else [])
    if kind not in WORKLOADS:
        return Outcome(obj)
    prefix, owner_kind = WORKLOADS[kind]
    pod = _pointer_get(obj, prefix) if prefix else obj
    if not isinstance(pod, Mapping) or not isinstance(pod.get("spec"), Mapping):
        return Outcome(obj, lines=[f"{_label(obj)} skipped: it has no pod template at {prefix or '/'}spec"])
    meta = obj.get("metadata") or {}
    # Flags become the pod's own annotations, as if the user had written them.
    if opts.annotations:
        pre = _annotation_ops(pod.get("metadata"), prefix, opts.annotations)
        obj, pod = _apply(obj, pre), None
        pod = _pointer_get(obj, prefix) if prefix else obj
    target = core.Target(kind=kind, name=meta.get("name") or meta.get("generateName") or "",
                         namespace=meta.get("namespace") or "", pod=pod, prefix=prefix,
                         owner_kind=owner_kind, owner_name=meta.get("name") or "")
    if opts.manual:
        plan = core.plan_pod(target, {}, values, core.CLI)
        lines = [f"‼ {_label(obj)}: {w}" for w in plan.warnings]
        if not plan.inject:
            return Outcome(obj, bool(opts.annotations), lines + [f"{_label(obj)} skipped: {plan.reason}"])
        return Outcome(jsonpatch.apply_patch(obj, plan.ops), True, lines + [f"{_label(obj)} injected"])
    decision = core.decide(target, {}, core.CLI, values)
    lines = [f"‼ {_label(obj)}: {w}" for w in decision.warnings]
    if not decision.inject:
        return Outcome(obj, bool(opts.annotations), lines + [f"{_label(obj)} skipped: {decision.reason}"])
    try:
        core.resolve_config(core.annotations_of(pod), {}, values)
    except core.InvalidConfig as e:
        return Outcome(obj, bool(opts.annotations), lines + [f"{_label(obj)} skipped: {e}"])
    # A manifest injected with --manual before is uninjected first (Linkerd does the same).
    ops = core.uninject_ops(pod, prefix, values.opaque_ports, keep_inject=True) if core.existing_proxy_version(pod) is not None else []
    obj = _apply(obj, ops)
    pod = _pointer_get(obj, prefix) if prefix else obj
    ops = _annotation_ops(pod.get("metadata"), prefix, {core.INJECT: inject_value})
    return Outcome(_apply(obj, ops), True, lines + [f"{_label(obj)} injected"])


def uninject_object(obj: Any, values: Values) -> Outcome:
    if _is_list(obj):
        return _each_item(obj, lambda item: uninject_object(item, values))
    if not isinstance(obj, Mapping):
        return Outcome(obj)
    kind = obj.get("kind")
    if kind == "Service":
        meta = obj.get("metadata") or {}
        ann = meta.get("annotations") or {}
        derived = core.default_opaque_annotation(core.service_ports(obj), values.opaque_ports)
        if derived and ann.get(core.OPAQUE_PORTS) == derived:
            path = "/metadata/annotations" if len(ann) == 1 else f"/metadata/annotations/{core.escape(core.OPAQUE_PORTS)}"
            return Outcome(jsonpatch.apply_patch(obj, [{"op": "remove", "path": path}]), True,
                           [f"{_label(obj)} uninjected"])
        return Outcome(obj)
    if kind == "Namespace":
        pod_like = {"metadata": obj.get("metadata") or {}, "spec": {}}
        ops = [op for op in core.uninject_ops(pod_like, "", values.opaque_ports) if op["path"].startswith("/metadata/")]
        return Outcome(_apply(obj, ops), bool(ops), [f"{_label(obj)} uninjected"] if ops else [])
    if kind not in WORKLOADS:
        return Outcome(obj)
    prefix, _ = WORKLOADS[kind]
    pod = _pointer_get(obj, prefix) if prefix else obj
    if not isinstance(pod, Mapping):
        return Outcome(obj)
    ops = core.uninject_ops(pod, prefix, values.opaque_ports)
    if not prefix:  # a Pod's own metadata is never removed whole
        ops = [op for op in ops if op["path"] != "/metadata"]
    return Outcome(_apply(obj, ops), bool(ops), [f"{_label(obj)} uninjected"] if ops else [])


def _each_item(obj: Mapping[str, Any], fn) -> Outcome:
    items, lines, changed = [], [], False
    for item in obj["items"]:
        out = fn(item)
        items.append(out.obj)
        lines += out.lines
        changed |= out.changed
    if not changed:
        return Outcome(obj, False, lines)
    new = dict(obj)
    new["items"] = items
    return Outcome(new, True, lines)
