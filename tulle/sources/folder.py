"""The folder source: a directory (or several) of manifests, watched by polling.

Polling file stamps every `interval` seconds costs a few stat calls and needs no
extra dependency; 0.1 s keeps a manifest edit well inside the "within a second" the
issues ask for. A file that stops parsing yields one `error` event and keeps its
last good objects until it is fixed.

File modification times tick coarsely (the kernel's clock tick, a few ms), so two
writes of the same size in one tick leave the same stamp. Like git's "racily clean"
check, a file modified within the last RACY_WINDOW_NS also stamps its content hash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import AsyncIterator, Iterable, Optional

from tulle.resources import model as m
from tulle.resources.parse import ManifestError, load_file, manifest_files
from tulle.sources.base import ResourceEvent

RACY_WINDOW_NS = 2_000_000_000


class FolderSource:
    def __init__(self, directories: Iterable[str | Path], *, kinds: Optional[Iterable[str]] = None,
                 interval: float = 0.1):
        self.directories = [Path(d) for d in directories]
        self.kinds = set(kinds) if kinds is not None else None
        self.interval = interval
        # file -> (stamp, objects by key)
        self._files: dict[Path, tuple[tuple, dict[tuple[str, str, str], m.Resource]]] = {}
        self._errors: dict[Path, str] = {}

    def _scan(self) -> dict[Path, tuple]:
        stamps = {}
        now = time.time_ns()
        for d in self.directories:
            if not d.is_dir():
                continue
            try:
                files = manifest_files(d)
            except OSError:
                # A sub-folder vanished mid-walk: keep what we knew of this folder until the next scan,
                # rather than report its files as deleted.
                stamps.update((f, entry[0]) for f, entry in self._files.items() if d in f.parents)
                continue
            for f in files:
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue
                digest = None
                if now - st.st_mtime_ns < RACY_WINDOW_NS:
                    # A recent mtime may not change on the next write: stamp the content too.
                    try:
                        digest = hashlib.sha256(f.read_bytes()).digest()
                    except OSError:
                        pass  # gone or unreadable: the next scan or _load says so
                stamps[f] = (st.st_mtime_ns, st.st_size, st.st_ino, digest)
        return stamps

    def _load(self, f: Path) -> dict[tuple[str, str, str], m.Resource]:
        objects = [with_defaults(o) for o in load_file(f, kinds=None)]
        return {m.key_of(o): o for o in objects if self.kinds is None or o.kind in self.kinds}

    def _all(self) -> dict[tuple[str, str, str], m.Resource]:
        out: dict[tuple[str, str, str], m.Resource] = {}
        for _, objects in self._files.values():
            out.update(objects)
        return out

    def poll(self) -> list[ResourceEvent]:
        """One scan: the events since the last one (diffed over all files, so an
        object moving from one file to another is a modification, not a deletion)."""
        events: list[ResourceEvent] = []
        stamps = self._scan()
        changed = [f for f in self._files if f not in stamps]
        changed += [f for f, stamp in stamps.items() if f not in self._files or self._files[f][0] != stamp]
        if not changed:
            return events
        before = self._all()
        for f in changed:
            if f not in stamps:
                self._files.pop(f)
                self._errors.pop(f, None)
                continue
            old = self._files.get(f)
            try:
                new = self._load(f)
            except ManifestError as e:
                if self._errors.get(f) != str(e):
                    self._errors[f] = str(e)
                    events.append(ResourceEvent("error", error=str(e)))
                # Keep the last good objects; remember the stamp so the error is reported once.
                self._files[f] = (stamps[f], old[1] if old else {})
                continue
            self._errors.pop(f, None)
            self._files[f] = (stamps[f], new)
        after = self._all()
        for key, obj in after.items():
            if key not in before:
                events.append(ResourceEvent("added", obj))
            elif before[key] != obj:
                events.append(ResourceEvent("modified", obj))
        events.extend(ResourceEvent("deleted", o) for key, o in before.items() if key not in after)
        return events

    async def events(self) -> AsyncIterator[ResourceEvent]:
        # Polls run in a worker thread: parsing a large folder must not stall the
        # event loop (and with it the NATS connection and the admin server).
        for ev in await asyncio.to_thread(self.poll):
            yield ev
        yield ResourceEvent("synced")
        while True:
            await asyncio.sleep(self.interval)
            for ev in await asyncio.to_thread(self.poll):
                yield ev


# What the Kubernetes API server would fill in, for objects read from a folder.
LOCAL_SERVICE_CIDR = "10.96.0.0/16"


def local_cluster_ip(namespace: str, name: str) -> str:
    """A stable cluster IP for a Service without one, from its name (10.96.x.y).

    Derived rather than allocated so that every reader of the folder (destination,
    the local runner writing /etc/hosts) agrees without talking to each other.
    """
    h = hashlib.sha256(f"{namespace}/{name}".encode()).digest()
    return f"10.96.{h[0]}.{1 + h[1] % 254}"


def with_defaults(obj: m.Resource) -> m.Resource:
    if isinstance(obj, m.Service) and not obj.cluster_ip:
        return dataclasses.replace(obj, cluster_ip=local_cluster_ip(obj.meta.namespace, obj.meta.name))
    return obj
