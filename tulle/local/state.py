"""The state directory of local mode, its run record and its lock.

Layout of `<state>` (default `~/.local/state/tulle`, or TULLE_STATE_DIR):

    tulle.lock          flock held by the running supervisor for its whole life
    run.json            the run record: every pid, address, namespace, the subnet ...
    nats/               the embedded NATS server's JetStream store and config
    logs/<name>.log     one log per component, workload and proxy
    runtime/            the Pod manifests of running workloads (read by the services)
    identity/           ca.crt, issuer.crt, issuer.key, token-secret, tokens/

The lock is an flock on an open file: the kernel drops it when the holder dies, so a
crashed supervisor never leaves a lock behind (only, maybe, a stale record).
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

RECORD_VERSION = 1


def default_state_dir() -> Path:
    env = os.environ.get("TULLE_STATE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tulle"


@dataclass(frozen=True)
class StateDir:
    root: Path

    @classmethod
    def at(cls, path: str | Path | None) -> "StateDir":
        return cls(Path(path).expanduser().resolve() if path else default_state_dir().resolve())

    @property
    def lock_file(self) -> Path:
        return self.root / "tulle.lock"

    @property
    def record_file(self) -> Path:
        return self.root / "run.json"

    @property
    def nats_dir(self) -> Path:
        return self.root / "nats"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def runtime(self) -> Path:
        return self.root / "runtime"

    @property
    def identity(self) -> Path:
        return self.root / "identity"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def make(self) -> None:
        for d in (self.root, self.nats_dir, self.logs, self.runtime, self.identity):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.identity, 0o700)


# --- the lock -------------------------------------------------------------------------------


class AlreadyRunning(Exception):
    def __init__(self, pid: Optional[int], state_dir: Path):
        self.pid, self.state_dir = pid, state_dir
        super().__init__(f"tulle is already running (pid {pid if pid else '?'}, state dir {state_dir}); "
                         "run `tulle down` first")


def acquire_lock(state: StateDir) -> int:
    """Take the run lock without waiting; returns its fd (keep it open: closing releases it).

    The fd is inheritable so the detached supervisor can take it over from the CLI.
    """
    state.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(state.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(lock_holder(state), state.root) from None
    os.set_inheritable(fd, True)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def note_lock_holder(fd: int) -> None:
    """Write the current pid into the lock file (after the supervisor took the lock over)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def lock_held(state: StateDir) -> bool:
    try:
        fd = os.open(state.lock_file, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our own probe lock
    return False


def lock_holder(state: StateDir) -> Optional[int]:
    try:
        text = state.lock_file.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# --- the run record ---------------------------------------------------------------------------


def read_record(state: StateDir) -> Optional[dict[str, Any]]:
    try:
        data = json.loads(state.record_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
        return None
    return data


def write_record(state: StateDir, record: dict[str, Any]) -> None:
    """Atomically: readers never see half a record."""
    tmp = state.record_file.with_name(f".{state.record_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, state.record_file)


def remove_record(state: StateDir) -> None:
    state.record_file.unlink(missing_ok=True)


# --- process identity (a pid alone may have been reused) ----------------------------------------


def process_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def nats_nodes(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The NATS servers a run record names, each as {name, pid, start, url, log, restarts,
    health}: the one server (`nats`), or each node of `tulle up --nats-cluster N` (`nats-0` ...)."""
    nats = record.get("nats") or {}
    if not nats:
        return []
    if "nodes" in nats:
        return [dict(n) for n in nats["nodes"] or []]
    return [{"name": "nats", "pid": nats.get("pid"), "start": nats.get("start"), "url": nats.get("url", ""),
             "log": nats.get("log", ""), "restarts": nats.get("restarts", 0), "health": ""}]


def process_alive(pid: Optional[int], start: Optional[int] = None) -> bool:
    """Whether the process we recorded (pid + start time) still runs (zombies count as gone)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat[stat.rindex(")") + 2:].split()[0]
    if state in ("Z", "X"):
        return False
    return start is None or process_start(pid) == start
