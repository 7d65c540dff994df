"""The pure core of `tulle check`: evaluation, Linkerd's three outputs, and the identity
checks both modes share — no I/O."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tulle import pki
from tulle.check import core
from tulle.check.core import Category, Check, Result, error, evaluate, ok, warning
from tulle.check.identity import IdentityMaterial, identity_checks


def _report() -> core.Report:
    cats = [
        Category("first-things", (
            Check("it answers", lambda f: ok()),
            Check("it is fast enough", lambda f: warning("slow: 3 s", "give it more CPU")),
        )),
        Category("second", (
            Check("it is there", lambda f: error("gone\nreally gone", "start it again")),
            Check("it does not apply here", lambda f: None),
        )),
    ]
    return evaluate(cats, None)


def test_the_table_shows_every_category_underlined_and_a_hint_under_each_warning_and_error():
    assert core.render_table(_report()) == (
        "first-things\n"
        "------------\n"
        "\u221a it answers\n"
        "\u203c it is fast enough\n"
        "    slow: 3 s\n"
        "    hint: give it more CPU\n"
        "\n"
        "second\n"
        "------\n"
        "\u00d7 it is there\n"
        "    gone\n"
        "    really gone\n"
        "    hint: start it again\n"
        "\n"
        "Status check results are \u00d7\n")


def test_short_shows_only_what_is_not_success_under_its_category_and_the_summary():
    assert core.render_short(_report()) == (
        "first-things\n------------\n\u203c it is fast enough\n    slow: 3 s\n    hint: give it more CPU\n\n"
        "second\n------\n\u00d7 it is there\n    gone\n    really gone\n    hint: start it again\n\n"
        "Status check results are \u00d7\n")


def test_short_is_the_summary_line_alone_when_everything_passes():
    report = evaluate([Category("all", (Check("a", lambda f: ok()), Check("b", lambda f: ok())))], None)
    assert core.render_short(report) == "Status check results are \u221a\n"


def test_warnings_alone_do_not_fail_the_check():
    report = evaluate([Category("c", (Check("a", lambda f: warning("soon", "do it")),))], None)
    assert report.success and report.warnings == 1
    assert core.render_short(report).endswith("Status check results are \u221a\n")


def test_json_has_linkerds_shape_with_hint_and_error_only_where_there_is_one():
    doc = json.loads(core.render_json(_report()))
    assert doc == {"success": False, "categories": [
        {"categoryName": "first-things", "checks": [
            {"description": "it answers", "result": "success"},
            {"description": "it is fast enough", "hint": "give it more CPU", "error": "slow: 3 s", "result": "warning"},
        ]},
        {"categoryName": "second", "checks": [
            {"description": "it is there", "hint": "start it again", "error": "gone\nreally gone", "result": "error"},
        ]},
    ]}


def test_a_failed_fatal_check_ends_the_run_and_a_passed_one_does_not():
    ran = []

    def later(f):
        ran.append(1)
        return ok()

    cats = [Category("api", (Check("reachable", lambda f: error("refused", "start it"), fatal=True),)),
            Category("rest", (Check("later", later),))]
    report = evaluate(cats, None)
    assert [r.description for r in report.results] == ["reachable"] and ran == []
    cats[0] = Category("api", (Check("reachable", lambda f: ok(), fatal=True),))
    assert [r.description for r in evaluate(cats, None).results] == ["reachable", "later"]


def test_a_check_that_raises_is_an_error_naming_the_bug_not_a_traceback():
    report = evaluate([Category("c", (Check("broken", lambda f: 1 / 0), Check("next", lambda f: ok())))], None)
    first = report.results[0]
    assert first.result is Result.ERROR and "ZeroDivisionError" in first.error and "bug" in first.hint
    assert report.results[1].result is Result.SUCCESS


def test_every_warning_and_error_must_carry_a_hint():
    with pytest.raises(ValueError):
        warning("soon", "")
    with pytest.raises(ValueError):
        error("broken", "")


def test_only_failures_of_transient_checks_are_worth_waiting_for():
    permanent = evaluate([Category("c", (Check("x", lambda f: error("bad", "fix")),))], None)
    transient = evaluate([Category("c", (Check("x", lambda f: error("bad", "wait"), transient=True),))], None)
    assert not permanent.worth_waiting and transient.worth_waiting


def test_colour_marks_are_ansi_on_a_terminal_only():
    report = evaluate([Category("c", (Check("x", lambda f: ok()),))], None)
    assert "\x1b[" not in core.render_table(report, colour=False)
    assert "\x1b[32m" in core.render_table(report, colour=True)  # green √


# --- identity --------------------------------------------------------------------------------------


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _material(anchor: pki.CA, issuer: pki.CA, at: dt.datetime | None = None, **kw) -> IdentityMaterial:
    return IdentityMaterial(anchors_where="ca.crt", issuer_where="issuer.crt", anchors_pem=anchor.cert_pem,
                            issuer_cert_pem=issuer.cert_pem, issuer_key_pem=issuer.key_pem,
                            fix_anchors="FIX-ANCHORS", fix_issuer="FIX-ISSUER", now=at or now(), **kw)


def _identity(m: IdentityMaterial) -> dict[str, core.CheckResult]:
    report = evaluate([Category("tulle-identity", identity_checks(lambda f: f))], m)
    return {r.description: r for r in report.results}


def test_valid_material_passes_every_identity_check_as_linkerd_names_them():
    anchor = pki.new_trust_anchor()
    results = _identity(_material(anchor, pki.new_issuer(anchor)))
    assert list(results) == [
        "certificate config is valid", "trust anchors are using supported crypto algorithm",
        "trust anchors are within their validity period", "trust anchors are valid for at least 60 days",
        "issuer cert is using supported crypto algorithm", "issuer cert is within its validity period",
        "issuer cert is valid for at least 60 days", "issuer cert is issued by the trust anchor"]
    assert all(r.result is Result.SUCCESS for r in results.values())


def test_an_issuer_expiring_within_60_days_is_a_warning_with_its_date():
    anchor = pki.new_trust_anchor()
    issuer = pki.new_issuer(anchor, lifetime=dt.timedelta(days=30))
    r = _identity(_material(anchor, issuer))["issuer cert is valid for at least 60 days"]
    assert r.result is Result.WARNING and r.hint == "FIX-ISSUER"
    assert f"{issuer.cert.not_valid_after_utc:%Y-%m-%d}" in r.error and "(in 29 days)" in r.error


def test_an_expired_issuer_is_an_error_and_an_expiring_anchor_a_warning():
    anchor = pki.new_trust_anchor(lifetime=dt.timedelta(days=400))
    issuer = pki.new_issuer(anchor, lifetime=dt.timedelta(days=365))
    results = _identity(_material(anchor, issuer, at=now() + dt.timedelta(days=370)))
    assert results["issuer cert is within its validity period"].result is Result.ERROR
    assert "expired on" in results["issuer cert is within its validity period"].error
    assert results["trust anchors are valid for at least 60 days"].result is Result.WARNING
    assert results["trust anchors are valid for at least 60 days"].hint == "FIX-ANCHORS"


def test_an_issuer_signed_by_another_anchor_is_an_error():
    issuer = pki.new_issuer(pki.new_trust_anchor())
    r = _identity(_material(pki.new_trust_anchor(), issuer))["issuer cert is issued by the trust anchor"]
    assert r.result is Result.ERROR and "not signed by any trust anchor in ca.crt" in r.error


def test_an_issuer_key_that_is_not_the_certificates_is_a_config_error():
    anchor = pki.new_trust_anchor()
    m = _material(anchor, pki.new_issuer(anchor))
    m.issuer_key_pem = pki.new_issuer(anchor).key_pem
    results = _identity(m)
    assert results["certificate config is valid"].result is Result.ERROR
    assert "does not belong to the issuer certificate" in results["certificate config is valid"].error


def test_missing_anchors_say_where_and_the_later_checks_do_not_pile_up():
    anchor = pki.new_trust_anchor()
    m = _material(anchor, pki.new_issuer(anchor))
    m.anchors_pem, m.anchors_problem = None, "missing"
    results = _identity(m)
    assert list(results) == ["certificate config is valid"]
    assert results["certificate config is valid"].error == "ca.crt: missing"
    assert results["certificate config is valid"].hint == "FIX-ANCHORS"


def test_an_rsa_anchor_is_refused_as_an_unsupported_algorithm():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-root")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now() - dt.timedelta(days=1)).not_valid_after(now() + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True).sign(key, hashes.SHA256()))
    anchor = pki.new_trust_anchor()
    m = _material(anchor, pki.new_issuer(anchor))
    m.anchors_pem = cert.public_bytes(serialization.Encoding.PEM) + anchor.cert_pem
    r = _identity(m)["trust anchors are using supported crypto algorithm"]
    assert r.result is Result.ERROR and "rsa-root" in r.error and "P-256" in r.error
