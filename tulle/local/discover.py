"""Find the running local mode from any `tulle` command, so `tulle events` (or any other
command that reads the bus) works with no flag after `tulle up`: its NATS URL and the
observer credential it made for readers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from tulle.local.state import StateDir, nats_nodes, process_alive, read_record


@dataclass(frozen=True)
class LocalBus:
    url: str
    observer_creds: str  # the observer role's nkey seed file
    ca: str = ""  # NATS's CA, when the bus uses TLS


def local_bus(state_dir: Optional[str] = None) -> Optional[LocalBus]:
    """The bus of the local mode running from `state_dir` (default TULLE_STATE_DIR or
    ~/.local/state/tulle), or None when none runs there."""
    record = read_record(StateDir.at(state_dir))
    if not record:
        return None
    nats = record.get("nats") or {}
    # A cluster serves as long as one of its nodes runs (a client is given every node).
    if not nats.get("url") or not any(process_alive(n.get("pid"), n.get("start")) for n in nats_nodes(record)):
        return None
    return LocalBus(nats["url"], nats.get("observer_creds", ""), nats.get("ca", ""))


def local_nats_url(state_dir: Optional[str] = None) -> Optional[str]:
    found = local_bus(state_dir)
    return found.url if found else None


def nats_url_for_cli(explicit: Optional[str] = None) -> str:
    """What a CLI command should connect to: --nats, else TULLE_NATS_URL, else the local
    mode's NATS, else the default nats://127.0.0.1:4222."""
    from tulle.bus import DEFAULT_URL

    return explicit or os.environ.get("TULLE_NATS_URL") or local_nats_url() or DEFAULT_URL
