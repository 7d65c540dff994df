"""Real network namespaces for proxy-init, CNI and network-validator tests (root).

    with Netns() as pod, Netns() as client:
        veth(client, "10.251.7.1", pod, "10.251.7.2")
        with listener(pod, 4143) as seen:
            connect(client, "10.251.7.2", 8080)
            assert seen.original_dst() == ("10.251.7.2", 8080)

Everything stays inside namespaces the test made: addresses are private to them.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import uuid
from typing import Optional

_veths = itertools.count()

# Accepts one connection on 0.0.0.0:<port>, prints its original destination (what
# iptables REDIRECT rewrote) and the peer, then exits.
_LISTENER = textwrap.dedent("""
    import socket, struct, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(8)
    print("listening", flush=True)
    c, peer = s.accept()
    try:
        raw = c.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
        port, ip = struct.unpack("!2xH4s8x", raw)
        ip = socket.inet_ntoa(ip)
    except OSError:  # no nat in this namespace: nothing was rewritten
        ip, port = c.getsockname()
    print("original", ip, port, "peer", peer[0], flush=True)
    c.sendall(b"hello from " + sys.argv[1].encode())
    c.close()
""")

_CONNECT = textwrap.dedent("""
    import encodings.idna, os, socket, sys  # imported before giving up root: the interpreter may be unreadable after
    if len(sys.argv) > 3:
        os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[3]))
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(c.recv(100).decode(), flush=True)
""")


def sh(*argv: str, check: bool = True, input: Optional[str] = None, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, input=input, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
    return proc


class Netns:
    """A named network namespace with lo up, removed at exit."""

    def __init__(self, prefix: str = "tlt"):
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def exec(self, *argv: str, check: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.name, *argv, check=check, input=input)

    def nat(self) -> str:
        return self.exec("iptables-save", "-t", "nat").stdout

    def __enter__(self) -> "Netns":
        sh("ip", "netns", "add", self.name)
        self.exec("ip", "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        sh("ip", "netns", "del", self.name, check=False)


def veth(a: Netns, ip_a: str, b: Netns, ip_b: str, prefix: int = 24) -> None:
    """A veth pair between two namespaces, addressed, each side's default route via the other."""
    n = next(_veths)
    left, right = f"tlt{os.getpid() % 10000}a{n}", f"tlt{os.getpid() % 10000}b{n}"
    sh("ip", "link", "add", left, "netns", a.name, "type", "veth", "peer", "name", right, "netns", b.name)
    for ns, dev, ip, other in ((a, left, ip_a, ip_b), (b, right, ip_b, ip_a)):
        ns.exec("ip", "addr", "add", f"{ip}/{prefix}", "dev", dev)
        ns.exec("ip", "link", "set", dev, "up")
        ns.exec("ip", "route", "add", "default", "via", other)


class Listener:
    def __init__(self, ns: Netns, port: int):
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", _LISTENER, str(port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "listening":
            self.proc.kill()
            raise AssertionError(f"listener on {port} did not start: {line}{self.proc.stderr.read()}")

    def original_dst(self, timeout: float = 10) -> tuple[str, int]:
        """Where the accepted connection was headed before any redirect."""
        out, err = self.proc.communicate(timeout=timeout)
        parts = out.split()
        assert parts[:1] == ["original"], f"no connection reached the listener: {out}{err}"
        return parts[1], int(parts[2])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class listener:
    """`with listener(ns, port) as seen:` — seen.original_dst() after a connection."""

    def __init__(self, ns: Netns, port: int):
        self.ns, self.port = ns, port

    def __enter__(self) -> Listener:
        self.l = Listener(self.ns, self.port)
        return self.l

    def __exit__(self, *exc) -> None:
        self.l.close()


def connect(ns: Netns, ip: str, port: int, *, uid: Optional[int] = None, check: bool = True) -> subprocess.CompletedProcess:
    """Connect from inside `ns` (as `uid` when given) and read the greeting."""
    argv = [sys.executable, "-c", _CONNECT, ip, str(port)] + ([str(uid)] if uid is not None else [])
    return ns.exec(*argv, check=check)
