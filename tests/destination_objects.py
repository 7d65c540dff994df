"""Manifests for the destination tests, as a user (or the local runner) would write them."""

from __future__ import annotations

from typing import Any

from tulle.resources.parse import parse_object

ID = "{sa}.{ns}.serviceaccount.identity.tulle.cluster.local"


def service_doc(name: str, ns: str = "demo", *, selector: dict | None = None, ports: list[dict] | None = None,
                cluster_ip: str | None = None, annotations: dict | None = None, type_: str | None = None) -> dict:
    spec: dict[str, Any] = {"ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}]}
    if selector is not None:
        spec["selector"] = selector
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    if type_ is not None:
        spec["type"] = type_
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def pod_doc(name: str, ns: str = "demo", *, labels: dict | None = None, ip: str = "10.1.0.1", ready: bool = True,
            sa: str = "default", meshed: bool = True, ports: list[dict] | None = None,
            annotations: dict | None = None, phase: str = "Running") -> dict:
    containers = [{"name": "app", "ports": ports if ports is not None else [{"name": "http", "containerPort": 8080}]}]
    if meshed:
        containers.append({"name": "tulle-proxy", "ports": [{"name": "tulle-proxy", "containerPort": 4143}]})
    meta: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels or {}}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"serviceAccountName": sa, "containers": containers},
        "status": {"phase": phase, "podIP": ip,
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def slice_doc(name: str, service: str, ns: str = "demo", *, endpoints: list[dict], ports: list[dict] | None = None) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports or [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def slice_endpoint(ip: str, pod: str | None = None, *, ready: bool = True, zone: str | None = None) -> dict:
    e: dict[str, Any] = {"addresses": [ip], "conditions": {"ready": ready}}
    if pod:
        e["targetRef"] = {"kind": "Pod", "name": pod}
    if zone:
        e["zone"] = zone
    return e


def profile_doc(service: str, ns: str = "demo", *, routes: list[dict] | None = None, retry_budget: dict | None = None,
                opaque_ports: list[int] | None = None, domain: str = "cluster.local") -> dict:
    spec: dict[str, Any] = {"routes": routes or []}
    if retry_budget is not None:
        spec["retryBudget"] = retry_budget
    if opaque_ports is not None:
        spec["opaquePorts"] = opaque_ports
    return {"apiVersion": "tulle.dev/v1alpha1", "kind": "ServiceProfile",
            "metadata": {"name": f"{service}.{ns}.svc.{domain}", "namespace": ns}, "spec": spec}


def obj(doc: dict):
    return parse_object(doc)
