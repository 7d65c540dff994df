"""Helpers for the policy tests: manifests as dicts, and a real `python -m services.policy`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml

from tests.service_process import ServiceProcess

POLICY_API = "policy.tulle.dev/v1alpha1"


def pod_doc(name: str, ns: str = "demo", *, labels: Optional[dict] = None, sa: Optional[str] = None,
            ports: tuple = (("http", 8080),), probes: tuple = (), annotations: Optional[dict] = None,
            ip: str = "10.42.0.10", meshed: bool = True) -> dict:
    app = {"name": "app", "ports": [{"name": n, "containerPort": p} for n, p in ports]}
    for kind, path, port in probes:
        app[kind] = {"httpGet": {"path": path, "port": port}}
    containers = [app] + ([{"name": "tulle-proxy", "ports": [{"name": "tulle-admin", "containerPort": 4191}]}]
                          if meshed else [])
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name},
                         "annotations": annotations or {}},
            "spec": {"serviceAccountName": sa or name, "containers": containers},
            "status": {"podIP": ip, "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


def server_doc(name: str, port, ns: str = "demo", *, app: Optional[str] = None, protocol: str = "unknown") -> dict:
    return {"apiVersion": POLICY_API, "kind": "Server", "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": app or name}}, "port": port, "proxyProtocol": protocol}}


def saz_doc(name: str, server: str, client: dict, ns: str = "demo") -> dict:
    return {"apiVersion": POLICY_API, "kind": "ServerAuthorization", "metadata": {"name": name, "namespace": ns},
            "spec": {"server": {"name": server}, "client": client}}


def service_accounts(*names: str) -> dict:
    return {"meshTLS": {"serviceAccounts": [{"name": n} for n in names]}}


def write_manifest(path: Path, *docs: dict) -> None:
    """Write atomically, as an editor saving a file would: the poller never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    os.replace(tmp, path)


class PolicyProcess(ServiceProcess):
    """One real policy service process; its log goes to a file."""

    def __init__(self, nats_url: str, args: list[str], log: Path, env: Optional[dict] = None):
        super().__init__("policy", nats_url, args, log, env)

    async def wait_ready(self, timeout: float = 20) -> None:  # the policy tests are async
        await self.ready_soon(timeout)
