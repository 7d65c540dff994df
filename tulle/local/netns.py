"""Network namespaces for local mode: a thin adapter over `ip` and `iptables`.

One bridge per run (`tl<n>br`, 10.<n>.0.1/16); per workload a namespace with a veth
whose far end sits on the bridge, an address 10.<n>.x.y, a default route via the
bridge, an /etc/netns/<name>/hosts file (bind-mounted over /etc/hosts by
`ip netns exec`) and, when meshed, proxy-init's iptables rules. Every step is named in
the run record before it is taken, so `tulle down` can undo a half-finished run.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from tulle.local import plan

ETC_NETNS = Path("/etc/netns")


class NetnsError(RuntimeError):
    """A command that set up or tore down networking failed; the message is one line."""


def run(argv: list[str], *, stdin: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise NetnsError(f"`{' '.join(argv)}` failed: {err[-1] if err else f'exit code {proc.returncode}'}")
    return proc


# --- which subnets are taken -------------------------------------------------------------------


def networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network addressed or routed on this host (all routing tables)."""
    nets: list[ipaddress.IPv4Network] = []
    addrs = json.loads(run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]")
    for link in addrs:
        for a in link.get("addr_info", []):
            try:
                nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
            except (KeyError, ValueError):
                pass
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]")
    for r in routes:
        dst = r.get("dst", "")
        if dst in ("", "default"):
            continue
        try:
            nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
        except ValueError:
            pass
    return nets


def loopback_in_use() -> list[ipaddress.IPv4Network]:
    """127.x.y.z addresses (other than 127.0.0.1) that sockets on this host are bound to."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/udp"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local = line.split()[1].split(":")[0]
            addr = ipaddress.IPv4Address(int.from_bytes(bytes.fromhex(local), "little"))
            if addr.is_loopback and str(addr) != "127.0.0.1":
                out.add(ipaddress.ip_network(f"{addr}/32"))
    return sorted(out)


def _lock_dir() -> Path:
    d = Path("/run/tulle") if os.geteuid() == 0 else Path(tempfile.gettempdir()) / f"tulle-{os.geteuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def proxy_runtime_dir(n: int) -> Path:
    """Where a netns run keeps what its proxies (uid 2102) must read, such as their tokens.

    Not the state directory: that may sit below a folder only its owner can enter
    (a home, pytest's tmp). Every level here is traversable; files are 0400 for 2102.
    """
    d = Path("/run/tulle") / f"run-{n}"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d.parent, 0o755)
    os.chmod(d, 0o711)
    return d


def remove_proxy_runtime_dir(n: int) -> None:
    import shutil

    shutil.rmtree(Path("/run/tulle") / f"run-{n}", ignore_errors=True)


def claim_subnet(isolation: str, seed: int) -> tuple[int, int]:
    """Pick a free second octet for this run and hold a machine-wide lock on it.

    Two runs (say, tests beside a user's run) never share a subnet: each holds an flock
    on its octet for its lifetime, and an octet whose subnet is already routed or bound
    here is skipped. Returns (n, lock fd); the lock goes when the fd is closed.
    """
    in_use = networks_in_use() if isolation == "netns" else loopback_in_use()
    for n in plan.subnet_candidates(seed):
        if not plan.subnet_free(plan.subnet_of(isolation, n), in_use):
            continue
        fd = os.open(_lock_dir() / f"subnet-{isolation}-{n}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return n, fd
    raise NetnsError(f"no free subnet for local mode: every {plan.subnet_of(isolation, 0)} variant is in use")


# --- the bridge -----------------------------------------------------------------------------------


def create_bridge(n: int) -> None:
    br = plan.bridge_name(n)
    run(["ip", "link", "add", br, "type", "bridge"])
    run(["ip", "addr", "add", f"{plan.bridge_address(n)}/16", "dev", br])
    run(["ip", "link", "set", br, "up"])
    add_host_rule(plan.bridge_forward_rule(br))


def add_host_rule(rule: list[str]) -> None:
    if run(["iptables", "-C", *rule], check=False).returncode != 0:
        run(["iptables", "-I", *rule])


def delete_host_rule(rule: list[str]) -> None:
    # -D deletes one copy; loop in case an earlier crashed run added it twice.
    for _ in range(10):
        if run(["iptables", "-D", *rule], check=False).returncode != 0:
            return


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def delete_link(name: str) -> None:
    if link_exists(name):
        run(["ip", "link", "del", name], check=False)


# --- namespaces -----------------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return (Path("/run/netns") / name).exists()


def create_pod_netns(n: int, index: int, name: str, address: str, hosts: str) -> None:
    """A namespace wired to the run's bridge, with its hosts file."""
    veth, peer = plan.veth_name(n, index), plan.veth_peer_name(n, index)
    write_hosts(name, hosts)
    write_etc_file(name, "resolv.conf", plan.RESOLV_CONF)
    run(["ip", "netns", "add", name])
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
    run(["ip", "link", "set", peer, "netns", name])
    run(["ip", "link", "set", veth, "master", plan.bridge_name(n), "up"])
    ns = ["ip", "netns", "exec", name]
    run(ns + ["ip", "link", "set", peer, "name", "eth0"])
    run(ns + ["ip", "addr", "add", f"{address}/16", "dev", "eth0"])
    run(ns + ["ip", "link", "set", "eth0", "up"])
    run(ns + ["ip", "link", "set", "lo", "up"])
    run(ns + ["ip", "route", "add", "default", "via", plan.bridge_address(n)])


def apply_proxy_init(name: str, rules: str) -> None:
    """Write proxy-init's nat rules into the namespace (idempotent: chains are flushed and
    reused, and a jump already there is not added twice — tulle/proxyinit)."""
    from tulle.proxyinit import apply as proxyinit
    from tulle.proxyinit.rules import without_present_jumps

    try:
        rules = without_present_jumps(rules, proxyinit.current_nat(name))
    except proxyinit.ApplyError as e:
        raise NetnsError(str(e)) from None
    run(["ip", "netns", "exec", name, "iptables-restore", "--noflush"], stdin=rules)


def nat_rules(name: str) -> str:
    return run(["ip", "netns", "exec", name, "iptables", "-t", "nat", "-S"]).stdout


def delete_netns(name: str, veth: str = "") -> None:
    """Remove a namespace, its host-side veth and its /etc/netns folder (each only if there)."""
    if veth:
        delete_link(veth)
    if netns_exists(name):
        run(["ip", "netns", "del", name], check=False)
    folder = ETC_NETNS / name
    if folder.is_dir():
        for f in folder.iterdir():
            f.unlink(missing_ok=True)
        folder.rmdir()


def write_hosts(name: str, text: str) -> None:
    write_etc_file(name, "hosts", text)


def write_etc_file(name: str, file: str, text: str) -> None:
    """Rewrite /etc/netns/<name>/<file> in place: processes started by `ip netns exec`
    see it through a bind mount of this very inode, so a replaced file would go unseen."""
    folder = ETC_NETNS / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file
    with open(path, "a+") as f:
        f.seek(0)
        if f.read() == text:
            return
        f.seek(0)
        f.truncate()
        f.write(text)
    os.chmod(path, 0o644)


def leftover_namespaces(prefix: str) -> list[str]:
    try:
        return sorted(p.name for p in Path("/run/netns").iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def teardown(n: Optional[int], namespaces: Iterable[tuple[str, str]], host_rules: Iterable[list[str]]) -> list[str]:
    """Undo a run's networking: namespaces, veths, host rules, the bridge. Returns what it
    could not remove (one line each), never raises."""
    problems = []
    for name, veth in namespaces:
        try:
            delete_netns(name, veth)
        except (OSError, NetnsError) as e:
            problems.append(f"namespace {name}: {e}")
    if n is not None:
        # Namespaces a crashed run created but had not recorded yet carry the run's prefix.
        for name in leftover_namespaces(f"tl{n}-"):
            try:
                delete_netns(name)
            except (OSError, NetnsError) as e:
                problems.append(f"namespace {name}: {e}")
    for rule in host_rules:
        try:
            delete_host_rule(rule)
        except (OSError, NetnsError) as e:
            problems.append(f"iptables rule {' '.join(rule)}: {e}")
    if n is not None:
        remove_proxy_runtime_dir(n)
        delete_link(plan.bridge_name(n))
        if link_exists(plan.bridge_name(n)):
            problems.append(f"bridge {plan.bridge_name(n)} still exists")
    return problems
