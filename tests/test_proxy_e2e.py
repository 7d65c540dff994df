"""End to end with real processes only: nats-server, the identity service, two
`python -m proxy` certified by it, mTLS between them, curl as the client."""

import asyncio
import os
import shutil
import subprocess
import sys

import pytest

from tests.bus_support import TESTER, bus_for
from tests.conftest import REPO
from tests.identity_support import IdentityProcess, make_issuer_dir, token_file, token_secret
from tests.proxy_support import AppServer, put_policy, unique_ns, workload_policy
from tulle import schemas
from tulle.bus import Bus
from tulle.metrics import sample
from tulle.natsserver import free_port

TULLE = str(REPO / ".venv" / "bin" / "tulle")


def start_proxy(nats_url, ns, sa, token, log, anchors_pem: bytes, **ports):
    env = {
        "TULLE_PROXY_IDENTITY_TRUST_ANCHORS": anchors_pem.decode(),
        **os.environ, "PYTHONPATH": str(REPO), "TULLE_NATS_URL": nats_url, "TULLE_PROXY_NAMESPACE": ns,
        "TULLE_PROXY_WORKLOAD": f"{sa}-0", "TULLE_PROXY_SERVICE_ACCOUNT": sa, "TULLE_PROXY_TOKEN_FILE": token,
        "TULLE_PROXY_INBOUND_ADDR": f"127.0.0.1:{ports['inbound']}", "TULLE_PROXY_OUTBOUND_ADDR": f"127.0.0.1:{ports['outbound']}",
        "TULLE_PROXY_ADMIN_ADDR": f"127.0.0.1:{ports['admin']}", "TULLE_PROXY_TRANSPARENT": "false",
        "TULLE_LOG_FORMAT": "json",
    }
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "proxy"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


async def publish(nats_url, ns, app_port, inbound_port, identity):
    bus = bus_for(nats_url, TESTER, component="test-destination")
    await bus.start()
    await bus.put(schemas.ENDPOINTS_BUCKET, schemas.endpoints_key(ns, "web", app_port), schemas.EndpointSet(
        namespace=ns, service="web", port=app_port,
        endpoints=[schemas.Endpoint(address="127.0.0.1", port=app_port, identity=identity, proxy_port=inbound_port)]))
    await bus.close()


async def publish_policies(nats_url, ns):
    bus = bus_for(nats_url, TESTER, component="test-policy")
    await bus.start()
    for sa in ("web", "client"):
        await put_policy(bus, workload_policy(ns, f"{sa}-0"))
    await bus.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (make test installs it via apt-get as root)")
def test_two_proxy_processes_certified_by_the_identity_service_carry_curl_over_mtls(nats_server, tmp_path):
    ns = unique_ns()
    issuer = make_issuer_dir(tmp_path / "issuer")
    secret = token_secret(tmp_path / "secret", nats_server.token_secret)
    identity = IdentityProcess(nats_server.url, issuer.path, tmp_path / "secret", tmp_path / "identity.log").start()
    app = AppServer("web")
    procs = []
    try:
        identity.wait_ready()
        asyncio.run(publish_policies(nats_server.url, ns))  # each proxy is ready once its policy arrived
        server_ports = {"inbound": free_port(), "outbound": free_port(), "admin": free_port()}
        client_ports = {"inbound": free_port(), "outbound": free_port(), "admin": free_port()}
        procs.append(start_proxy(nats_server.url, ns, "web", token_file(tmp_path / "web.token", secret, ns, "web", "web-0"),
                                 tmp_path / "server.log", issuer.anchor.cert_pem, **server_ports))
        procs.append(start_proxy(nats_server.url, ns, "client", token_file(tmp_path / "c.token", secret, ns, "client", "client-0"),
                                 tmp_path / "client.log", issuer.anchor.cert_pem, **client_ports))
        for ports in (server_ports, client_ports):
            out = subprocess.run([TULLE, "proxy", "await", "--timeout", "60s", "--admin-addr", f"127.0.0.1:{ports['admin']}"],
                                 capture_output=True, text=True, timeout=90)
            assert out.returncode == 0, out.stderr + (tmp_path / "server.log").read_text()[-2000:]
        server_id = schemas.identity_name("web", ns)
        asyncio.run(publish(nats_server.url, ns, app.port, server_ports["inbound"], server_id))

        out = subprocess.run(["curl", "-sS", "-i", "--max-time", "20", "-x", f"http://127.0.0.1:{client_ports['outbound']}",
                              "-H", "tulle-client-id: spoofed", f"http://web.{ns}:{app.port}/hello"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("HTTP/1.1 200") and out.stdout.endswith("web")
        seen = app.seen[-1]
        assert seen.path == "/hello" and seen.all("tulle-client-id") == [schemas.identity_name("client", ns)]

        metrics = subprocess.run(["curl", "-sS", f"http://127.0.0.1:{server_ports['admin']}/metrics"],
                                 capture_output=True, text=True, timeout=10).stdout
        assert sample(metrics, "request_total", direction="inbound", tls="true",
                      client_id=schemas.identity_name("client", ns)) == 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                assert p.wait(20) == 0
            except subprocess.TimeoutExpired:
                p.kill()
        identity.stop()
        app.close()
