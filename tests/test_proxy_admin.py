"""The admin server (/live, /ready, /metrics, /shutdown), the heartbeat, graceful
shutdown of a real `python -m proxy` process, and `tulle proxy await`."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


from proxy.admin import make_admin
from tests.conftest import REPO, wait_until
from tests.bus_support import server_for
from tulle import pki
from tests.proxy_support import (
    AppServer, KV, Mesh, NotYetIdentity, Proxy, http_request, proxy_config, unique_ns, workload_policy,
)
from tulle import schemas
from tulle.admin import AdminRequest
from tulle.metrics import Registry, sample
from tulle.natsserver import free_port


def publish_policy(lt, nats_url: str, ns: str, workload: str) -> None:
    kv = KV(lt, nats_url)
    try:
        kv.put_policy(workload_policy(ns, workload))
    finally:
        kv.close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_live_always_and_ready_only_with_a_certificate_and_the_bus(lt, nats_server):
    ns = unique_ns()
    publish_policy(lt, nats_server.url, ns, "web-1")  # (not ready without it: tests/test_proxy_policy.py)
    ident = NotYetIdentity(schemas.identity_name("web", ns))
    p = Proxy(lt, proxy_config(nats_server.url, ns, "web-1", "web"), ident)
    try:
        assert get(p.admin, "/live") == (200, "live\n")
        assert get(p.admin, "/ready") == (503, "not ready\n")
        certified = Mesh().identity("web", ns)
        for attr in ("server_context", "client_context", "expiry", "serial"):
            setattr(ident, attr, getattr(certified, attr))
        ident.ready = True
        wait_until(lambda: get(p.admin, "/ready")[0] == 200, what="ready once certified")
    finally:
        p.stop()


def test_not_ready_until_the_bus_was_reached_once(lt):
    ns = unique_ns()
    dead = f"nats://127.0.0.1:{free_port()}"
    p = Proxy(lt, proxy_config(dead, ns, "web-1", "web"), Mesh().identity("web", ns))
    try:
        assert get(p.admin, "/ready")[0] == 503
    finally:
        p.stop()


def test_metrics_are_prometheus_text_with_resolved_labels_only(lt, nats_server):
    ns = unique_ns()
    app = AppServer()
    p = Proxy(lt, proxy_config(nats_server.url, ns, "c", "c"), Mesh().identity("c", ns))
    try:
        http_request(p.outbound, host=f"127.0.0.1:{app.port}")
        http_request(p.outbound, host=f"no-such-{ns}.example.invalid:80")  # DNS fails: 502
        status, text = get(p.admin, "/metrics")
        assert status == 200
        assert sample(text, "request_total", direction="outbound") == 2
        assert sample(text, "response_total", direction="outbound", status_code="200", classification="success") == 1
        assert sample(text, "response_total", direction="outbound", status_code="502", classification="failure") == 1
        assert sample(text, "response_latency_ms_count", direction="outbound") == 2
        assert "example.invalid" not in text and f"127.0.0.1:{app.port}" not in text  # no raw Host in labels
    finally:
        p.stop()
        app.close()


def test_heartbeat_is_written_to_tulle_proxies(lt, nats_server):
    ns = unique_ns()
    ident = Mesh().identity("web", ns)
    p = Proxy(lt, proxy_config(nats_server.url, ns, "web-7", "web"), ident)
    kv = KV(lt, nats_server.url)
    kv.put_policy(workload_policy(ns, "web-7"))
    try:
        def beat():
            return lt.call(kv.bus.get(schemas.PROXIES_BUCKET, schemas.proxy_key(ns, "web-7"), schemas.ProxyHeartbeat))
        hb = wait_until(lambda: (b := beat()) is not None and b.ready and b, what="a ready heartbeat")
        assert hb.identity == ident.identity and hb.workload == "web-7" and hb.cert_expiry == ident.expiry
        assert hb.admin.endswith(f":{p.admin}") and hb.pid == os.getpid()
    finally:
        p.stop()
        kv.close()


def test_shutdown_endpoint_is_disabled_by_default(lt, nats_server):
    ns = unique_ns()
    p = Proxy(lt, proxy_config(nats_server.url, ns, "w", "w"), Mesh().identity("w", ns))
    try:
        assert get(p.admin, "/shutdown", "POST") == (404, "shutdown endpoint is not enabled\n")
    finally:
        p.stop()


def test_shutdown_endpoint_when_enabled_takes_post_from_loopback_only():
    called = []
    admin = make_admin("127.0.0.1", 0, ready=lambda: True, registry=Registry(), shutdown_enabled=True,
                       on_shutdown=lambda: called.append(1))
    handler = admin.routes["/shutdown"]

    def call(method, peer):
        return asyncio.run(handler(AdminRequest(method, "/shutdown", "", {}, peer)))

    assert call("POST", "10.1.2.3").status == 403 and not called
    assert call("GET", "127.0.0.1").status == 405 and not called
    assert call("POST", "127.0.0.1").status == 200 and called == [1]
    assert call("POST", "::1").status == 200


# --- a real proxy process -------------------------------------------------------------------------


class ProxyProcess:
    def __init__(self, nats_url: str, tmp_path, **env):
        self.ns = unique_ns()
        self.outbound, self.inbound, self.admin = free_port(), free_port(), free_port()
        self.log = tmp_path / "proxy.log"
        self.env = {
            **os.environ, "PYTHONPATH": str(REPO), "TULLE_NATS_URL": nats_url,
            "TULLE_PROXY_NAMESPACE": self.ns, "TULLE_PROXY_WORKLOAD": "w-1", "TULLE_PROXY_SERVICE_ACCOUNT": "w",
            "TULLE_PROXY_OUTBOUND_ADDR": f"127.0.0.1:{self.outbound}", "TULLE_PROXY_INBOUND_ADDR": f"127.0.0.1:{self.inbound}",
            "TULLE_PROXY_ADMIN_ADDR": f"127.0.0.1:{self.admin}", "TULLE_PROXY_TRANSPARENT": "false",
            "TULLE_LOG_FORMAT": "json",
            "TULLE_PROXY_IDENTITY_TRUST_ANCHORS": pki.new_trust_anchor().cert_pem.decode(),
            "TULLE_PROXY_TOKEN_FILE": server_for(nats_url).token_file(self.ns, "w-1", "w"), **env,
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "proxy"], cwd=REPO, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: self._live(), what="the proxy process answering /live")

    def _live(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"proxy exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            return get(self.admin, "/live")[0] == 200
        except OSError:
            return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_sigterm_stops_accepting_and_lets_an_in_flight_request_finish(nats_server, tmp_path):
    app = AppServer("slow")
    p = ProxyProcess(nats_server.url, tmp_path, TULLE_PROXY_SHUTDOWN_GRACE_PERIOD="30s")
    try:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=http_request(p.outbound, path="/slow/1.5",
                                                                          host=f"127.0.0.1:{app.port}")))
        t.start()
        wait_until(lambda: any(s.path == "/slow/1.5" for s in app.seen), what="the slow request reaching the app")
        p.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refused(p.outbound), what="the outbound listener closed")
        t.join(10)
        assert result["r"][0] == 200 and result["r"][2] == b"slow"
        assert p.proc.wait(10) == 0
    finally:
        p.stop()
        app.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_post_shutdown_from_loopback_stops_the_process_when_enabled(nats_server, tmp_path):
    p = ProxyProcess(nats_server.url, tmp_path, TULLE_PROXY_SHUTDOWN_ENDPOINT="true")
    try:
        assert get(p.admin, "/shutdown", "GET")[0] == 405
        assert get(p.admin, "/shutdown", "POST") == (200, "shutdown\n")
        assert p.proc.wait(15) == 0
    finally:
        p.stop()


def test_bad_configuration_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TULLE_PROXY_NAMESPACE": "a", "TULLE_PROXY_WORKLOAD": "b",
           "TULLE_PROXY_OUTBOUND_ADDR": "nonsense"}
    out = subprocess.run([sys.executable, "-m", "proxy"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["tulle proxy: TULLE_PROXY_OUTBOUND_ADDR: expected host:port, got 'nonsense'"]


# --- tulle proxy await ------------------------------------------------------------------------------


TULLE = str(REPO / ".venv" / "bin" / "tulle")


def tulle(*args, timeout=30):
    return subprocess.run([TULLE, *args], capture_output=True, text=True, timeout=timeout)


def test_tulle_proxy_await_returns_once_the_proxy_is_ready(lt, nats_server):
    ns = unique_ns()
    publish_policy(lt, nats_server.url, ns, "web-1")
    ident = NotYetIdentity(schemas.identity_name("web", ns))
    p = Proxy(lt, proxy_config(nats_server.url, ns, "web-1", "web"), ident)
    try:
        waiter = subprocess.Popen([TULLE, "proxy", "await", "--timeout", "30s",
                                   "--admin-addr", f"127.0.0.1:{p.admin}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        time.sleep(0.3)
        assert waiter.poll() is None  # still waiting: not ready yet
        certified = Mesh().identity("web", ns)
        for attr in ("server_context", "client_context", "expiry", "serial"):
            setattr(ident, attr, getattr(certified, attr))
        ident.ready = True
        out, err = waiter.communicate(timeout=20)
        assert waiter.returncode == 0 and "is ready" in out
    finally:
        p.stop()


def test_tulle_proxy_await_times_out_with_one_line(lt, nats_server):
    port = free_port()
    out = tulle("proxy", "await", "--timeout", "0.3s", "--admin-addr", f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert out.stderr.strip() == f"tulle: the proxy at 127.0.0.1:{port} is not ready after 0.3s (/ready not reachable)"


def test_tulle_proxy_await_refuses_a_bad_flag():
    out = tulle("proxy", "await", "--timeout", "soon")
    assert out.returncode == 2 and out.stderr.startswith("tulle: --timeout") and "Traceback" not in out.stderr
