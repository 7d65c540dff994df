"""The certificate authority's pure core: issuer validation, certify decisions, leaf shape,
token parsing and the proxy's renewal schedule. No I/O."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.identity import refresh_delay, retry_delay
from services.identity.ca import (
    CertificateAuthority, IssuerError, chain_verifies, issuer_warnings, load_issuer, parse_duration, trust_bundle,
)
from services.identity.tokens import serviceaccount_of
from tulle import pki
from tulle.schemas import CertifyRequest, identity_name

WEB = identity_name("web", "demo")
API = identity_name("api", "demo")
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def pki_set():
    anchor = pki.new_trust_anchor(lifetime=dt.timedelta(days=3650))
    issuer = pki.new_issuer(anchor, lifetime=dt.timedelta(days=365))
    return anchor, issuer


def material(anchor, issuer, anchors_extra=b""):
    return anchor.cert_pem + anchors_extra, issuer.cert_pem, issuer.key_pem


def ca_for(anchor, issuer, **kw) -> CertificateAuthority:
    return CertificateAuthority(load_issuer(*material(anchor, issuer)), **kw)


def csr_with(key, *, cn=WEB, names=None, ca=False) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]) if cn else x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def request(identity=WEB, csr=None, key=None) -> CertifyRequest:
    return CertifyRequest(identity, "token", csr or pki.new_csr(identity, key or pki.new_key()).decode())


# --- issuer validation ----------------------------------------------------------------------


def test_a_valid_issuer_loads_with_its_chain_and_anchors(pki_set):
    anchor, issuer = pki_set
    loaded = load_issuer(*material(anchor, issuer))
    assert loaded.chain_pem == (issuer.cert_pem.decode(),)
    assert loaded.anchors_pem == anchor.cert_pem.decode()
    assert loaded.not_after == issuer.cert.not_valid_after_utc


def test_an_issuer_that_is_not_signed_by_any_anchor_is_refused(pki_set):
    anchor, _ = pki_set
    stranger = pki.new_issuer(pki.new_trust_anchor())
    with pytest.raises(IssuerError, match=r"issuer.crt: .* does not chain to any trust anchor in ca.crt"):
        load_issuer(anchor.cert_pem, stranger.cert_pem, stranger.key_pem)


def test_an_issuer_key_that_does_not_match_its_certificate_is_refused(pki_set):
    anchor, issuer = pki_set
    with pytest.raises(IssuerError, match="issuer.key: the key does not match the certificate in issuer.crt"):
        load_issuer(anchor.cert_pem, issuer.cert_pem, pki.key_pem(pki.new_key()))


@pytest.mark.parametrize("which,expected", [
    ("anchors", "ca.crt: no PEM certificate found"),
    ("cert", "issuer.crt: no PEM certificate found"),
    ("key", "issuer.key: not a usable private key"),
])
def test_garbage_in_any_file_is_refused_naming_that_file(pki_set, which, expected):
    anchor, issuer = pki_set
    parts = dict(zip(("anchors", "cert", "key"), material(anchor, issuer)))
    parts[which] = b"this is not PEM\n"
    with pytest.raises(IssuerError, match=expected):
        load_issuer(parts["anchors"], parts["cert"], parts["key"])


def test_a_leaf_certificate_cannot_be_the_issuer(pki_set):
    anchor, issuer = pki_set
    leaf, key = pki.issue_leaf(issuer, WEB)
    with pytest.raises(IssuerError, match="is not a CA certificate"):
        load_issuer(anchor.cert_pem, pki.cert_pem(leaf) + issuer.cert_pem, pki.key_pem(key))


def test_an_rsa_issuer_key_is_refused(pki_set):
    anchor, issuer = pki_set
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    with pytest.raises(IssuerError, match="issuer.key: not a usable private key"):
        load_issuer(anchor.cert_pem, issuer.cert_pem, pem)


def test_an_expired_issuer_is_refused(pki_set):
    anchor, issuer = pki_set
    with pytest.raises(IssuerError, match="not now"):
        load_issuer(*material(anchor, issuer), now=issuer.cert.not_valid_after_utc + dt.timedelta(seconds=1))


def test_the_issuer_may_chain_to_any_anchor_of_a_bundle_of_several(pki_set):
    anchor, issuer = pki_set
    other = pki.new_trust_anchor()
    loaded = load_issuer(other.cert_pem + anchor.cert_pem, issuer.cert_pem, issuer.key_pem)
    assert len(loaded.anchors) == 2
    assert loaded.anchors_pem == other.cert_pem.decode() + anchor.cert_pem.decode()


def test_an_issuer_file_with_an_intermediate_chain_is_sent_whole(pki_set):
    anchor, _ = pki_set
    middle = pki.new_issuer(anchor)
    # An issuer one level down (path length of `middle` is 0 in pki, so build it by hand here).
    key = pki.new_key()
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sub")]))
            .issuer_name(middle.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(middle.cert.not_valid_before_utc).not_valid_after(middle.cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(middle.key, hashes.SHA256()))
    loaded = load_issuer(anchor.cert_pem, pki.cert_pem(cert) + middle.cert_pem + anchor.cert_pem, pki.key_pem(key))
    assert loaded.chain_pem == (pki.cert_pem(cert).decode(), middle.cert_pem.decode())  # the anchor copy is dropped


def test_an_issuer_expiring_within_60_days_is_warned_about(pki_set):
    anchor, issuer = pki_set
    loaded = load_issuer(*material(anchor, issuer))
    assert issuer_warnings(loaded, now=loaded.not_after - dt.timedelta(days=61)) == []
    warnings = issuer_warnings(loaded, now=loaded.not_after - dt.timedelta(days=30))
    assert len(warnings) == 1 and "expires in 30 days" in warnings[0]


def test_the_trust_bundle_carries_every_anchor_and_the_issuer_expiry(pki_set):
    anchor, issuer = pki_set
    bundle = trust_bundle(load_issuer(*material(anchor, issuer)), "example.org")
    assert bundle.anchors_pem == anchor.cert_pem.decode()
    assert bundle.trust_domain == "example.org"
    assert bundle.issuer_expiry == issuer.cert.not_valid_after_utc.timestamp()


# --- certify decisions ----------------------------------------------------------------------


def test_a_proven_request_gets_a_leaf_for_exactly_its_identity(pki_set):
    anchor, issuer = pki_set
    resp = ca_for(anchor, issuer).certify(request(), ("demo", "web"))
    assert resp.error is None
    leaf = pki.load_certs(resp.leaf)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [WEB]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/demo/sa/web"]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert resp.chain == [issuer.cert_pem.decode()]
    assert resp.serial == format(leaf.serial_number, "x")
    assert chain_verifies(leaf, pki.load_certs("".join(resp.chain)), [anchor.cert])


def test_the_leaf_lasts_the_configured_lifetime_and_is_backdated_by_the_clock_skew(pki_set):
    anchor, issuer = pki_set
    ca = ca_for(anchor, issuer, lifetime=dt.timedelta(hours=24), clock_skew=dt.timedelta(seconds=20))
    now = issuer.cert.not_valid_before_utc + dt.timedelta(days=1)
    leaf = pki.load_certs(ca.certify(request(), ("demo", "web"), now=now).leaf)[0]
    assert leaf.not_valid_before_utc == (now - dt.timedelta(seconds=20)).replace(microsecond=0)
    assert leaf.not_valid_after_utc == (now + dt.timedelta(hours=24)).replace(microsecond=0)


def test_a_leaf_never_outlives_the_issuer_or_its_anchor():
    anchor = pki.new_trust_anchor(lifetime=dt.timedelta(hours=2))
    issuer = pki.new_issuer(anchor, lifetime=dt.timedelta(hours=3))  # outlives its own anchor
    ca = ca_for(anchor, issuer, lifetime=dt.timedelta(hours=24))
    leaf = pki.load_certs(ca.certify(request(), ("demo", "web")).leaf)[0]
    assert leaf.not_valid_after_utc == anchor.cert.not_valid_after_utc


def test_serials_are_random_and_distinct(pki_set):
    anchor, issuer = pki_set
    ca = ca_for(anchor, issuer)
    serials = {ca.certify(request(), ("demo", "web")).serial for _ in range(20)}
    assert len(serials) == 20 and all(len(s) > 16 for s in serials)


def test_without_a_proven_service_account_the_answer_is_unauthenticated(pki_set):
    anchor, issuer = pki_set
    resp = ca_for(anchor, issuer).certify(request(), None)
    assert resp.error.code == "unauthenticated" and resp.leaf == ""


def test_a_token_for_another_service_account_cannot_get_this_identity(pki_set):
    anchor, issuer = pki_set
    resp = ca_for(anchor, issuer).certify(request(WEB), ("demo", "api"))
    assert resp.error.code == "name-mismatch" and resp.leaf == ""
    assert API in resp.error.message


def test_a_csr_for_another_identity_is_refused(pki_set):
    anchor, issuer = pki_set
    key = pki.new_key()
    req = CertifyRequest(WEB, "token", pki.new_csr(API, key).decode())
    resp = ca_for(anchor, issuer).certify(req, ("demo", "web"))
    assert resp.error.code == "name-mismatch" and resp.leaf == ""


def test_a_csr_with_an_extra_san_is_refused(pki_set):
    anchor, issuer = pki_set
    csr = csr_with(pki.new_key(), names=[x509.DNSName(WEB), x509.DNSName("admin.example.com")])
    resp = ca_for(anchor, issuer).certify(request(csr=csr), ("demo", "web"))
    assert resp.error.code == "name-mismatch"


def test_a_csr_with_a_uri_san_is_refused(pki_set):
    anchor, issuer = pki_set
    csr = csr_with(pki.new_key(), names=[x509.DNSName(WEB), x509.UniformResourceIdentifier("spiffe://evil/ns/x/sa/y")])
    assert ca_for(anchor, issuer).certify(request(csr=csr), ("demo", "web")).error.code == "name-mismatch"


def test_a_csr_asking_for_a_ca_certificate_is_refused(pki_set):
    anchor, issuer = pki_set
    csr = csr_with(pki.new_key(), names=[x509.DNSName(WEB)], ca=True)
    resp = ca_for(anchor, issuer).certify(request(csr=csr), ("demo", "web"))
    assert resp.error.code == "invalid-csr" and "CA" in resp.error.message


def test_a_csr_with_another_common_name_is_refused(pki_set):
    anchor, issuer = pki_set
    csr = csr_with(pki.new_key(), cn="root", names=[x509.DNSName(WEB)])
    assert ca_for(anchor, issuer).certify(request(csr=csr), ("demo", "web")).error.code == "name-mismatch"


@pytest.mark.parametrize("csr", ["", "garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"])
def test_a_malformed_csr_is_refused_as_invalid(pki_set, csr):
    anchor, issuer = pki_set
    resp = ca_for(anchor, issuer).certify(CertifyRequest(WEB, "token", csr), ("demo", "web"))
    assert resp.error.code == "invalid-csr" and resp.leaf == ""


def test_a_csr_whose_signature_does_not_verify_is_refused(pki_set):
    anchor, issuer = pki_set
    good = x509.load_pem_x509_csr(pki.new_csr(WEB, pki.new_key()))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit inside the signature's last integer: still DER, no longer valid
    bad = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    resp = ca_for(anchor, issuer).certify(request(csr=bad), ("demo", "web"))
    assert resp.error.code == "invalid-csr"


def test_a_csr_with_a_p384_key_is_refused(pki_set):
    anchor, issuer = pki_set
    csr = csr_with(ec.generate_private_key(ec.SECP384R1()), names=[x509.DNSName(WEB)])
    assert ca_for(anchor, issuer).certify(request(csr=csr), ("demo", "web")).error.code == "invalid-csr"


def test_without_an_issuer_the_answer_is_internal():
    resp = CertificateAuthority(None).certify(request(), ("demo", "web"))
    assert resp.error.code == "internal"


def test_leaves_name_the_configured_trust_domain(pki_set):
    anchor, issuer = pki_set
    ca = ca_for(anchor, issuer, trust_domain="example.org")
    ident = identity_name("web", "demo", "example.org")
    resp = ca.certify(request(ident), ("demo", "web"))
    assert resp.error is None and pki.cert_identity(pki.load_certs(resp.leaf)[0]) == ident
    assert ca.certify(request(WEB), ("demo", "web")).error.code == "name-mismatch"


# --- tokens, durations, the renewal schedule ---------------------------------------------------


@pytest.mark.parametrize("username,expected", [
    ("system:serviceaccount:demo:web", ("demo", "web")),
    ("system:serviceaccount:demo:Web", None),
    ("system:serviceaccount:demo", None),
    ("system:node:demo:web", None),
    ("jane", None),
    ("system:serviceaccount:demo:web:extra", None),
])
def test_only_service_account_usernames_with_dns_labels_are_identities(username, expected):
    assert serviceaccount_of(username) == expected


AUD = "identity.tulle.cluster.local"


def test_local_tokens_prove_their_workload_only_with_the_right_secret():
    secret = pki.new_token_secret()
    token = pki.make_local_token(secret, "demo", "web", "web-1", AUD)
    claims = pki.verify_local_token(secret, token, audience=AUD)
    assert (claims.namespace, claims.serviceaccount, claims.workload) == ("demo", "web", "web-1")
    assert pki.verify_local_token(pki.new_token_secret(), token, audience=AUD) is None
    prefix, body, mac = token.split(".")
    forged = pki.make_local_token(pki.new_token_secret(), "demo", "api", "api-1", AUD).split(".")[1]
    assert pki.verify_local_token(secret, f"{prefix}.{forged}.{mac}", audience=AUD) is None


def test_local_tokens_expire_and_are_meant_for_one_audience():
    secret = pki.new_token_secret()
    token = pki.make_local_token(secret, "demo", "web", "web-1", AUD, lifetime_s=3600, now=1_000_000)
    assert pki.verify_local_token(secret, token, audience=AUD, now=1_000_000 + 3599) is not None
    assert pki.verify_local_token(secret, token, audience=AUD, now=1_000_000 + 3600) is None  # expired
    assert pki.verify_local_token(secret, token, audience="identity.tulle.example.org", now=1_000_000) is None


def test_durations_read_like_go_durations():
    assert parse_duration("24h", "x") == dt.timedelta(hours=24)
    assert parse_duration("1h30m", "x") == dt.timedelta(minutes=90)
    with pytest.raises(ValueError, match="--lifetime"):
        parse_duration("1 day", "--lifetime")


def test_renewal_is_at_70_percent_of_the_time_left_clamped():
    assert refresh_delay(1000 + 86400, 1000) == pytest.approx(0.7 * 86400)
    assert refresh_delay(1000 + 10, 1000, min_refresh_s=1) == pytest.approx(7)
    assert refresh_delay(1000 + 10, 1000) == 10  # default min refresh: 10 s
    assert refresh_delay(1000 - 5, 1000) == 10  # expired: as soon as allowed
    assert refresh_delay(1000 + 10 * 86400, 1000) == 86400  # max refresh: 24 h


def test_retries_before_a_first_certificate_back_off_up_to_the_min_refresh():
    delays = [retry_delay(n, cap_s=10) for n in range(12)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(d <= 10 for d in delays) and delays[-1] >= 5


def test_a_corrupted_csr_is_always_a_typed_refusal_never_a_crash():
    import base64
    import random

    der = x509.load_pem_x509_csr(pki.new_csr(WEB, pki.new_key())).public_bytes(serialization.Encoding.DER)
    rnd = random.Random(7)
    codes = set()
    for _ in range(1500):
        b = bytearray(der)
        for _ in range(rnd.randint(1, 3)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(b)) + b"-----END CERTIFICATE REQUEST-----\n"
        try:
            pki.check_csr(pem, WEB)
        except pki.CSRError as e:
            codes.add(e.code)
    assert codes <= {"invalid-csr", "name-mismatch"} and "invalid-csr" in codes


def test_the_minimum_refresh_comes_from_the_environment():
    from proxy.identity import min_refresh_from_env
    from tulle.errors import UserError

    assert min_refresh_from_env({}) == 10.0
    assert min_refresh_from_env({"TULLE_PROXY_IDENTITY_MIN_REFRESH": "1s"}) == 1.0
    assert min_refresh_from_env({"TULLE_PROXY_IDENTITY_MIN_REFRESH": "0.5"}) == 0.5
    with pytest.raises(UserError, match="TULLE_PROXY_IDENTITY_MIN_REFRESH"):
        min_refresh_from_env({"TULLE_PROXY_IDENTITY_MIN_REFRESH": "soon"})
