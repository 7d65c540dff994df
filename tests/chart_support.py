"""Rendering the bundled charts as `helm install` would, and checking what comes out
against the Kubernetes schemas of a pinned version (kubernetes-validate) and, for our own
kinds, against the CRDs we ship (tests/crd_validation.py)."""

from __future__ import annotations

import functools
from typing import Iterable, Optional

import kubernetes_validate

from tests.crd_validation import CRDValidator
from tulle.install.render import chart_values, merge_values, render
from tulle.install.values import complete

# The oldest Kubernetes the charts support is 1.31 (kubeVersion); the schemas of a recent
# release are checked, pinned so a kubernetes-validate update cannot change the verdict.
K8S_VERSION = "1.33.0"
NAMESPACE = "tulle"


@functools.lru_cache(maxsize=1)
def crd_validator() -> CRDValidator:
    return CRDValidator.from_documents(render("tulle-crds", {}, namespace=NAMESPACE))


@functools.lru_cache(maxsize=4)
def _secrets(namespace: str) -> dict:
    """Trust anchors, issuer, bus TLS and credentials, as `tulle install` generates them."""
    return complete({}, chart_values("tulle-control-plane"), namespace=namespace).values


def control_plane_values(extra: Optional[dict] = None, *, ha: bool = False, namespace: str = NAMESPACE) -> dict:
    """What a user passes to `helm install` (-f values-ha.yaml, --set ...), plus the secrets."""
    values = merge_values(chart_values("tulle-control-plane", "values-ha.yaml"), {}) if ha else {}
    values = merge_values(values, extra or {})
    return merge_values(_secrets(namespace), values)


def render_control_plane(extra: Optional[dict] = None, *, ha: bool = False, namespace: str = NAMESPACE) -> list[dict]:
    return render("tulle-control-plane", control_plane_values(extra, ha=ha, namespace=namespace), namespace=namespace)


def invalid_objects(objects: Iterable[dict]) -> list[str]:
    """Each object that the API server would refuse, with why (empty: all valid)."""
    problems = []
    crds = crd_validator()
    for obj in objects:
        name = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        if crds.serves(obj):
            problems += [f"{name}: {e}" for e in crds.errors(obj)]
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes "
                            f"{K8S_VERSION} nor in our CRDs")
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
    return problems


def find(objects: Iterable[dict], kind: str, name: str) -> dict:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind} {name} among {[(o['kind'], o['metadata']['name']) for o in objects]}")


def containers(objects: Iterable[dict]) -> dict[str, dict]:
    """Every container of every workload, by '<workload>/<container>'."""
    out = {}
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            spec = obj["spec"]["template"]["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                out[f"{obj['metadata']['name']}/{c['name']}"] = c
    return out
