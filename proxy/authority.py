"""Authorities and service names — pure.

`split_authority` normalises a Host header or URI authority into (host, port): lower
case, no trailing dot, IPv6 brackets removed, the scheme's default port filled in.
`mesh_service` says which Kubernetes-style service name a host is, relative to the
proxy's namespace: `svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.<cluster-domain>`.
"""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HOST = re.compile(r"^[a-z0-9_.-]{1,253}$")


def split_authority(raw: bytes | str, default_port: int = 80) -> tuple[str, int] | None:
    """(host, port) of an authority, or None when it is not a valid one."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    raw = raw.strip().lower()
    if "@" in raw:  # userinfo is not part of an HTTP authority for routing
        raw = raw.rpartition("@")[2]
    if raw.startswith("["):
        close = raw.find("]")
        if close < 0:
            return None
        host, rest = raw[1:close], raw[close + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        if rest and not rest.startswith(":"):
            return None
        port_s = rest[1:]
    else:
        host, sep, port_s = raw.rpartition(":")
        if not sep:
            host, port_s = raw, ""
        host = host.rstrip(".")
        if not host or not _HOST.match(host):
            return None
    if port_s:
        if not port_s.isdigit() or len(port_s) > 5:
            return None
        port = int(port_s)
        if not 1 <= port <= 65535:
            return None
    else:
        port = default_port
    return host, port


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def mesh_service(host: str, namespace: str, cluster_domain: str = "cluster.local") -> tuple[str, str] | None:
    """(namespace, service) when `host` names a service the mesh may know, else None."""
    if is_ip(host):
        return None
    labels = host.split(".")
    n = len(labels)
    if n == 1:
        ns, svc = namespace, labels[0]
    elif n == 2:
        svc, ns = labels
    elif n == 3 and labels[2] == "svc":
        svc, ns = labels[0], labels[1]
    elif n > 3 and labels[2] == "svc" and ".".join(labels[3:]) == cluster_domain:
        svc, ns = labels[0], labels[1]
    else:
        return None
    if not _LABEL.match(svc) or not _LABEL.match(ns):
        return None
    return ns, svc


class MeshScope:
    """Which names and addresses the proxy looks up in discovery — Linkerd's profile
    suffixes and networks (LINKERD2_PROXY_DESTINATION_PROFILE_SUFFIXES / _NETWORKS).

    A name is looked up when it is a mesh service name (`mesh_service`) whose fully
    qualified form — short names completed the way a pod's DNS search path completes them
    — ends with one of `suffixes` ("." matches every name). An address is looked up when
    it lies in one of `networks`. Everything else goes straight to DNS or to the address:
    no KV lookup, no watch, whatever an app asks for.
    """

    __slots__ = ("namespace", "cluster_domain", "suffixes", "networks")

    def __init__(self, namespace: str, cluster_domain: str, suffixes: tuple[str, ...], networks: tuple[str, ...]):
        self.namespace = namespace
        self.cluster_domain = cluster_domain.strip(".")
        self.suffixes = tuple("." + s.strip(".") + "." if s.strip(".") else "." for s in suffixes)
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def service(self, host: str) -> tuple[str, str] | None:
        """(namespace, service) when `host` names a mesh service in scope, else None."""
        name = mesh_service(host, self.namespace, self.cluster_domain)
        if name is None:
            return None
        fqdn = f".{name[1]}.{name[0]}.svc.{self.cluster_domain}."
        return name if any(s == "." or fqdn.endswith(s) for s in self.suffixes) else None

    def address(self, host: str) -> bool:
        """Whether an IP address is one discovery may know (a cluster IP, a pod IP)."""
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in self.networks)
