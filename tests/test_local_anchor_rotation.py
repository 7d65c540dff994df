"""Rotating the trust anchors of a running local mesh, by the procedure docs/security.md
gives: trust both anchors and restart the proxies, switch the identity service to an issuer
under the new anchor and restart them again, then drop the old anchor and restart once
more. Traffic through the mesh works after every step (the apps reconnect to restarted
proxies), and at the end every proxy presents a certificate under the new anchor and trusts
nothing else."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess

import pytest

from tests.conftest import requires_netns, wait_until
from tests.local_support import read_record, tulle
from tulle import pki

pytestmark = [requires_netns, pytest.mark.root]


def in_netns(netns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30)


def a_joined_book(record: dict) -> bool:
    """traffic → web (mTLS) → books (gRPC, mTLS) and authors (HTTP, mTLS): all proxies at work."""
    netns = next(w["netns"] for w in record["workloads"] if w["name"] == "traffic")
    out = in_netns(netns, "curl", "-sS", "-m", "10", "http://web.demo.svc.cluster.local/books/2")
    if out.returncode != 0:
        return False
    try:
        return "author" in json.loads(out.stdout)
    except ValueError:
        return False


def presents_a_leaf_under(workload: dict, anchor_pem: bytes) -> bool:
    """A TLS handshake with the workload's proxy, trusting `anchor_pem` only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=anchor_pem.decode())
    ctx.set_alpn_protocols([pki.ALPN_PROXY])
    try:
        with socket.create_connection((workload["address"], 4143), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname=workload["identity"]):
                return True
    except ssl.SSLError:
        return False


def heartbeats(record: dict) -> dict[str, str]:
    """Each proxy's trust_root_sha256 as its heartbeat says (read with the observer credential)."""
    import nats

    async def read() -> dict[str, str]:
        nc = await nats.connect(record["nats"]["url"], nkeys_seed=record["nats"]["observer_creds"])
        try:
            kv = await nc.jetstream().key_value("tulle-proxies")
            out = {}
            for key in await kv.keys():
                out[key] = json.loads((await kv.get(key)).value)["trust_root_sha256"]
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


def restart_proxies(state) -> None:
    out = tulle("restart", state=state, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("restarted the proxy of") == 5  # the demo's five workloads (books: two)


def test_trust_anchors_rotate_with_a_bundle_a_restart_and_a_new_issuer(tmp_path):
    state = tmp_path / "state"
    up = tulle("up", "--detach", "--isolation", "netns", "--timeout", "150", state=state, timeout=200)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        record = read_record(state)
        ident = state / "identity"
        old_anchor = (ident / "ca.crt").read_bytes()
        wait_until(lambda: a_joined_book(record), timeout=30, what="traffic through the mesh")

        # The new anchor and an issuer under it, made aside (the anchor's key stays offline).
        new = tmp_path / "new"
        made = tulle("identity", "init", "--out", str(new), "--anchor-key-out", str(tmp_path / "anchor.key"),
                     state=state, timeout=60)
        assert made.returncode == 0, made.stderr
        new_anchor = (new / "ca.crt").read_bytes()

        # 1. Trust both: the bundle goes to the identity service and, with a restart, to every proxy.
        bundle = old_anchor + new_anchor
        (ident / "ca.crt").write_bytes(bundle)
        restart_proxies(state)
        assert set(heartbeats(record).values()) == {pki.trust_root_sha256(bundle)}
        wait_until(lambda: a_joined_book(record), timeout=60, interval=0.5, what="traffic through the mesh again")

        # 2. The new issuer: identity reloads it; restarted proxies get leaves under the new anchor.
        shutil.copy(new / "issuer.key", ident / "issuer.key")
        shutil.copy(new / "issuer.crt", ident / "issuer.crt")
        reloaded = tulle("events", "--type", "identity.issuer-reloaded", "--since", "10m", "--count", "1",
                         "--timeout", "30", state=state, timeout=60)
        assert reloaded.returncode == 0, reloaded.stderr
        web = next(w for w in record["workloads"] if w["name"] == "web")
        restart_proxies(state)
        wait_until(lambda: presents_a_leaf_under(web, new_anchor), timeout=30, what="web's leaf under the new anchor")
        wait_until(lambda: a_joined_book(record), timeout=60, interval=0.5, what="traffic through the mesh again")

        # 3. Drop the old anchor.
        (ident / "ca.crt").write_bytes(new_anchor)
        restart_proxies(state)
        assert set(heartbeats(record).values()) == {pki.trust_root_sha256(new_anchor)}
        for w in record["workloads"]:
            assert presents_a_leaf_under(w, new_anchor) and not presents_a_leaf_under(w, old_anchor), w["name"]
        wait_until(lambda: a_joined_book(record), timeout=60, interval=0.5, what="traffic through the mesh again")
    finally:
        tulle("down", state=state)
