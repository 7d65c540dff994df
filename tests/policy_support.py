"""Helpers for the policy tests: manifests as dicts, and a real `python -m services.policy`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import yaml

from tests.conftest import REPO, wait_until
from tulle.metrics import sample
from tulle.natsserver import free_port

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


class PolicyProcess:
    """One real policy service process; its log goes to a file."""

    def __init__(self, nats_url: str, args: list[str], log: Path, env: Optional[dict] = None):
        self.admin_port = free_port()
        self.log = log
        self.env = env or {}
        self.cmd = [sys.executable, "-m", "services.policy", "--nats", nats_url,
                    "--admin", f"127.0.0.1:{self.admin_port}", "--log-format", "json", *args]
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "PolicyProcess":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": str(REPO), **self.env})
        out.close()
        return self

    def _get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _check_alive(self) -> None:
        if not self.alive():
            raise AssertionError(f"policy service exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")

    def ready(self) -> bool:
        self._check_alive()
        return self._get("/ready")[0] == 200

    async def wait_ready(self, timeout: float = 20) -> None:
        await asyncio.to_thread(wait_until, self.ready, timeout, 0.05, f"policy service ready ({self.log})")

    def metric(self, name: str, **labels: str) -> float:
        status, text = self._get("/metrics")
        assert status == 200, f"metrics: HTTP {status}"
        return sample(text, name, **labels)

    def is_leader(self) -> bool:
        return self.metric("tulle_leader", lease="policy") == 1

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(5)
