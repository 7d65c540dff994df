"""Find the running local mode from any `tulle` command, so `tulle events` (or any other
command that talks to NATS) works with no flag after `tulle up`."""

from __future__ import annotations

import os
from typing import Optional

from tulle.local.state import StateDir, process_alive, read_record


def local_nats_url(state_dir: Optional[str] = None) -> Optional[str]:
    """The NATS URL of the local mode running from `state_dir` (default TULLE_STATE_DIR or
    ~/.local/state/tulle), or None when none runs there."""
    record = read_record(StateDir.at(state_dir))
    if not record:
        return None
    nats = record.get("nats") or {}
    if not nats.get("url") or not process_alive(nats.get("pid"), nats.get("start")):
        return None
    return nats["url"]


def nats_url_for_cli(explicit: Optional[str] = None) -> str:
    """What a CLI command should connect to: --nats, else TULLE_NATS_URL, else the local
    mode's NATS, else the default nats://127.0.0.1:4222."""
    from tulle.bus import DEFAULT_URL

    return explicit or os.environ.get("TULLE_NATS_URL") or local_nats_url() or DEFAULT_URL
