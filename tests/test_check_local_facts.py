"""The local-mode checks over facts built by hand: what a run that is half broken in ways
hard to cause on purpose (a proxy trusting other anchors, a certificate not renewed, a
bucket gone, a stream without a leader) looks like — no processes, no I/O."""

from __future__ import annotations

import datetime as dt
import time

from tulle import pki, schemas
from tulle.check import local, nats
from tulle.check.core import Result, evaluate
from tulle.check.identity import IdentityMaterial
from tulle.check.local import BusFacts, LocalFacts, ProcessFacts, ProxyFacts

NOW = time.time()
ANCHOR = pki.new_trust_anchor()
WEB_ID = schemas.identity_name("web", "demo")


def heartbeat(**kw) -> schemas.ProxyHeartbeat:
    base = dict(namespace="demo", workload="web", version="0.1.0", identity=WEB_ID, ready=True,
                cert_expiry=NOW + 20 * 3600, trust_anchors=pki.cert_fingerprints(ANCHOR.cert_pem))
    base.update(kw)
    return schemas.ProxyHeartbeat(**base)


def facts(**kw) -> LocalFacts:
    f = LocalFacts(state_dir="/state", running=True, supervisor_alive=True, with_proxies=True, cli_version="0.1.0",
                   now=NOW, nats=ProcessFacts("nats", 10, True, True, "nats://127.0.0.1:4222"),
                   services=[ProcessFacts(n, 11 + i, True, True, f"127.0.0.1:{9990 + i}", version="0.1.0")
                             for i, n in enumerate(local.SERVICES)],
                   installation_anchors=set(pki.cert_fingerprints(ANCHOR.cert_pem)),
                   bus=BusFacts("nats://127.0.0.1:4222", heartbeats={"demo.web": heartbeat()}, heartbeats_read=True,
                                trust_bundle=schemas.TrustBundle(ANCHOR.cert_pem.decode())),
                   proxies=[ProxyFacts("demo", "web", WEB_ID, 20, True, True, "127.0.0.2:4191")])
    for k, v in kw.items():
        setattr(f, k, v)
    return f


def results(f: LocalFacts) -> dict[str, object]:
    return {r.description: r for r in evaluate(local.categories(f.with_proxies), f).results}


def test_facts_of_a_healthy_run_pass_every_check():
    got = results(facts())
    assert got and all(r.result is Result.SUCCESS for r in got.values()), \
        [(d, r.error) for d, r in got.items() if r.result is not Result.SUCCESS]
    assert "data plane proxies trust the installation's anchors" in got


def test_a_proxy_trusting_none_of_the_anchors_is_an_error_and_some_of_them_a_warning():
    other = pki.cert_fingerprints(pki.new_trust_anchor().cert_pem)
    f = facts()
    f.bus.heartbeats["demo.web"] = heartbeat(trust_anchors=other)
    r = results(f)["data plane proxies trust the installation's anchors"]
    assert r.result is Result.ERROR and r.error == "trust none of the installation's anchors: demo/web"
    f.bus.heartbeats["demo.web"] = heartbeat(trust_anchors=other + pki.cert_fingerprints(ANCHOR.cert_pem))
    assert results(f)["data plane proxies trust the installation's anchors"].result is Result.WARNING


def test_proxies_that_do_not_report_their_anchors_are_not_judged_on_them():
    f = facts()
    f.bus.heartbeats["demo.web"] = heartbeat(trust_anchors=[])
    assert "data plane proxies trust the installation's anchors" not in results(f)


def test_certificates_expired_for_another_identity_or_not_renewed():
    f = facts()
    f.bus.heartbeats["demo.web"] = heartbeat(cert_expiry=NOW - 60)
    assert "its certificate expired at" in results(f)["data plane proxies have valid certificates"].error
    f.bus.heartbeats["demo.web"] = heartbeat(identity=schemas.identity_name("books", "demo"))
    assert results(f)["data plane proxies have valid certificates"].error == \
        f"demo/web: its certificate is for {schemas.identity_name('books', 'demo')}, not {WEB_ID}"
    f.bus.heartbeats["demo.web"] = heartbeat(cert_expiry=NOW + 600)
    r = results(f)["data plane proxies have valid certificates"]
    assert r.result is Result.WARNING and "was not renewed" in r.error


def test_a_missing_heartbeat_an_old_proxy_and_a_missing_bucket():
    f = facts()
    f.bus.heartbeats = {}
    r = results(f)["data plane proxies send heartbeats"]
    assert r.result is Result.ERROR and r.error.startswith("demo/web: no heartbeat in tulle-proxies")
    f = facts()
    f.bus.heartbeats["demo.web"] = heartbeat(version="0.0.9")
    assert results(f)["data plane and cli versions match"].result is Result.WARNING
    f = facts()
    f.bus.missing_buckets = [schemas.POLICY_BUCKET]
    r = results(f)["the KV buckets exist"]
    assert r.error == "missing: tulle-policy" and "tulle logs --component policy" in r.hint


def test_a_service_of_another_version_is_a_warning():
    f = facts()
    f.services[0].version = "0.2.0"
    r = results(f)["control plane and cli versions match"]
    assert r.result is Result.WARNING and r.error == "destination runs 0.2.0; this CLI is 0.1.0"


def test_a_dead_supervisor_changes_the_hint_nothing_restarts_what_stopped():
    f = facts(supervisor_alive=False)
    f.services[1].alive = f.services[1].ready = False
    got = results(f)
    assert got["the supervisor is running"].result is Result.ERROR
    assert "nothing restarts it" in got["the identity service is ready"].hint


def test_a_run_without_proxies_has_no_identity_service_to_check():
    f = facts(meshed=False, with_proxies=False, proxies=[])
    f.services = [s for s in f.services if s.name != "identity"]
    got = results(f)
    assert "the identity service is ready" not in got and "certificate config is valid" not in got
    assert all(r.result is Result.SUCCESS for r in got.values())


def stream(name: str, replicas: int = 1, **kw) -> "nats.StreamFacts":
    return nats.StreamFacts(name, replicas=replicas, **kw)


def test_streams_with_fewer_copies_than_the_runs_nats_servers_are_a_warning_saying_how_to_remake_them():
    f = facts()
    f.bus.servers, f.bus.cluster_name = 3, "tulle"
    f.bus.streams = {s.name: s for s in (
        stream("KV_tulle-endpoints", 3, clustered=True, leader="nats-0"),
        stream("KV_tulle-policy", 1, clustered=True, leader="nats-1"))}
    r = results(f)["the buckets' replicas match the NATS cluster"]
    assert r.result is Result.WARNING
    assert r.error == "KV_tulle-policy keeps 1 copy, not 3\nthe installation runs 3 NATS servers, so each stream should keep 3"
    assert r.hint.startswith("the services make each stream with --nats-replicas copies") and "`tulle down`" in r.hint
    assert results(f)["the NATS cluster is healthy"].result is Result.SUCCESS


def test_a_stream_without_a_leader_is_an_error_and_a_server_behind_a_warning():
    f = facts()
    f.bus.servers, f.bus.cluster_name = 3, "tulle"
    f.bus.streams = {"KV_tulle-endpoints": stream("KV_tulle-endpoints", 3, clustered=True, leader="nats-0", peers=[
        nats.Replica("nats-1"), nats.Replica("nats-2", current=False, lag=7)])}
    r = results(f)["the NATS cluster is healthy"]
    assert (r.result, r.error) == (Result.WARNING, "the copies on nats-2 are not current: KV_tulle-endpoints "
                                                   "(7 operations behind)")
    f.bus.streams["TULLE_EVENTS"] = stream("TULLE_EVENTS", 3, clustered=True, leader="")
    r = results(f)["the NATS cluster is healthy"]
    assert r.result is Result.ERROR
    assert r.error.splitlines()[0] == "TULLE_EVENTS has no leader: fewer than a quorum of its 3 servers answer"


def test_the_control_plane_runs_without_proxies_and_says_so():
    got = results(facts())
    assert got["the control plane runs without proxies, by design"].result is Result.SUCCESS
    f = facts()
    f.services[0].proxied = True
    r = results(f)["the control plane runs without proxies, by design"]
    assert (r.result, r.error) == (Result.WARNING, "the run record gives destination a proxy")


def test_a_certificate_under_anchors_the_installation_does_not_have_is_an_error():
    f = facts()
    f.bus.heartbeats["demo.web"] = heartbeat(trust_anchors=pki.cert_fingerprints(pki.new_trust_anchor().cert_pem))
    r = results(f)["data plane proxies have valid certificates"]
    assert r.result is Result.ERROR
    assert r.error.startswith("demo/web: its certificate does not chain to the installation's trust anchors")


def test_the_renewal_window_follows_the_certificate_lifetime_and_the_issuer_may_cut_it_short():
    f = facts(cert_lifetime_s=3600.0)  # a proxy asks again with 18 minutes left
    f.bus.heartbeats["demo.web"] = heartbeat(cert_expiry=NOW + 30 * 60)
    assert results(f)["data plane proxies have valid certificates"].result is Result.SUCCESS
    f.bus.heartbeats["demo.web"] = heartbeat(cert_expiry=NOW + 10 * 60)
    assert results(f)["data plane proxies have valid certificates"].result is Result.WARNING
    # An issuer ending in two hours ends every certificate with it: the issuer is what to renew.
    issuer = pki.new_issuer(ANCHOR, lifetime=dt.timedelta(hours=2))
    f = facts(identity=IdentityMaterial("ca.crt", "issuer.crt", ANCHOR.cert_pem, issuer.cert_pem, issuer.key_pem))
    f.bus.heartbeats["demo.web"] = heartbeat(cert_expiry=issuer.cert.not_valid_after_utc.timestamp())
    got = results(f)
    assert got["data plane proxies have valid certificates"].result is Result.SUCCESS
    assert got["issuer cert is valid for at least 60 days"].result is Result.WARNING
