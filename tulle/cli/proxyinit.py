"""`tulle proxy-init`: write the iptables rules that send a pod's traffic through its
proxy (the init container; Linkerd's proxy-init, with its flags)."""

from __future__ import annotations

import click

from tulle.errors import UserError


@click.command("proxy-init")
@click.option("--incoming-proxy-port", default=4143, show_default=True, type=int,
              help="the proxy's inbound port: where connections to the pod are redirected")
@click.option("--outgoing-proxy-port", default=4140, show_default=True, type=int,
              help="the proxy's outbound port: where the app's connections are redirected")
@click.option("--proxy-uid", default=2102, show_default=True, type=int, help="the proxy's user, never redirected")
@click.option("--proxy-gid", default=-1, show_default=True, type=int,
              help="the proxy's group, never redirected (-1: no group rule)")
@click.option("--inbound-ports-to-ignore", default="4190,4191", show_default=True,
              help="ports and ranges (a-b) not redirected inbound")
@click.option("--outbound-ports-to-ignore", default="", help="ports and ranges (a-b) not redirected outbound")
@click.option("--subnets-to-ignore", default="", help="source CIDRs whose inbound connections are not redirected")
@click.option("--firewall-bin-path", default="", help="iptables, iptables-nft or iptables-legacy (default: from --iptables-mode)")
@click.option("--firewall-save-bin-path", default="", help="the matching save program (default: derived)")
@click.option("--iptables-mode", type=click.Choice(["nft", "legacy", "auto"]), default="auto", show_default=True,
              help="nft or legacy backend; auto uses the system's `iptables`")
@click.option("--netns", default="", help="write the rules in this network namespace (name or path) instead of our own")
@click.option("--dry-run", is_flag=True, help="print the iptables-restore input and change nothing")
@click.option("--cleanup", is_flag=True, help="remove the rules instead of writing them")
def proxy_init(incoming_proxy_port, outgoing_proxy_port, proxy_uid, proxy_gid, inbound_ports_to_ignore,
               outbound_ports_to_ignore, subnets_to_ignore, firewall_bin_path, firewall_save_bin_path, iptables_mode,
               netns, dry_run, cleanup):
    """Redirect the pod's TCP traffic to its proxy: inbound to --incoming-proxy-port, outbound
    to --outgoing-proxy-port, except the proxy's own traffic, loopback and ignored ports.
    Running it again changes nothing."""
    from tulle.proxyinit import apply, rules

    try:
        cfg = rules.Config(
            inbound_port=rules.check_port(incoming_proxy_port, "--incoming-proxy-port"),
            outbound_port=rules.check_port(outgoing_proxy_port, "--outgoing-proxy-port"),
            proxy_uid=proxy_uid,
            proxy_gid=None if proxy_gid < 0 else proxy_gid,
            inbound_ports_to_ignore=rules.parse_ports(inbound_ports_to_ignore, "--inbound-ports-to-ignore"),
            outbound_ports_to_ignore=rules.parse_ports(outbound_ports_to_ignore, "--outbound-ports-to-ignore"),
            subnets_to_ignore=rules.parse_subnets(subnets_to_ignore),
        )
        bin_path = firewall_bin_path or {"auto": "iptables", **rules.MODES}[iptables_mode]
        fw = apply.Firewall.of(bin_path, firewall_save_bin_path)
    except rules.RulesError as e:
        raise UserError(str(e)) from None
    if dry_run:
        click.echo(rules.restore_input(cfg), nl=False)
        return
    try:
        if cleanup:
            removed = apply.remove(netns=netns or None, fw=fw)
            click.echo("proxy-init rules removed" if removed else "no proxy-init rules to remove", err=True)
            return
        result = apply.apply(cfg, netns=netns or None, fw=fw)
    except apply.ApplyError as e:
        click.echo(f"tulle proxy-init: {e}", err=True)
        raise SystemExit(1)
    click.echo("proxy-init rules written" if result.changed else "proxy-init rules already in place; nothing changed",
               err=True)
    click.echo(result.after, nl=False)
