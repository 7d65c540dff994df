"""Where the webhook gets what is not in the review: its serving certificate (files or a
Secret, read again when they change) and, from the Kubernetes API, a namespace's
annotations and a pod's owner. Thin adapters; the decisions stay in the core."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any, AsyncIterator, Mapping, Optional

from services.injector.admission import LookupError_, owner_from_references
from tulle.log import get_logger


class CertFiles:
    """tls.crt / tls.key files (a mounted Secret swaps a `..data` symlink, so files are
    compared by stat, not watched with inotify)."""

    def __init__(self, cert: str, key: str, interval_s: float = 1.0):
        self.cert, self.key, self.interval_s = Path(cert), Path(key), interval_s
        self.where = f"{cert} and {key}"

    def _signature(self):
        out = []
        for p in (self.cert, self.key):
            try:
                st = os.stat(p)
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def read(self) -> Optional[tuple[bytes, bytes]]:
        try:
            return self.cert.read_bytes(), self.key.read_bytes()
        except OSError:
            return None

    async def updates(self) -> AsyncIterator[tuple[bytes, bytes]]:
        seen = None
        while True:
            now = self._signature()
            if now != seen:
                seen = now
                pair = self.read()
                if pair is not None:
                    yield pair
            await asyncio.sleep(self.interval_s)


class CertSecret:
    """A `kubernetes.io/tls` Secret (tls.crt, tls.key), read every `interval_s`."""

    def __init__(self, api_client, namespace: str, name: str, interval_s: float = 10.0):
        self.api_client, self.namespace, self.name, self.interval_s = api_client, namespace, name, interval_s
        self.where = f"Secret {namespace}/{name}"
        self.log = get_logger(secret=f"{namespace}/{name}")

    def read(self) -> Optional[tuple[bytes, bytes]]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            secret = client.CoreV1Api(self.api_client).read_namespaced_secret(self.name, self.namespace,
                                                                               _request_timeout=10)
        except ApiException as e:
            self.log.warning("webhook certificate secret not read", status=e.status, reason=e.reason)
            return None
        except Exception as e:
            self.log.warning("webhook certificate secret not read", error=f"{type(e).__name__}: {e}")
            return None
        data = secret.data or {}
        try:
            return base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"])
        except (KeyError, ValueError):
            self.log.warning("webhook certificate secret lacks tls.crt or tls.key")
            return None

    async def updates(self) -> AsyncIterator[tuple[bytes, bytes]]:
        last = None
        while True:
            pair = await asyncio.to_thread(self.read)
            if pair is not None and pair != last:
                last = pair
                yield pair
            await asyncio.sleep(self.interval_s)


class KubeLookups:
    """Namespace annotations and owners through the official client (synchronous:
    called from the worker thread a review is handled in)."""

    def __init__(self, api_client):
        self.api_client = api_client

    def namespace_annotations(self, namespace: str) -> Mapping[str, str]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            ns = client.CoreV1Api(self.api_client).read_namespace(namespace, _request_timeout=5)
        except ApiException as e:
            raise LookupError_(f"{e.status} {e.reason}") from None
        except Exception as e:
            raise LookupError_(f"{type(e).__name__}: {e}") from None
        return dict(ns.metadata.annotations or {})

    def owner_of(self, pod: Mapping[str, Any], namespace: str) -> tuple[str, str]:
        """The pod's controller, one level up where Linkerd looks: a ReplicaSet's
        Deployment, a Job's CronJob. Falls back to the pod's own references."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        kind, name = owner_from_references(pod, namespace)
        refs = (pod.get("metadata") or {}).get("ownerReferences") or []
        ref = next((r for r in refs if isinstance(r, Mapping) and r.get("controller")), refs[0] if refs else None)
        if not ref or ref.get("kind") not in ("ReplicaSet", "Job"):
            return kind, name
        try:
            if ref["kind"] == "ReplicaSet":
                parent = client.AppsV1Api(self.api_client).read_namespaced_replica_set(
                    ref["name"], namespace, _request_timeout=5)
            else:
                parent = client.BatchV1Api(self.api_client).read_namespaced_job(ref["name"], namespace,
                                                                                 _request_timeout=5)
        except (ApiException, Exception):
            return kind, name
        up = [r for r in (parent.metadata.owner_references or []) if r.controller] or parent.metadata.owner_references or []
        if up:
            return up[0].kind.lower(), up[0].name
        return ref["kind"].lower(), ref["name"]
