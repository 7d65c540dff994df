"""Where the issuer material comes from, and how its changes are noticed.

- `DirIssuerSource`: three files in a folder (`ca.crt`, `issuer.crt`, `issuer.key`), as
  `tulle identity init` writes them or as a Secret volume mounts them. Polled with
  `stat`: a Secret volume swaps a `..data` symlink, which inotify on the files would miss,
  and a stat per file per second costs nothing.
- `SecretIssuerSource`: a Kubernetes Secret (keys `ca.crt`, `tls.crt`, `tls.key`, the
  `kubernetes.io/tls` layout cert-manager writes), list + watch through the
  `kubernetes` client.

Both yield `IssuerPEM` each time the material changes (the first one is the current
material); validating it is the CA core's job.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Optional

from services.identity.ca import IssuerFiles
from tulle.errors import UserError
from tulle.log import get_logger

ANCHORS_FILE, ISSUER_CERT_FILE, ISSUER_KEY_FILE = "ca.crt", "issuer.crt", "issuer.key"
SECRET_KEYS = IssuerFiles(anchors="ca.crt", cert="tls.crt", key="tls.key")


@dataclass(frozen=True)
class IssuerPEM:
    """One reading of the issuer material; `error` says why it could not be read."""

    anchors: bytes = b""
    cert: bytes = b""
    key: bytes = b""
    names: IssuerFiles = IssuerFiles()
    error: str = ""


class DirIssuerSource:
    def __init__(self, directory: str | Path, *, interval_s: float = 1.0):
        self.dir = Path(directory)
        self.interval_s = interval_s
        self.names = IssuerFiles(*(str(self.dir / n) for n in (ANCHORS_FILE, ISSUER_CERT_FILE, ISSUER_KEY_FILE)))

    def check_exists(self) -> None:
        """UserError when the folder or a file is missing (a flag pointing at the wrong place)."""
        if not self.dir.is_dir():
            raise UserError(f"--issuer-dir {self.dir}: not a directory (create one with `tulle identity init --out {self.dir}`)")
        for name in (self.names.anchors, self.names.cert, self.names.key):
            if not os.path.isfile(name):
                raise UserError(f"--issuer-dir {self.dir}: {Path(name).name} is missing")

    def read(self) -> IssuerPEM:
        try:
            return IssuerPEM(Path(self.names.anchors).read_bytes(), Path(self.names.cert).read_bytes(),
                             Path(self.names.key).read_bytes(), self.names)
        except OSError as e:
            return IssuerPEM(names=self.names, error=f"{e.filename}: cannot read: {e.strerror or e}")

    def _signature(self) -> tuple:
        sig = []
        for name in (self.names.anchors, self.names.cert, self.names.key):
            try:
                st = os.stat(name)
                sig.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                sig.append(None)
        return tuple(sig)

    async def updates(self) -> AsyncIterator[IssuerPEM]:
        """The current material, then the material after each change.

        A change is read once the files have stopped changing for one interval, so a
        replacement written file by file is not read half-done.
        """
        seen = self._signature()
        yield self.read()
        while True:
            await asyncio.sleep(self.interval_s)
            now = self._signature()
            if now == seen:
                continue
            while True:  # settle
                await asyncio.sleep(self.interval_s)
                later = self._signature()
                if later == now:
                    break
                now = later
            seen = now
            yield self.read()


def secret_to_pem(secret, names: IssuerFiles = SECRET_KEYS, where: str = "") -> IssuerPEM:
    """IssuerPEM from a V1Secret (or its dict form)."""
    data = (secret.get("data") if isinstance(secret, dict) else secret.data) or {}
    out = {}
    for attr, key in (("anchors", names.anchors), ("cert", names.cert), ("key", names.key)):
        raw = data.get(key)
        if not raw:
            return IssuerPEM(names=names, error=f"{where}: key {key} is missing")
        try:
            out[attr] = base64.b64decode(raw, validate=True)
        except ValueError:
            return IssuerPEM(names=names, error=f"{where}: key {key} is not base64")
    return IssuerPEM(out["anchors"], out["cert"], out["key"], names)


class SecretIssuerSource:
    """The issuer Secret, watched. The kubernetes client is synchronous: the list + watch
    loop runs in a daemon thread and hands each new version to the event loop."""

    def __init__(self, api_client, namespace: str, name: str, *, retry_s: float = 1.0):
        self.api_client = api_client
        self.namespace = namespace
        self.name = name
        self.retry_s = retry_s
        self.where = f"Secret {namespace}/{name}"
        self.names = IssuerFiles(*(f"{self.where} key {k}" for k in ("ca.crt", "tls.crt", "tls.key")))
        self.log = get_logger(secret=f"{namespace}/{name}")

    def _to_pem(self, secret) -> IssuerPEM:
        pem = secret_to_pem(secret, SECRET_KEYS, self.where)
        return IssuerPEM(pem.anchors, pem.cert, pem.key, self.names, pem.error)

    async def updates(self) -> AsyncIterator[IssuerPEM]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[IssuerPEM] = asyncio.Queue()
        stop = threading.Event()
        thread = threading.Thread(target=self._run, args=(loop, queue, stop), daemon=True,
                                  name=f"issuer-secret-{self.namespace}-{self.name}")
        thread.start()
        last: Optional[tuple] = None
        try:
            while True:
                pem = await queue.get()
                key = (pem.anchors, pem.cert, pem.key, pem.error)
                if key == last:  # a resync or an unrelated metadata change
                    continue
                last = key
                yield pem
        finally:
            stop.set()

    def _run(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, stop: threading.Event) -> None:
        from kubernetes import client, watch
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self.api_client)
        selector = f"metadata.name={self.name}"

        def put(pem: IssuerPEM) -> None:
            if not stop.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, pem)

        version: Optional[str] = None
        while not stop.is_set():
            try:
                if version is None:
                    listed = core.list_namespaced_secret(self.namespace, field_selector=selector, _request_timeout=10)
                    version = listed.metadata.resource_version
                    mine = [s for s in listed.items if s.metadata.name == self.name]
                    put(self._to_pem(mine[0]) if mine else IssuerPEM(names=self.names, error=f"{self.where} does not exist"))
                w = watch.Watch()
                for ev in w.stream(core.list_namespaced_secret, self.namespace, field_selector=selector,
                                   resource_version=version, timeout_seconds=30, _request_timeout=40):
                    if stop.is_set():
                        w.stop()
                        return
                    obj = ev["object"]
                    if ev["type"] == "ERROR":
                        version = None  # 410 Gone: relist
                        break
                    version = obj.metadata.resource_version
                    if obj.metadata.name != self.name:
                        continue
                    if ev["type"] == "DELETED":
                        put(IssuerPEM(names=self.names, error=f"{self.where} was deleted"))
                    else:
                        put(self._to_pem(obj))
            except ApiException as e:
                if e.status == 410:
                    version = None
                    continue
                self.log.warning("issuer secret watch failed", status=e.status, reason=e.reason)
                stop.wait(self.retry_s)
            except Exception as e:  # connection errors: keep the current issuer, try again
                if stop.is_set():
                    return
                self.log.warning("issuer secret watch failed", error=f"{type(e).__name__}: {e}")
                version = None
                stop.wait(self.retry_s)
