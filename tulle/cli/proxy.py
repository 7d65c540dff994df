"""`tulle proxy run` (= python -m proxy) and `tulle proxy await` (start-up ordering).

`await` is what a Kubernetes postStart hook (or the local runner) calls so the app
container starts only once its proxy answers /ready — Linkerd's linkerd-await.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import click

from tulle.errors import UserError


def _duration(value: str, name: str) -> float:
    from tulle.durations import seconds as parse_seconds

    seconds = parse_seconds(value, name)
    if seconds <= 0:
        raise UserError(f"{name}: must be positive, got {value!r}")
    return seconds


def _addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--admin-addr: expected host:port, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return ("127.0.0.1" if host == "0.0.0.0" else host), int(port)


def ready_status(host: str, port: int, timeout: float = 1.0) -> int:
    """The HTTP status of GET /ready (0 when nothing answers)."""
    url = f"http://{host}:{port}/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return 0


def wait_ready(host: str, port: int, timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if ready_status(host, port) == 200:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(interval_s, max(deadline - time.monotonic(), 0)))


@click.group()
def proxy():
    """Run the data-plane proxy, or wait for it to be ready."""


@proxy.command("run")
def run():
    """Run the proxy (configured by TULLE_PROXY_* environment variables, as `python -m proxy`)."""
    import os
    import sys

    # The same process becomes `python -m proxy`: a fresh interpreter without the CLI's modules
    # (click, rich ...), which would otherwise stay in every proxy's memory.
    os.execv(sys.executable, [sys.executable, "-m", "proxy"])


@proxy.command("await")
@click.option("--timeout", "timeout", default="120s", show_default=True,
              help="how long to wait, e.g. 2m, 30s")
@click.option("--admin-addr", default="127.0.0.1:4191", show_default=True, help="the proxy's admin address")
def await_(timeout: str, admin_addr: str):
    """Wait until the local proxy is ready (/ready answers 200); exit 1 on timeout."""
    seconds = _duration(timeout, "--timeout")
    host, port = _addr(admin_addr)
    if not wait_ready(host, port, seconds):
        status = ready_status(host, port)
        what = "not reachable" if status == 0 else f"answered {status}"
        click.echo(f"tulle: the proxy at {host}:{port} is not ready after {timeout} (/ready {what})", err=True)
        raise SystemExit(1)
    click.echo(f"proxy at {host}:{port} is ready")
