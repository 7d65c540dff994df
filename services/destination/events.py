"""The destination's CloudEvents: what changed in an endpoint set, for external tools."""

from __future__ import annotations

from typing import Optional

from tulle import schemas
from tulle.codec import DecodeError, decode
from tulle.kvwriter import Key

def _addresses(raw: Optional[bytes]) -> set[str]:
    if raw is None:
        return set()
    try:
        es = decode(schemas.EndpointSet, raw)
    except DecodeError:
        return set()
    return {f"[{e.address}]:{e.port}" if ":" in e.address else f"{e.address}:{e.port}" for e in es.endpoints}


def endpoints_changed_event(key: Key, old: Optional[bytes], new: Optional[bytes]) -> Optional[dict]:
    """The data of a `destination.endpoints-changed` event for a write, or None when the
    key is not a service's endpoint set (profiles, cluster-IP aliases of the same set)."""
    bucket, name = key
    if bucket != schemas.ENDPOINTS_BUCKET or name.startswith("_ip."):
        return None
    parts = name.rsplit(".", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None  # not a key destination writes (a stray one it is cleaning up): no event
    namespace, service, port = parts
    before, after = _addresses(old), _addresses(new)
    return {"namespace": namespace, "service": service, "port": int(port), "key": name,
            "added": sorted(after - before), "removed": sorted(before - after),
            "endpoints": len(after), "deleted": new is None}
