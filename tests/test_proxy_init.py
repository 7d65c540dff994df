"""proxy-init: the rules (pure), then `tulle proxy-init` in real network namespaces —
rules listed, traffic really redirected, the proxy's own traffic and ignored ports
left alone, a second run a no-op, --cleanup leaving nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_netns
from tests.netns_support import Netns, connect, listener, veth
from tulle.proxyinit import rules


TULLE = str(Path(sys.executable).with_name("tulle"))


def tulle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TULLE, *args], capture_output=True, text=True, timeout=60)


# --- pure -----------------------------------------------------------------------------------


def test_ports_to_ignore_take_lists_and_ranges_and_name_the_flag_when_wrong():
    assert rules.parse_ports("4191, 4190,5000-5002", "--x") == (
        rules.PortRange(4190, 4190), rules.PortRange(4191, 4191), rules.PortRange(5000, 5002))
    with pytest.raises(rules.RulesError, match="--x: 'http'"):
        rules.parse_ports("80,http", "--x")
    with pytest.raises(rules.RulesError, match="--x: '70000'"):
        rules.parse_ports("70000", "--x")
    with pytest.raises(rules.RulesError, match="--subnets-to-ignore: '10.0.0.0/33'"):
        rules.parse_subnets("10.0.0.0/33")


def test_ranges_count_double_against_multiports_fifteen():
    cfg = rules.Config(inbound_ports_to_ignore=rules.parse_ports("1-2,3-4,5-6,7-8,9-10,11-12,13-14,15", "f"))
    multiport = [line for line in rules.restore_input(cfg).splitlines() if "multiport" in line]
    assert len(multiport) == 1  # 7 ranges and a port: exactly 15
    cfg = rules.Config(inbound_ports_to_ignore=rules.parse_ports("1-2,3-4,5-6,7-8,9-10,11-12,13-14,15,16", "f"))
    multiport = [line for line in rules.restore_input(cfg).splitlines() if "multiport" in line]
    assert len(multiport) == 2 and "--dports 16 " in multiport[1]


def test_a_jump_already_installed_is_not_written_again():
    first = rules.restore_input(rules.Config())
    assert first.count("-A PREROUTING") == 1 and first.count("-A OUTPUT") == 1
    current = "\n".join(rules.jump_rules().values())
    again = rules.restore_input(rules.Config(), current)
    assert "-A PREROUTING" not in again and "-A OUTPUT" not in again
    assert f":{rules.REDIRECT_CHAIN} - [0:0]" in again  # the chains are still flushed and refilled


def test_firewall_programs_follow_the_bin_path():
    assert rules.firewall_programs("iptables-nft") == ("iptables-nft-restore", "iptables-nft-save")
    assert rules.firewall_programs("/usr/sbin/iptables-legacy") == (
        "/usr/sbin/iptables-legacy-restore", "/usr/sbin/iptables-legacy-save")
    with pytest.raises(rules.RulesError, match="--firewall-bin-path: 'nft'"):
        rules.firewall_programs("nft")


def test_a_bad_flag_is_one_line_and_exit_2():
    out = tulle("proxy-init", "--outbound-ports-to-ignore", "443,smtp", "--dry-run")
    assert out.returncode == 2
    assert out.stderr.strip() == "tulle: --outbound-ports-to-ignore: 'smtp' is not a port or a port range such as 5000-5010"


# --- real namespaces -------------------------------------------------------------------------


@pytest.fixture
def pod_and_client():
    with Netns() as pod, Netns() as client:
        veth(client, "10.251.7.1", pod, "10.251.7.2")
        yield pod, client


def proxy_init(pod: Netns, *args: str) -> subprocess.CompletedProcess:
    out = tulle("proxy-init", "--netns", pod.name, *args)
    assert out.returncode == 0, out.stderr
    return out


@requires_netns
@pytest.mark.root
def test_rules_are_listed_in_the_pods_namespace_and_nowhere_else(pod_and_client):
    pod, client = pod_and_client
    host_before = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    out = proxy_init(pod, "--outbound-ports-to-ignore", "4567,4568", "--subnets-to-ignore", "10.99.0.0/16")
    nat = pod.nat()
    assert out.stdout == nat  # the command prints the table it left
    assert '-A PREROUTING -m comment --comment "proxy-init/install-proxy-init-prerouting" -j TULLE_PROXY_INIT_REDIRECT' in nat
    assert '-A OUTPUT -m comment --comment "proxy-init/install-proxy-init-output" -j TULLE_PROXY_INIT_OUTPUT' in nat
    assert "--uid-owner 2102" in nat and "--gid-owner" not in nat
    assert "--dports 4567,4568" in nat and "-s 10.99.0.0/16" in nat
    assert "TULLE_PROXY_INIT" not in client.nat()
    host_after = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert rules.normalized(host_before) == rules.normalized(host_after)


@requires_netns
@pytest.mark.root
def test_inbound_connections_reach_the_proxys_inbound_port_with_their_original_destination(pod_and_client):
    pod, client = pod_and_client
    proxy_init(pod)
    with listener(pod, 4143) as proxy:
        assert connect(client, "10.251.7.2", 8080).stdout.strip() == "hello from 4143"
        assert proxy.original_dst() == ("10.251.7.2", 8080)


@requires_netns
@pytest.mark.root
def test_the_apps_outbound_connections_reach_the_proxys_outbound_port(pod_and_client):
    pod, client = pod_and_client
    proxy_init(pod)
    with listener(pod, 4140) as proxy:
        assert connect(pod, "10.251.7.1", 9000).stdout.strip() == "hello from 4140"
        assert proxy.original_dst() == ("10.251.7.1", 9000)


@requires_netns
@pytest.mark.root
def test_the_proxys_own_traffic_ignored_ports_and_the_admin_port_are_not_redirected(pod_and_client):
    pod, client = pod_and_client
    proxy_init(pod, "--outbound-ports-to-ignore", "5432")
    with listener(client, 9000) as upstream:  # the proxy (uid 2102) dials out: reaches the real peer
        assert connect(pod, "10.251.7.1", 9000, uid=2102).stdout.strip() == "hello from 9000"
        assert upstream.original_dst() == ("10.251.7.1", 9000)
    with listener(client, 5432) as db:  # an ignored outbound port
        assert connect(pod, "10.251.7.1", 5432).stdout.strip() == "hello from 5432"
        db.original_dst()
    with listener(pod, 4191) as admin:  # the admin port is reached directly from outside
        assert connect(client, "10.251.7.2", 4191).stdout.strip() == "hello from 4191"
        admin.original_dst()


@requires_netns
@pytest.mark.root
def test_a_second_run_changes_nothing_and_cleanup_leaves_nothing(pod_and_client):
    pod, _ = pod_and_client
    pristine = pod.nat()
    first = proxy_init(pod, "--inbound-ports-to-ignore", "4190,4191,7000-7010")
    assert "proxy-init rules written" in first.stderr
    after_first = pod.nat()
    second = proxy_init(pod, "--inbound-ports-to-ignore", "4190,4191,7000-7010")
    assert "nothing changed" in second.stderr
    assert rules.normalized(pod.nat()) == rules.normalized(after_first)
    assert pod.nat().count("-j TULLE_PROXY_INIT_REDIRECT") == 1
    # Different flags: the chains are flushed and refilled, still one jump each.
    proxy_init(pod, "--inbound-ports-to-ignore", "4190,4191")
    assert "7000:7010" not in pod.nat() and pod.nat().count("-j TULLE_PROXY_INIT_OUTPUT") == 1
    proxy_init(pod, "--cleanup")
    assert rules.normalized(pod.nat()) == rules.normalized(pristine)


@requires_netns
@pytest.mark.root
@pytest.mark.parametrize("mode", ["nft", "legacy"])
def test_both_iptables_backends_write_the_same_rules(pod_and_client, mode):
    pod, client = pod_and_client
    proxy_init(pod, "--iptables-mode", mode)
    save = pod.exec(f"iptables-{mode}-save", "-t", "nat").stdout
    assert "-j TULLE_PROXY_INIT_REDIRECT" in save
    with listener(pod, 4143) as proxy:
        connect(client, "10.251.7.2", 8080)
        assert proxy.original_dst() == ("10.251.7.2", 8080)
    proxy_init(pod, "--iptables-mode", mode, "--cleanup")
