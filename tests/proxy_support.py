"""Helpers for the proxy tests: real certificates, proxies on a background uvloop thread,
endpoint sets written to real NATS KV, and small real upstream servers.

The proxies run in their own event loop thread so tests can use blocking clients
(raw sockets, http.client, curl) exactly as an application would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import http.client
import http.server
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import uuid
import weakref
from typing import Any, Callable

import uvloop

from proxy.app import ProxyApp
from proxy.config import ProxyConfig
from tulle import pki, schemas
from tulle.bus import Bus
from tulle.metrics import Registry, sample
from tests.bus_support import _SERVERS, TESTER, bus_for, server_for


# --- identities ----------------------------------------------------------------------------


class Mesh:
    """A trust anchor and issuer, like one cluster's identity service would hold."""

    def __init__(self, trust_domain: str = "cluster.local"):
        self.anchor = pki.new_trust_anchor(trust_domain)
        self.issuer = pki.new_issuer(self.anchor, trust_domain)

    def identity(self, sa: str, ns: str) -> "StaticIdentity":
        return StaticIdentity(self, schemas.identity_name(sa, ns))


class StaticIdentity:
    """Real certificates from tulle.pki behind the attributes of proxy.identity.IdentityClient."""

    def __init__(self, mesh: Mesh, identity: str, *, presents: str | None = None):
        cert, key = pki.issue_leaf(mesh.issuer, presents or identity)
        chain = pki.cert_pem(cert) + mesh.issuer.cert_pem
        anchors = mesh.anchor.cert_pem
        self.identity = identity
        self.server_context = pki.ssl_context_from_pem(server=True, cert_chain_pem=chain, key_pem_bytes=pki.key_pem(key),
                                                       anchors_pem=anchors)
        self.client_context = pki.ssl_context_from_pem(server=False, cert_chain_pem=chain,
                                                       key_pem_bytes=pki.key_pem(key), anchors_pem=anchors)
        self.expiry = cert.not_valid_after_utc.timestamp()
        self.serial = pki.serial_hex(cert)
        self.ready = True


class NotYetIdentity:
    """An identity client that has no certificate (yet)."""

    def __init__(self, identity: str):
        self.identity = identity
        self.server_context = None
        self.client_context = None
        self.expiry = 0.0
        self.serial = ""
        self.ready = False


# --- the proxies' event loop ------------------------------------------------------------------


class LoopThread:
    def __init__(self):
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="proxy-loop")
        self.thread.start()

    def call(self, coro, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run a plain function in the loop thread (to read loop-owned state safely)."""
        async def wrapper():
            return fn()
        return self.call(wrapper(), timeout)

    def stop(self) -> None:
        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self.call(cancel_all(), 10)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def proxy_config(nats_url: str, namespace: str = "default", workload: str = "client", sa: str = "default",
                 **overrides) -> ProxyConfig:
    base = dict(
        namespace=namespace, workload=workload, service_account=sa, nats_url=nats_url,
        inbound_addr=("127.0.0.1", 0), outbound_addr=("127.0.0.1", 0), admin_addr=("127.0.0.1", 0),
        transparent=False, app_host="127.0.0.1", header_read_timeout_s=5.0, shutdown_grace_s=5.0,
        # Most tests publish no policy for their proxies: judge by the default at once
        # (tests of the wait before the first policy set it).
        policy_wait_s=0.0,
    )
    base.update(overrides)
    if "token_file" not in overrides and nats_url in _SERVERS:  # its bus login: the workload's token (auth callout)
        base["token_file"] = server_for(nats_url).token_file(namespace, workload, sa)
    return ProxyConfig(**base)


class Proxy:
    """One ProxyApp running in the LoopThread, with its own metrics registry."""

    def __init__(self, lt: LoopThread, cfg: ProxyConfig, identity: Any, policy: Any = None):
        self.lt = lt
        self.cfg = cfg
        self.registry = Registry()
        self.app: ProxyApp | None = None

        async def start():
            self.app = ProxyApp(cfg, identity=identity, registry=self.registry, policy=policy)
            await self.app.start()
        lt.call(start())

    @property
    def outbound(self) -> int:
        return self.app.outbound_port

    @property
    def inbound(self) -> int:
        return self.app.inbound_port

    @property
    def admin(self) -> int:
        return self.app.admin_port

    def metrics(self) -> str:
        return self.lt.run(self.registry.render)

    def metric(self, name: str, **labels: str) -> float:
        return sample(self.metrics(), name, **labels)

    def stop(self) -> None:
        if self.app is not None:
            self.lt.call(self.app.shutdown())


class KV:
    """Writes endpoint sets and profiles into the real NATS KV from the loop thread."""

    def __init__(self, lt: LoopThread, nats_url: str):
        self.lt = lt
        self.bus = bus_for(nats_url, TESTER, component="test-destination")
        lt.call(self.bus.start())

    def put(self, key: str, value: Any, bucket: str = schemas.ENDPOINTS_BUCKET) -> None:
        self.lt.call(self.bus.put(bucket, key, value))

    def put_policy(self, policy: schemas.WorkloadPolicy) -> None:
        self.lt.call(put_policy(self.bus, policy))

    def delete(self, key: str, bucket: str = schemas.ENDPOINTS_BUCKET) -> None:
        self.lt.call(self.bus.delete(bucket, key))

    def close(self) -> None:
        try:
            self.lt.call(self.bus.close(), 5)
        except Exception:
            pass


def workload_policy(ns: str, workload: str, default: str = "all-unauthenticated",
                    ports: list[schemas.PortPolicy] | None = None,
                    cluster_networks: tuple[str, ...] = schemas.DEFAULT_CLUSTER_NETWORKS) -> schemas.WorkloadPolicy:
    """A workload's inbound policy as the policy service writes it (a proxy is ready only
    once its own has arrived)."""
    from tulle.policy import default_port_policy

    return schemas.WorkloadPolicy(namespace=ns, workload=workload, default_policy=default,
                                  default=default_port_policy(default, cluster_networks), ports=list(ports or []),
                                  cluster_networks=list(cluster_networks))


async def put_policy(bus: Bus, policy: schemas.WorkloadPolicy) -> None:
    await bus.put(schemas.POLICY_BUCKET, schemas.policy_key(policy.namespace, policy.workload), policy)


def unique_ns() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def endpoint_set(ns: str, svc: str, port: int, endpoints: list[schemas.Endpoint], **kw) -> schemas.EndpointSet:
    return schemas.EndpointSet(namespace=ns, service=svc, port=port, endpoints=endpoints, **kw)


def meshed_endpoint(app_port: int, inbound_port: int, identity: str, address: str = "127.0.0.1") -> schemas.Endpoint:
    """An endpoint behind a proxy reached directly at its inbound port (local mode, no iptables)."""
    return schemas.Endpoint(address=address, port=app_port, identity=identity, proxy_port=inbound_port)


# --- upstream servers --------------------------------------------------------------------------


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    peer: tuple

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class AppServer:
    """A threaded HTTP/1.1 server (keep-alive) that records what reaches it.

    Paths: /echo returns the request body; /status/<n> answers with that status; /slow/<s>
    sleeps before answering; /big/<n> sends n bytes; anything else answers `name`.
    """

    def __init__(self, name: str = "app", host: str = "127.0.0.1"):
        self.name = name
        self.seen: list[Seen] = []
        self.connections: list[tuple] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            wbufsize = -1  # one write per response (flushed after each request)

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                outer.connections.append(self.client_address)

            def _handle(self):
                length = self.headers.get("content-length")
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    body = self._read_chunked()
                elif length:
                    body = self.rfile.read(int(length))
                else:
                    body = b""
                outer.seen.append(Seen(self.command, self.path, self.request_version, list(self.headers.items()), body,
                                       self.client_address))
                parts = self.path.split("/")
                status, payload, extra = 200, outer.name.encode(), {}
                if self.path == "/echo":
                    payload = body
                elif len(parts) == 3 and parts[1] == "status":
                    status = int(parts[2])
                elif len(parts) == 3 and parts[1] == "slow":
                    time.sleep(float(parts[2]))
                elif len(parts) == 3 and parts[1] == "big":
                    payload = b"x" * int(parts[2])
                self.send_response(status)
                if self.request_version == "HTTP/1.0":
                    self.close_connection = True
                self.send_header("content-length", str(len(payload)))
                self.send_header("x-served-by", outer.name)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _read_chunked(self) -> bytes:
                out = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 256

        self.httpd = Server((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class RawServer:
    """A TCP server whose per-connection behaviour is a function of the socket (in a thread)."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1"):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()


# --- clients --------------------------------------------------------------------------------


def http_request(port: int, method: str = "GET", path: str = "/", *, host: str, body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """One request with http.client through a proxy port; (status, lower-cased headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"Host": host, **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, *, timeout: float = 10.0, until_close: bool = True) -> bytes:
    """Send raw bytes and read until the proxy closes the connection (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
            if not until_close and b"\r\n\r\n" in out:
                break
        return out


_buffers: "weakref.WeakKeyDictionary[socket.socket, bytearray]" = weakref.WeakKeyDictionary()


def _fill(sock: socket.socket, buf: bytearray) -> None:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError(f"connection closed by the proxy; had {bytes(buf[:200])!r}")
    buf += chunk


def read_response(sock: socket.socket, timeout: float = 10.0, method: str = "GET") -> tuple[int, dict, bytes]:
    """Read one HTTP/1.x response (content-length, chunked, or no body) from a raw socket.

    Bytes past the response stay buffered for the next call (pipelining); the buffer does
    not keep the socket open.
    """
    sock.settimeout(timeout)
    buf = _buffers.setdefault(sock, bytearray())
    while b"\r\n\r\n" not in buf:
        _fill(sock, buf)
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end + 4]
    status = int(head[0].split(" ")[1])
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = b""
    if method == "HEAD" or status < 200 or status in (204, 304):
        return status, headers, body
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            while b"\r\n" not in buf:
                _fill(sock, buf)
            i = buf.index(b"\r\n")
            size = int(bytes(buf[:i]).split(b";")[0], 16)
            del buf[:i + 2]
            while len(buf) < size + 2:
                _fill(sock, buf)
            body += bytes(buf[:size])
            del buf[:size + 2]
            if size == 0:
                return status, headers, body
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(buf) < n:
            _fill(sock, buf)
        body = bytes(buf[:n])
        del buf[:n]
        return status, headers, body
    while True:  # delimited by close
        try:
            _fill(sock, buf)
        except ConnectionError:
            body = bytes(buf)
            buf.clear()
            return status, headers, body


def tls_client_context(mesh: Mesh) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=mesh.anchor.cert_pem.decode())
    return ctx


class KeepAlive:
    """A well-behaved client on its own keep-alive connection, to show it is unaffected."""

    def __init__(self, port: int, host: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.host = host

    def check(self):
        self.sock.sendall(f"GET /big/5 HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        assert read_response(self.sock)[::2] == (200, b"xxxxx")

    def close(self):
        self.sock.close()


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send `data`; return (what came back, whether the proxy closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return out, False
            except ConnectionResetError:
                return out, True
            if not chunk:
                return out, True
            out += chunk


# --- a proxy as a real process ------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """Resident memory of a process, from /proc (kB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class DnsServer:
    """A real DNS server on a loopback address that answers every query with `rcode`
    (3 NXDOMAIN, 2 SERVFAIL) after `delay` seconds, and counts the queries and answers."""

    def __init__(self, rcode: int = 3, delay: float = 0.0):
        self.rcode, self.delay = rcode, delay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):  # a loopback address of its own: port 53 is what resolv.conf can name
            self.address = f"127.77.{uuid.uuid4().int % 250 + 1}.{uuid.uuid4().int % 250 + 1}"
            try:
                self.sock.bind((self.address, 53))
                break
            except OSError:
                continue
        self.queries = 0
        self.answered = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            self.queries += 1
            if self.delay:
                threading.Timer(self.delay, self._answer, (data, peer)).start()
            else:
                self._answer(data, peer)

    def _answer(self, query: bytes, peer) -> None:
        # The query's id and question, flags "response, recursion available" and the rcode.
        answer = query[:2] + bytes([0x81, 0x80 | self.rcode]) + query[4:6] + b"\x00" * 6 + query[12:]
        try:
            self.sock.sendto(answer, peer)
            self.answered += 1
        except OSError:
            pass

    def resolv_conf(self, path) -> str:
        path.write_text(f"nameserver {self.address}\noptions timeout:5 attempts:1\n")
        return str(path)

    def close(self) -> None:
        self.sock.close()


class ProxyProcess:
    """`python -m proxy` as its own process (its memory is its own, its log a file), plain
    outbound forwarding; with `resolv_conf` it runs in a mount namespace of its own where
    that file is /etc/resolv.conf (root), so its DNS is a server of the test's."""

    def __init__(self, nats_url: str, tmp_path, *, resolv_conf: str | None = None, **env):
        from tests.conftest import REPO, wait_until
        from tulle.natsserver import free_port

        self.ns = unique_ns()
        self.outbound, self.inbound, self.admin = free_port(), free_port(), free_port()
        self.log = tmp_path / f"proxy-{self.ns}.log"
        self.env = {
            **os.environ, "PYTHONPATH": str(REPO), "TULLE_NATS_URL": nats_url,
            "TULLE_PROXY_NAMESPACE": self.ns, "TULLE_PROXY_WORKLOAD": "w-1", "TULLE_PROXY_SERVICE_ACCOUNT": "w",
            "TULLE_PROXY_OUTBOUND_ADDR": f"127.0.0.1:{self.outbound}",
            "TULLE_PROXY_INBOUND_ADDR": f"127.0.0.1:{self.inbound}", "TULLE_PROXY_ADMIN_ADDR": f"127.0.0.1:{self.admin}",
            "TULLE_PROXY_TRANSPARENT": "false", "TULLE_LOG_FORMAT": "json",
            "TULLE_PROXY_IDENTITY_TRUST_ANCHORS": pki.new_trust_anchor().cert_pem.decode(),
            "TULLE_PROXY_TOKEN_FILE": server_for(nats_url).token_file(self.ns, "w-1", "w"), **env,
        }
        argv = [sys.executable, "-m", "proxy"]
        if resolv_conf is not None:
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    f"mount --bind {resolv_conf} /etc/resolv.conf && exec {' '.join(argv)}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_until(self._live, what="the proxy process answering /live")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _live(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"proxy exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            return self.get("/live")[0] == 200
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def metric(self, name: str, **labels: str) -> float:
        return sample(self.get("/metrics")[1], name, **labels)

    def stop(self) -> str:
        """SIGTERM, wait, and the whole log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text()
