"""AdmissionReview v1 in, AdmissionReview v1 out: the webhook's whole logic as a
function of bytes (no sockets, no bus), over the injection core.

    handler = AdmissionHandler(values, namespace_annotations=lambda ns: {...},
                               owner_of=lambda pod, ns: ("deployment", "web"))
    answer = handler.handle(body)          # Answer(status, body, outcome)

A review that cannot be understood (not JSON, not an AdmissionReview of
admission.k8s.io/v1, no request uid) gets HTTP 400 and a one-line reason; the API
server then applies the webhook's failurePolicy. Anything understood is allowed:
CREATE of a Pod gets the injection patch (or none, with the reason), CREATE of a
Service its opaque-ports annotation; everything else passes untouched.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from services.injector import core
from services.injector.values import Values

API_VERSION = "admission.k8s.io/v1"

NamespaceLookup = Callable[[str], Mapping[str, str]]
OwnerLookup = Callable[[Mapping[str, Any], str], tuple[str, str]]


class LookupError_(Exception):
    """The Kubernetes API could not tell a namespace's annotations (the message says why)."""


@dataclass
class Outcome:
    """What happened to one review, for the events and metrics."""

    result: str  # injected | skipped | annotated | ignored | error
    resource: str = ""  # pods | services | ...
    namespace: str = ""
    name: str = ""
    reason: str = ""
    owner_kind: str = ""
    owner_name: str = ""
    proxy_version: str = ""
    replaced_version: str = ""


@dataclass
class Answer:
    status: int
    body: bytes
    outcome: Outcome


def owner_from_references(pod: Mapping[str, Any], namespace: str) -> tuple[str, str]:
    """The pod's controller from its ownerReferences alone (no API): a ReplicaSet that
    a Deployment made is named `<deployment>-<pod-template-hash>`, so the Deployment is
    known without asking."""
    meta = pod.get("metadata") or {}
    refs = [r for r in (meta.get("ownerReferences") or []) if isinstance(r, Mapping)]
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if ref is None:
        return "", ""
    kind, name = str(ref.get("kind", "")).lower(), str(ref.get("name", ""))
    template_hash = ((meta.get("labels") or {}).get("pod-template-hash") or "")
    if kind == "replicaset" and template_hash and name.endswith("-" + template_hash):
        return "deployment", name[: -len(template_hash) - 1]
    return kind, name


def _error(status: int, message: str, outcome_reason: str) -> Answer:
    body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status,
                       "message": message}).encode()
    return Answer(status, body, Outcome("error", reason=outcome_reason))


class AdmissionHandler:
    def __init__(self, values: Values, *, namespace_annotations: NamespaceLookup = lambda ns: {},
                 owner_of: OwnerLookup = owner_from_references):
        self.values = values
        self.namespace_annotations = namespace_annotations
        self.owner_of = owner_of

    def handle(self, body: bytes) -> Answer:
        try:
            review = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"the request body is not JSON: {e}", "malformed")
        if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
            return _error(400, "the request body is not an AdmissionReview", "malformed")
        if review.get("apiVersion") != API_VERSION:
            return _error(400, f"AdmissionReview {review.get('apiVersion')!r} is not supported; "
                               f"list only {API_VERSION} in admissionReviewVersions", "version")
        request = review.get("request")
        if not isinstance(request, dict) or not isinstance(request.get("uid"), str) or not request["uid"]:
            return _error(400, "the AdmissionReview has no request with a uid", "malformed")
        response, outcome = self._respond(request)
        response["uid"] = request["uid"]
        out = {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
        return Answer(200, json.dumps(out).encode(), outcome)

    def _respond(self, request: dict) -> tuple[dict, Outcome]:
        resource = request.get("resource") or {}
        plural = resource.get("resource", "") if isinstance(resource, dict) else ""
        obj = request.get("object")
        namespace = str(request.get("namespace") or "")
        if request.get("operation") != "CREATE" or plural not in ("pods", "services") or not isinstance(obj, dict):
            return {"allowed": True}, Outcome("ignored", plural, namespace)
        if request.get("subResource"):
            return {"allowed": True}, Outcome("ignored", plural, namespace)
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        name = str(meta.get("name") or meta.get("generateName") or "")
        namespace = namespace or str(meta.get("namespace") or "")
        if plural == "services":
            ops = core.service_ops(obj, self.values)
            if not ops:
                return {"allowed": True}, Outcome("ignored", plural, namespace, name)
            return _patched(ops), Outcome("annotated", plural, namespace, name)
        if not isinstance(obj.get("spec"), dict):
            return ({"allowed": True, "warnings": ["tulle: the pod has no spec; not injected"]},
                    Outcome("skipped", plural, namespace, name, "the pod has no spec"))
        try:
            ns_annotations = dict(self.namespace_annotations(namespace))
        except LookupError_ as e:
            reason = f"the annotations of namespace {namespace!r} could not be read: {e}"
            return ({"allowed": True, "warnings": [f"tulle: not injected: {reason}"]},
                    Outcome("skipped", plural, namespace, name, reason))
        try:
            owner_kind, owner_name = self.owner_of(obj, namespace)
        except LookupError_:
            owner_kind, owner_name = owner_from_references(obj, namespace)
        target = core.Target("Pod", name, namespace, obj, "", owner_kind, owner_name)
        try:
            plan = core.plan_pod(target, ns_annotations, self.values, core.WEBHOOK)
        except (TypeError, AttributeError, KeyError, ValueError) as e:  # a field of an unexpected type
            reason = f"the pod could not be read: {type(e).__name__}"
            return {"allowed": True}, Outcome("skipped", plural, namespace, name, reason)
        outcome = Outcome("injected" if plan.inject else "skipped", plural, namespace, name, plan.reason,
                          owner_kind, owner_name, plan.config.version if plan.config else "", plan.replaced_version)
        if not plan.inject:
            return {"allowed": True}, outcome
        response = _patched(plan.ops)
        if plan.warnings:
            response["warnings"] = [f"tulle: {w}" for w in plan.warnings]
        return response, outcome


def _patched(ops: list[dict]) -> dict:
    return {"allowed": True, "patchType": "JSONPatch",
            "patch": base64.b64encode(json.dumps(ops).encode()).decode()}
