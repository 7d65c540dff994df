"""`tulle identity init` and `tulle identity [show]`, run as the real command."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from services.identity.ca import load_issuer
from tests.bus_support import TESTER, bus_for, cli_bus_args, server_for
from tests.conftest import REPO
from tests.identity_support import identity_in_process, make_issuer_dir, token_secret
from tulle import pki, schemas
from tulle.bus import Bus
from tulle.schemas import identity_name

TULLE = str(Path(sys.executable).parent / "tulle")


def tulle(*args: str, nats: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1"}
    if nats:
        env["TULLE_NATS_URL"] = nats
        env["TULLE_NATS_CREDS"] = str(server_for(nats).seed_file("observer"))
    return subprocess.run([TULLE, *args], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)


def test_init_writes_an_anchor_and_an_issuer_that_the_service_accepts(tmp_path):
    out = tulle("identity", "init", "--out", str(tmp_path / "id"), "--trust-domain", "example.org", "--lifetime", "720h")
    assert out.returncode == 0, out.stderr
    files = {n: tmp_path / "id" / n for n in ("ca.crt", "issuer.crt", "issuer.key")}
    assert stat.S_IMODE(files["issuer.key"].stat().st_mode) == 0o600
    issuer = load_issuer(*(files[n].read_bytes() for n in ("ca.crt", "issuer.crt", "issuer.key")))
    assert issuer.ca.cert.subject.rfc4514_string() == "CN=identity.tulle.example.org"
    life = issuer.ca.cert.not_valid_after_utc - issuer.ca.cert.not_valid_before_utc
    assert abs(life - dt.timedelta(hours=720, seconds=20)) < dt.timedelta(seconds=5)
    anchor = issuer.anchors[0]
    assert anchor.subject.rfc4514_string() == "CN=root.tulle.example.org"
    assert anchor.not_valid_after_utc > issuer.not_after  # the anchor outlives the issuer


def test_init_never_overwrites_without_force(tmp_path):
    assert tulle("identity", "init", "--out", str(tmp_path)).returncode == 0
    before = (tmp_path / "issuer.crt").read_bytes()
    again = tulle("identity", "init", "--out", str(tmp_path))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [again.stderr.strip()] and "--force" in again.stderr
    assert (tmp_path / "issuer.crt").read_bytes() == before
    assert tulle("identity", "init", "--out", str(tmp_path), "--force").returncode == 0
    assert (tmp_path / "issuer.crt").read_bytes() != before


def test_init_refuses_bad_flags_with_one_line(tmp_path):
    for args, expected in [
        (("--trust-domain", "Not A Domain"), "--trust-domain"),
        (("--lifetime", "a year"), "--lifetime"),
        (("--lifetime", "100000h"), "must not exceed --anchor-lifetime"),
        (("--anchor-cert", str(tmp_path / "missing.crt")), "--anchor-cert and --anchor-key go together"),
    ]:
        out = tulle("identity", "init", "--out", str(tmp_path / "x"), *args)
        assert out.returncode == 2, args
        assert len(out.stderr.strip().splitlines()) == 1 and expected in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_init_can_sign_a_new_issuer_with_a_kept_anchor(tmp_path):
    first = tulle("identity", "init", "--out", str(tmp_path / "a"), "--anchor-key-out", str(tmp_path / "anchor.key"))
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE((tmp_path / "anchor.key").stat().st_mode) == 0o600
    second = tulle("identity", "init", "--out", str(tmp_path / "b"), "--anchor-cert", str(tmp_path / "a" / "ca.crt"),
                   "--anchor-key", str(tmp_path / "anchor.key"))
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "b" / "ca.crt").read_bytes() == (tmp_path / "a" / "ca.crt").read_bytes()
    assert (tmp_path / "b" / "issuer.crt").read_bytes() != (tmp_path / "a" / "issuer.crt").read_bytes()
    # The new issuer is accepted against the original anchors: a rotation the service can load.
    load_issuer(*((tmp_path / "a" / "ca.crt").read_bytes(), (tmp_path / "b" / "issuer.crt").read_bytes(),
                  (tmp_path / "b" / "issuer.key").read_bytes()))


async def test_show_prints_the_anchors_the_issuer_expiry_and_a_workloads_certificate(own_nats, tmp_path):
    issuer_dir = make_issuer_dir(tmp_path / "issuer", extra_anchors=(pki.new_trust_anchor("next"),))
    secret = token_secret(tmp_path / "token-secret")
    async with identity_in_process(own_nats.url, issuer_dir.path, secret):
        table = await asyncio.to_thread(tulle, "identity", nats=own_nats.url)
        assert table.returncode == 0, table.stderr
        assert "trust domain   cluster.local" in table.stdout
        assert "trust anchors  2" in table.stdout
        assert "CN=root.tulle.cluster.local" in table.stdout and "CN=root.tulle.next" in table.stdout
        expiry = issuer_dir.issuer.cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert f"issuer         expires {expiry}" in table.stdout

        doc = json.loads((await asyncio.to_thread(tulle, "identity", "show", "-o", "json", nats=own_nats.url)).stdout)
        assert doc["issuer_expiry"] == issuer_dir.issuer.cert.not_valid_after_utc.timestamp()
        assert [a["sha256"] for a in doc["anchors"]][0] == pki.fingerprint(issuer_dir.anchor.cert_pem)

        bus = bus_for(own_nats.url, TESTER, component="test")
        await bus.start()
        cert_expiry = time.time() + 3600
        await bus.put(schemas.PROXIES_BUCKET, schemas.proxy_key("demo", "web"), schemas.ProxyHeartbeat(
            namespace="demo", workload="web", version="0.1.0", identity=identity_name("web", "demo"), ready=True,
            cert_expiry=cert_expiry, time=time.time()))
        await bus.close()
        one = await asyncio.to_thread(tulle, "identity", "web", "-n", "demo", nats=own_nats.url)
        assert one.returncode == 0, one.stderr
        assert f"identity     {identity_name('web', 'demo')}" in one.stdout
        assert f"certificate  expires {dt.datetime.fromtimestamp(cert_expiry, dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}" in one.stdout
        assert "ready        yes" in one.stdout
        doc = json.loads((await asyncio.to_thread(tulle, "identity", "web", "-n", "demo", "-o", "json",
                                                  nats=own_nats.url)).stdout)
        assert doc["workload"]["cert_expiry"] == cert_expiry

        missing = await asyncio.to_thread(tulle, "identity", "nope", "-n", "demo", nats=own_nats.url)
        assert missing.returncode == 1 and "demo/nope: no heartbeat" in missing.stdout


def test_show_without_a_published_bundle_says_so(own_nats):
    out = tulle("identity", nats=own_nats.url)
    assert out.returncode == 1 and "no trust bundle published" in out.stdout


def test_show_without_nats_fails_with_one_line(nats_server):
    out = tulle("identity", *cli_bus_args(nats_server.url)[2:], "--nats", "nats://127.0.0.1:1", "--timeout", "1s")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("tulle: identity: cannot reach NATS at nats://127.0.0.1:1")


def test_show_without_a_credential_fails_with_one_line_saying_how_to_give_one(nats_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TULLE_NATS")}
    env["TULLE_STATE_DIR"] = str(tmp_path)  # no `tulle up` running there to borrow a credential from
    out = subprocess.run([TULLE, "identity", "--nats", nats_server.url, "--timeout", "2s"], cwd=REPO,
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "no credential for NATS" in out.stderr and "--nats-creds" in out.stderr


def test_show_with_a_credential_the_bus_does_not_know_fails_with_one_line(nats_server, tmp_path):
    from tulle import natsjwt

    stranger = tmp_path / "stranger.nk"
    natsjwt.ensure_seed(stranger, "user")
    out = tulle("identity", "--nats", nats_server.url, "--nats-creds", str(stranger), "--timeout", "3s")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "refused the credential" in out.stderr and "Authorization Violation" in out.stderr
