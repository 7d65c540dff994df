"""Write proxy-init's rules into a network namespace: a thin adapter over
`iptables-save` / `iptables-restore --noflush`, entered with `nsenter` when a
namespace is named (a name under /run/netns, or a path such as /proc/<pid>/ns/net
or the CNI runtime's CNI_NETNS)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tulle.proxyinit import rules


class ApplyError(RuntimeError):
    """A firewall command failed; the message is one line naming it."""


def netns_path(netns: str) -> str:
    return netns if "/" in netns else str(Path("/run/netns") / netns)


def run(argv: list[str], *, netns: Optional[str] = None, stdin: Optional[str] = None,
        check: bool = True) -> subprocess.CompletedProcess:
    if netns:
        argv = ["nsenter", f"--net={netns_path(netns)}", "--", *argv]
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ApplyError(f"`{argv[0]}` is not installed") from None
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise ApplyError(f"`{' '.join(argv)}` failed: {err[-1] if err else f'exit code {proc.returncode}'}")
    return proc


@dataclass(frozen=True)
class Firewall:
    restore: str = "iptables-restore"
    save: str = "iptables-save"

    @classmethod
    def of(cls, bin_path: str = "iptables", save_bin_path: str = "") -> "Firewall":
        return cls(*rules.firewall_programs(bin_path, save_bin_path))


@dataclass(frozen=True)
class Applied:
    before: str  # iptables-save -t nat, before and after
    after: str

    @property
    def changed(self) -> bool:
        return rules.normalized(self.before) != rules.normalized(self.after)


def current_nat(netns: Optional[str] = None, fw: Firewall = Firewall()) -> str:
    return run([fw.save, "-t", "nat"], netns=netns).stdout


def apply(cfg: rules.Config, *, netns: Optional[str] = None, fw: Firewall = Firewall()) -> Applied:
    """Write the rules (idempotent: a second call leaves `iptables-save` unchanged)."""
    before = current_nat(netns, fw)
    run([fw.restore, "--noflush"], netns=netns, stdin=rules.restore_input(cfg, before))
    return Applied(before, current_nat(netns, fw))


def remove(*, netns: Optional[str] = None, fw: Firewall = Firewall()) -> bool:
    """Remove the jumps and chains proxy-init added; False when there were none."""
    text = rules.cleanup_input(current_nat(netns, fw))
    if not text:
        return False
    run([fw.restore, "--noflush"], netns=netns, stdin=text)
    return True


def is_installed(*, netns: Optional[str] = None, fw: Firewall = Firewall()) -> bool:
    return rules.installed(current_nat(netns, fw))
