"""The rules proxy-init writes, as Linkerd's proxy-init writes them (pure: no I/O).

Two nat chains, each reached by one jump from a built-in chain:

  PREROUTING -> TULLE_PROXY_INIT_REDIRECT   inbound: every TCP connection to the pod goes
                                            to the proxy's inbound port, except ignored
                                            ports (the proxy's own admin and control
                                            ports first) and ignored source subnets
  OUTPUT     -> TULLE_PROXY_INIT_OUTPUT     outbound: everything the app sends goes to the
                                            proxy's outbound port, except the proxy's own
                                            traffic (its uid, and gid when given),
                                            loopback and ignored ports

Idempotent by construction: the chains are declared in the `iptables-restore
--noflush` input, which flushes and refills them if they exist, and a jump already
present in the current `iptables-save` output is not added again.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

REDIRECT_CHAIN = "TULLE_PROXY_INIT_REDIRECT"
OUTPUT_CHAIN = "TULLE_PROXY_INIT_OUTPUT"
PROXY_UID = 2102
INBOUND_PORT, OUTBOUND_PORT = 4143, 4140
CONTROL_PORT, ADMIN_PORT = 4190, 4191
MULTIPORT_MAX = 15  # iptables' multiport match takes at most 15 ports (a range counts 2)
COMMENT_PREFIX = "proxy-init/"

# --firewall-bin-path -> the restore and save programs that go with it.
FIREWALLS = {
    "iptables": ("iptables-restore", "iptables-save"),
    "iptables-nft": ("iptables-nft-restore", "iptables-nft-save"),
    "iptables-legacy": ("iptables-legacy-restore", "iptables-legacy-save"),
}
MODES = {"nft": "iptables-nft", "legacy": "iptables-legacy"}


class RulesError(ValueError):
    """A flag value that makes no rule (the message names the flag and the value)."""


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    def multiport(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"

    @property
    def weight(self) -> int:  # what the range costs in multiport's 15
        return 1 if self.first == self.last else 2


@dataclass(frozen=True)
class Config:
    """proxy-init's flags, checked."""

    inbound_port: int = INBOUND_PORT
    outbound_port: int = OUTBOUND_PORT
    proxy_uid: int = PROXY_UID
    proxy_gid: int | None = None
    inbound_ports_to_ignore: tuple[PortRange, ...] = (PortRange(CONTROL_PORT, CONTROL_PORT),
                                                      PortRange(ADMIN_PORT, ADMIN_PORT))
    outbound_ports_to_ignore: tuple[PortRange, ...] = ()
    subnets_to_ignore: tuple[str, ...] = field(default=())


def parse_ports(text: str, flag: str) -> tuple[PortRange, ...]:
    """"4190,4191,5000-5010" -> port ranges (Linkerd's syntax for ports to ignore)."""
    out: list[PortRange] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if sep else lo)
        except ValueError:
            raise RulesError(f"{flag}: {part!r} is not a port or a port range such as 5000-5010") from None
        if not 1 <= first <= last <= 65535:
            raise RulesError(f"{flag}: {part!r} is not a port range within 1-65535")
        out.append(PortRange(first, last))
    return tuple(sorted(set(out), key=lambda r: (r.first, r.last)))


def parse_subnets(text: str, flag: str = "--subnets-to-ignore") -> tuple[str, ...]:
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            net = ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise RulesError(f"{flag}: {part!r} is not a CIDR such as 10.0.0.0/8") from None
        if net.version != 4:
            raise RulesError(f"{flag}: {part!r} is IPv6; proxy-init writes IPv4 rules only")
        out.append(str(net))
    return tuple(out)


def check_port(value: int, flag: str) -> int:
    if not 1 <= int(value) <= 65535:
        raise RulesError(f"{flag}: {value} is not a port")
    return int(value)


def firewall_programs(bin_path: str, save_bin_path: str = "") -> tuple[str, str]:
    """(restore program, save program) for --firewall-bin-path [--firewall-save-bin-path]."""
    name = bin_path.rsplit("/", 1)[-1]
    if name not in FIREWALLS:
        raise RulesError(f"--firewall-bin-path: {bin_path!r} is not one of {', '.join(FIREWALLS)}")
    restore, save = FIREWALLS[name]
    prefix = bin_path[: len(bin_path) - len(name)]
    return prefix + restore, save_bin_path or prefix + save


def _chunks(ranges: tuple[PortRange, ...]) -> list[list[PortRange]]:
    chunks: list[list[PortRange]] = []
    cur: list[PortRange] = []
    weight = 0
    for r in ranges:
        if weight + r.weight > MULTIPORT_MAX:
            chunks.append(cur)
            cur, weight = [], 0
        cur.append(r)
        weight += r.weight
    if cur:
        chunks.append(cur)
    return chunks


def _comment(text: str) -> str:
    return f'-m comment --comment "{COMMENT_PREFIX}{text}"'


def jump_rules() -> dict[str, str]:
    """The two jumps from the built-in chains, as `iptables-save` prints them."""
    return {
        "PREROUTING": f"-A PREROUTING {_comment('install-proxy-init-prerouting')} -j {REDIRECT_CHAIN}",
        "OUTPUT": f"-A OUTPUT {_comment('install-proxy-init-output')} -j {OUTPUT_CHAIN}",
    }


def restore_input(cfg: Config, current_nat: str = "") -> str:
    """`iptables-restore --noflush` input for the nat table.

    `current_nat` is the namespace's `iptables-save -t nat` output: a jump already in it
    is not added twice, so a second run changes nothing.
    """
    lines = ["*nat", f":{REDIRECT_CHAIN} - [0:0]", f":{OUTPUT_CHAIN} - [0:0]"]
    for chunk in _chunks(cfg.inbound_ports_to_ignore):
        ports = ",".join(r.multiport() for r in chunk)
        lines.append(f"-A {REDIRECT_CHAIN} -p tcp -m multiport --dports {ports} -j RETURN "
                     f"{_comment('ignore-port-' + ports.replace(':', '-'))}")
    for subnet in cfg.subnets_to_ignore:
        lines.append(f"-A {REDIRECT_CHAIN} -s {subnet} -j RETURN {_comment('ignore-subnet-' + subnet)}")
    lines.append(f"-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {cfg.inbound_port} "
                 f"{_comment('redirect-all-incoming-to-proxy-port')}")
    lines.append(f"-A {OUTPUT_CHAIN} -m owner --uid-owner {cfg.proxy_uid} -j RETURN {_comment('ignore-proxy-user-id')}")
    if cfg.proxy_gid is not None:
        lines.append(f"-A {OUTPUT_CHAIN} -m owner --gid-owner {cfg.proxy_gid} -j RETURN "
                     f"{_comment('ignore-proxy-group-id')}")
    lines.append(f"-A {OUTPUT_CHAIN} -o lo -j RETURN {_comment('ignore-loopback')}")
    for chunk in _chunks(cfg.outbound_ports_to_ignore):
        ports = ",".join(r.multiport() for r in chunk)
        lines.append(f"-A {OUTPUT_CHAIN} -p tcp -m multiport --dports {ports} -j RETURN "
                     f"{_comment('ignore-port-' + ports.replace(':', '-'))}")
    lines.append(f"-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {cfg.outbound_port} "
                 f"{_comment('redirect-all-outgoing-to-proxy-port')}")
    for chain, target in (("PREROUTING", REDIRECT_CHAIN), ("OUTPUT", OUTPUT_CHAIN)):
        lines.append(f"-A {chain} -j {target} {_comment('install-proxy-init-' + chain.lower())}")
    lines.append("COMMIT")
    return without_present_jumps("\n".join(lines) + "\n", current_nat)


def without_present_jumps(restore_text: str, current_nat: str) -> str:
    """`restore_text` less the jumps `current_nat` (iptables-save output) already has."""
    present = set(current_nat.splitlines())
    drop = {f"-A {chain} -j {target} {_comment('install-proxy-init-' + chain.lower())}"
            for chain, target in (("PREROUTING", REDIRECT_CHAIN), ("OUTPUT", OUTPUT_CHAIN))
            if jump_rules()[chain] in present}
    return "".join(line for line in restore_text.splitlines(True) if line.rstrip("\n") not in drop)


def cleanup_input(current_nat: str) -> str:
    """`iptables-restore --noflush` input that removes everything proxy-init added
    (the jumps, then the chains); empty when there is nothing to remove."""
    present = current_nat.splitlines()
    lines = []
    for chain, jump in jump_rules().items():
        if jump in present:
            lines.append("-D" + jump[2:])
    for chain in (REDIRECT_CHAIN, OUTPUT_CHAIN):
        if any(line.startswith(f":{chain} ") for line in present):
            lines += [f"-F {chain}", f"-X {chain}"]
    return "*nat\n" + "\n".join(lines) + "\nCOMMIT\n" if lines else ""


def installed(current_nat: str) -> bool:
    """Both jumps are in place (what CNI CHECK asks)."""
    present = set(current_nat.splitlines())
    return all(j in present for j in jump_rules().values())


def normalized(save_output: str) -> list[str]:
    """`iptables-save` output without its comments and counters, to compare two states."""
    out = []
    for line in save_output.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(":"):
            name, policy, _counters = (line.split() + ["", ""])[:3]
            line = f"{name} {policy}"
        out.append(line)
    return out
