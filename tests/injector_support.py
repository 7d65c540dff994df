"""What the injector tests share: fixed install values (with a real trust anchor made
once and kept beside the golden files), and Kubernetes-shaped objects."""

from __future__ import annotations

import copy
from pathlib import Path

from services.injector.values import Values

GOLDEN = Path(__file__).parent / "golden" / "inject"
ANCHORS_PEM = (GOLDEN / "trust-anchors.pem").read_text()
# Kubernetes version the injected objects are validated against (kubernetes-validate).
K8S_SCHEMA_VERSION = "1.30.0"


def values(**kw) -> Values:
    """Install values with fixed versions, so golden files do not move with __version__."""
    base = dict(trust_anchors_pem=ANCHORS_PEM, proxy_version="v0.1.0", proxy_image="ghcr.io/tulle-mesh/tulle")
    base.update(kw)
    return Values(**base)


def pod(name="web-7d4b9c", namespace="shop", annotations=None, labels=None, containers=None, **spec) -> dict:
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {"app": "web"})},
        "spec": {"containers": copy.deepcopy(containers or [
            {"name": "app", "image": "nginx:1.27", "ports": [{"containerPort": 8080, "name": "http"}]}])},
    }
    if annotations is not None:
        obj["metadata"]["annotations"] = dict(annotations)
    obj["spec"].update(spec)
    return obj
