"""`python -m services.<name>` as a real process in tests: its admin port, its log,
readiness, metrics and how it stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tests.conftest import REPO, wait_until
from tulle.metrics import sample
from tulle.natsserver import free_port


class ServiceProcess:
    def __init__(self, name: str, nats_url: str, args: list[str], log: Path, env: Optional[dict] = None):
        self.name = name
        self.admin_port = free_port()
        self.log = log
        from tests.bus_support import server_for

        # Each service connects with its own role's credential, as in a deployment.
        creds = {"TULLE_NATS_CREDS": str(server_for(nats_url).seed_file(name))}
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **creds, **(env or {})}
        self.cmd = [sys.executable, "-m", f"services.{name}", "--nats", nats_url,
                    "--admin", f"127.0.0.1:{self.admin_port}", "--log-format", "json", *args]
        self.proc: Optional[subprocess.Popen] = None

    def start(self):
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env)
        return self

    def get(self, path: str) -> tuple[int, str]:
        """(HTTP status, body) of an admin path; (0, "") when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    _get = get

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """Whether /ready answers 200; fails the test at once if the process died."""
        if self.proc is not None and not self.alive():
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        return self.get("/ready")[0] == 200

    def wait_ready(self, timeout: float = 20) -> None:
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        wait_until(self.ready, timeout, 0.05, f"{self.name} ready ({self.log})")

    async def ready_soon(self, timeout: float = 20) -> None:
        """`wait_ready` for async tests: the test's own event loop keeps running meanwhile."""
        await asyncio.to_thread(self._wait_ready, timeout)

    def metric(self, name: str, **labels: str) -> float:
        status, text = self.get("/metrics")
        assert status == 200, f"metrics: HTTP {status}"
        return sample(text, name, **labels)

    def is_leader(self) -> bool:
        return self.metric("tulle_leader", lease=self.name) == 1

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def stop(self, grace: float = 10) -> Optional[int]:
        """SIGTERM, then SIGKILL after `grace`; the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc is not None else None
