"""The authenticated bus the benchmarks run on, the way local mode and the tests run it
(tests/bus_support.py): a real nats-server with the mesh's generated authorization (no
anonymous client), a Bus per control-plane role from its own nkey seed, and — when proxies
take part — the real identity service answering their certify requests *and* their bus
logins (NATS auth callout) with local workload tokens.

    mesh = BenchMesh(directory, cpus={0}).start()      # NATS only
    mesh.start_identity(spawn)                          # + identity (issuer, callout), for proxies
    env = mesh.proxy_env(ns, workload, sa)              # what a `python -m proxy` needs for the bus
    bus = mesh.bus("destination")                       # write endpoints/profiles as destination would
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from tulle import pki
from tulle.bus import Bus
from tulle.natsserver import NatsServer, free_port

TRUST_DOMAIN = "cluster.local"
AUDIENCE = f"identity.tulle.{TRUST_DOMAIN}"


class BenchMesh:
    def __init__(self, directory: Path, cpus: set[int] | None = None):
        self.dir = Path(directory)
        self.cpus = cpus
        self.nats = NatsServer(self.dir / "nats")
        self.issuer_dir = self.dir / "issuer"
        self.anchor_pem = b""
        self.issuer: pki.CA | None = None
        self.token_secret = b""

    @property
    def url(self) -> str:
        return self.nats.url

    def start(self) -> "BenchMesh":
        self.nats.start()
        if self.cpus:
            for task in os.listdir(f"/proc/{self.nats.proc.pid}/task"):
                try:
                    os.sched_setaffinity(int(task), self.cpus)
                except OSError:
                    pass
        return self

    def stop(self) -> None:
        self.nats.stop()

    def bus(self, role: str, **kw) -> Bus:
        """A Bus (not started) with a control-plane role's own credential."""
        return Bus(self.url, component=kw.pop("component", f"bench-{role}"), credentials=self.nats.credentials(role),
                   **kw)

    def role_args(self, role: str) -> list[str]:
        """`--nats URL --nats-creds SEED` for a service process of that role."""
        return ["--nats", self.url, "--nats-creds", str(self.nats.seed_file(role))]

    # --- identity and workloads ---------------------------------------------------------------

    def make_identity(self) -> None:
        """A trust anchor, an issuer under it and the token secret (as local mode makes them)."""
        anchor = pki.new_trust_anchor(TRUST_DOMAIN)
        self.issuer = pki.new_issuer(anchor, TRUST_DOMAIN)
        d = self.issuer_dir
        d.mkdir(parents=True, exist_ok=True)
        (d / "ca.crt").write_bytes(anchor.cert_pem)
        (d / "issuer.crt").write_bytes(self.issuer.cert_pem)
        (d / "issuer.key").write_bytes(self.issuer.key_pem)
        os.chmod(d / "issuer.key", 0o600)
        self.anchor_pem = anchor.cert_pem
        secret_file = d / "token-secret"
        secret_file.write_bytes(pki.new_token_secret().hex().encode())  # the file's bytes are the secret
        os.chmod(secret_file, 0o600)
        self.token_secret = secret_file.read_bytes()

    def identity_cmd(self, admin_port: int | None = None) -> list[str]:
        """`python -m services.identity` issuing certificates and answering proxies' bus logins."""
        if self.issuer is None:
            self.make_identity()
        self.identity_admin = admin_port or free_port()
        return [sys.executable, "-m", "services.identity", *self.role_args("identity"),
                "--admin", f"127.0.0.1:{self.identity_admin}", "--issuer-dir", str(self.issuer_dir),
                "--token-secret-file", str(self.issuer_dir / "token-secret"), "--trust-domain", TRUST_DOMAIN,
                "--callout-issuer-seed", str(self.nats.callout_issuer_seed_file),
                "--callout-creds", str(self.nats.seed_file("callout")), "--log-format", "json"]

    def start_identity(self, spawn: Callable[[str, list[str]], object], timeout: float = 60.0) -> object:
        """Start identity through the caller's `spawn(name, cmd)` (which pins and logs it), and
        wait until it answers: as local mode, proxies start only once their logins can be
        answered (auth callout) and their certificates issued."""
        proc = spawn("identity", self.identity_cmd())
        url = f"http://127.0.0.1:{self.identity_admin}/ready"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the identity service did not get ready in {timeout:g}s")
            time.sleep(0.1)

    def token_file(self, namespace: str, workload: str, sa: str) -> Path:
        path = self.dir / "tokens" / f"{namespace}.{workload}.token"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(pki.make_local_token(self.token_secret, namespace, sa, workload, AUDIENCE))
        return path

    def proxy_env(self, namespace: str, workload: str, sa: str) -> dict[str, str]:
        """The bus and trust part of a proxy's environment (the rest is the caller's)."""
        return {
            "TULLE_NATS_URL": self.url, "TULLE_PROXY_NAMESPACE": namespace, "TULLE_PROXY_WORKLOAD": workload,
            "TULLE_PROXY_SERVICE_ACCOUNT": sa, "TULLE_PROXY_TRUST_DOMAIN": TRUST_DOMAIN,
            "TULLE_PROXY_TOKEN_FILE": str(self.token_file(namespace, workload, sa)),
            "TULLE_PROXY_IDENTITY_TRUST_ANCHORS": self.anchor_pem.decode(),
        }
