"""What both modes judge of one proxy's certificate, from the heartbeat it writes to
`tulle-proxies` (tulle/schemas.py ProxyHeartbeat): its identity, its expiry, and the
anchors it verified the certificate against.

The heartbeat does not carry the certificate, so its chain is judged from what the proxy
guarantees: it installs a certificate only once it chains to the trust anchors it was
started with (proxy/identity.py refuses any other), and the heartbeat names those anchors
(`trust_anchors`). A proxy whose anchors are all the installation's therefore holds a
certificate under the installation's anchors; one that trusts none of them cannot.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable, Iterable, Optional

from tulle import schemas
from tulle.check.core import Outcome, Result, error, ok, warning

# A proxy asks for a new certificate once 70 % of the current one's life has passed
# (proxy/identity.py REFRESH_FRACTION, as Linkerd's proxy): a certificate in its last 30 %
# has missed its renewal. The grace covers the renewal itself and the next heartbeat (5 s).
RENEWAL_WINDOW_FRACTION = 0.3
RENEWAL_GRACE_S = 60.0
# The identity service's certificate lifetime unless told otherwise (its --lifetime, Linkerd's
# identity.issuer.issuanceLifetime).
DEFAULT_LIFETIME_S = 24 * 3600.0


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _left(seconds: float) -> str:
    if seconds >= 1.5 * 3600:
        return f"{round(seconds / 3600)} hours"
    return f"{round(max(seconds, 0) / 60)} minutes"


def certificate_verdict(hb: schemas.ProxyHeartbeat, *, now: float, expected_identity: str = "",
                        installation_anchors: frozenset[str] | set[str] = frozenset(),
                        lifetime_s: float = DEFAULT_LIFETIME_S,
                        issuer_not_after: Optional[float] = None) -> Optional[tuple[Result, str]]:
    """None when the proxy's certificate is fine; else (ERROR or WARNING, what is wrong — a
    phrase that follows the proxy's name)."""
    if not hb.cert_expiry:
        return Result.ERROR, "no certificate yet"
    if hb.cert_expiry <= now:
        return Result.ERROR, f"its certificate expired at {iso(hb.cert_expiry)}"
    if expected_identity and hb.identity != expected_identity:
        return Result.ERROR, f"its certificate is for {hb.identity or '(none)'}, not {expected_identity}"
    if installation_anchors and hb.trust_anchors and not set(hb.trust_anchors) & set(installation_anchors):
        return Result.ERROR, ("its certificate does not chain to the installation's trust anchors "
                              "(it was verified against the proxy's own, none of them the installation's)")
    left = hb.cert_expiry - now
    # A certificate that ends with the issuer was cut short by it: the issuer is what to renew,
    # and the identity checks say so.
    capped = issuer_not_after is not None and hb.cert_expiry >= issuer_not_after - 1
    if not capped and left < RENEWAL_WINDOW_FRACTION * lifetime_s - RENEWAL_GRACE_S:
        return Result.WARNING, (f"its certificate expires at {iso(hb.cert_expiry)} (in {_left(left)}) and was not "
                                f"renewed at 70 % of its life")
    return None


def certificates_outcome(verdicts: Iterable[tuple[Any, str, Optional[tuple[Result, str]]]],
                         hint: Callable[[Any], str]) -> Outcome:
    """One check line for many proxies: each (subject, its name, its certificate_verdict) in
    order; errors first, then warnings; `hint(subject)` for the first one at fault."""
    errors, warnings, first = [], [], None
    for subject, name, verdict in verdicts:
        if verdict is None:
            continue
        (errors if verdict[0] is Result.ERROR else warnings).append(f"{name}: {verdict[1]}")
        first = subject if first is None else first
    if not errors and not warnings:
        return ok()
    return error("\n".join(errors + warnings), hint(first)) if errors else warning("\n".join(warnings), hint(first))
