"""The one interface both sources implement, and the cache services keep of what they saw."""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Literal, Optional, Protocol, TypeVar

from tulle.resources.model import Resource, key_of

EventType = Literal["added", "modified", "deleted", "synced", "error"]


@dataclass(frozen=True, slots=True)
class ResourceEvent:
    """added / modified / deleted carry the object (deleted: its last known state).

    synced: everything that existed when the source started has been delivered (and
    again after a relist), so a consumer may now publish and prune safely.
    error: an object or file that could not be read; `error` says what and where.
    The source carries on, keeping the last good version of that object.
    """

    type: EventType
    obj: Optional[Resource] = None
    error: str = ""


class Source(Protocol):
    def events(self) -> AsyncIterator[ResourceEvent]:
        """Every object as `added`, then `synced`, then changes, until cancelled."""
        ...


R = TypeVar("R")


class Store:
    """The current objects by (kind, namespace, name), fed with ResourceEvents."""

    def __init__(self):
        self.objects: dict[tuple[str, str, str], Resource] = {}
        self.synced = False

    def apply(self, ev: ResourceEvent) -> bool:
        """Apply one event; True when the stored state changed."""
        if ev.type == "synced":
            changed = not self.synced
            self.synced = True
            return changed
        if ev.obj is None:
            return False
        key = key_of(ev.obj)
        if ev.type == "deleted":
            return self.objects.pop(key, None) is not None
        if ev.type in ("added", "modified"):
            if self.objects.get(key) == ev.obj:
                return False
            self.objects[key] = ev.obj
            return True
        return False

    def of_kind(self, kind: str, namespace: Optional[str] = None) -> list:
        return [o for (k, ns, _), o in self.objects.items() if k == kind and (namespace is None or ns == namespace)]

    def get(self, kind: str, namespace: str, name: str):
        return self.objects.get((kind, namespace, name))

    def replace_all(self, objects: Iterable[Resource]) -> None:
        self.objects = {key_of(o): o for o in objects}
