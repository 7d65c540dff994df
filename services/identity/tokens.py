"""Who a workload's token proves: its namespace, service account and pod, or nothing.

The same token proves a proxy twice: on certify (which identity it may have) and when it
connects to NATS (auth callout: which workload's bus permissions it gets).

- Local mode: the runner mints an HMAC token per workload (`tulle.pki.make_local_token`)
  with a secret only it and this service read (`--token-secret-file`); it names the
  workload, carries the audience `identity.tulle.<trust-domain>` and expires.
- Kubernetes: the proxy sends its projected service-account token, whose audience is
  `identity.tulle.<trust-domain>`; a TokenReview *with that audience* asks the API server
  who it belongs to (a token for any other audience — the API server's own included — is
  refused). Bound tokens name their pod. Answers are cached briefly, keyed by a hash of
  the token, so a reconnect storm or a certify retry loop costs the API server little.

A verifier answers None for a token that proves nothing, and raises `TokenReviewUnavailable`
when it cannot tell (the API server is down): the proxy then retries instead of being told
it is unauthenticated.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from tulle import pki
from tulle.errors import UserError
from tulle.log import get_logger

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"


def token_audience(trust_domain: str) -> str:
    return f"identity.tulle.{trust_domain}"


@dataclass(frozen=True)
class TokenSubject:
    """What a token proves."""

    namespace: str
    serviceaccount: str
    pod: str = ""  # the workload (pod) the token is bound to; "" when the token names none
    expires: float = 0.0  # unix seconds; 0 = unknown

    @property
    def account(self) -> tuple[str, str]:
        return self.namespace, self.serviceaccount


class TokenReviewUnavailable(Exception):
    """The token could not be checked now (API server unreachable or failing)."""


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> Optional[TokenSubject]:
        """What the token proves, or None."""
        ...


class LocalTokenVerifier:
    """HMAC tokens of local mode."""

    def __init__(self, secret: bytes, audience: str):
        if not secret:
            raise ValueError("empty token secret")
        self.secret = secret
        self.audience = audience

    @classmethod
    def from_file(cls, path: str | Path, audience: str) -> "LocalTokenVerifier":
        try:
            secret = Path(path).read_bytes()
        except OSError as e:
            raise UserError(f"--token-secret-file {path}: cannot read: {e.strerror or e}") from None
        if not secret.strip():
            raise UserError(f"--token-secret-file {path}: the file is empty")
        return cls(secret, audience)

    async def verify(self, token: str) -> Optional[TokenSubject]:
        if not token:
            return None
        claims = pki.verify_local_token(self.secret, token, audience=self.audience)
        if claims is None:
            return None
        return TokenSubject(claims.namespace, claims.serviceaccount, claims.workload, claims.expires)


def serviceaccount_of(username: str) -> Optional[tuple[str, str]]:
    """(namespace, serviceaccount) of `system:serviceaccount:<ns>:<sa>`, or None."""
    parts = username.split(":")
    if len(parts) != 4 or parts[0] != "system" or parts[1] != "serviceaccount":
        return None
    ns, sa = parts[2], parts[3]
    if not DNS1123_LABEL.match(ns) or not DNS1123_LABEL.match(sa):
        return None
    return ns, sa


class ReviewCache:
    """TokenReview answers by token hash: positive ones for `ttl_s`, refusals for `negative_ttl_s`,
    at most `size` entries (oldest dropped first)."""

    def __init__(self, ttl_s: float = 30.0, negative_ttl_s: float = 5.0, size: int = 10_000):
        self.ttl_s, self.negative_ttl_s, self.size = ttl_s, negative_ttl_s, size
        self._entries: OrderedDict[str, tuple[float, Optional[TokenSubject]]] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def get(self, token: str, now: float) -> tuple[bool, Optional[TokenSubject]]:
        key = self.key(token)
        entry = self._entries.get(key)
        if entry is None or entry[0] <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return False, None
        self.hits += 1
        return True, entry[1]

    def put(self, token: str, subject: Optional[TokenSubject], now: float) -> None:
        ttl = self.ttl_s if subject is not None else self.negative_ttl_s
        if subject is not None and subject.expires:
            ttl = min(ttl, max(0.0, subject.expires - time.time()))
        key = self.key(token)
        self._entries[key] = (now + ttl, subject)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class KubeTokenVerifier:
    """TokenReview through the `kubernetes` client (which is synchronous: run in a thread)."""

    def __init__(self, api_client, audience: str, timeout_s: float = 5.0, cache: Optional[ReviewCache] = None):
        from kubernetes import client

        self.api = client.AuthenticationV1Api(api_client)
        self.audience = audience
        self.timeout_s = timeout_s
        self.cache = cache if cache is not None else ReviewCache()
        self.reviews = 0  # TokenReviews sent to the API server
        self.log = get_logger()

    async def verify(self, token: str) -> Optional[TokenSubject]:
        if not token:
            return None
        now = time.monotonic()
        found, subject = self.cache.get(token, now)
        if found:
            return subject
        subject = await asyncio.to_thread(self._verify, token)
        self.cache.put(token, subject, time.monotonic())
        return subject

    def _verify(self, token: str) -> Optional[TokenSubject]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        self.reviews += 1
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[self.audience]))
        try:
            status = self.api.create_token_review(body, _request_timeout=self.timeout_s).status
        except ApiException as e:
            if 400 <= (e.status or 0) < 500 and e.status not in (401, 403, 429):
                self.log.info("token review refused", status=e.status, reason=e.reason)
                return None  # the request itself was refused: nothing proven
            raise TokenReviewUnavailable(f"TokenReview failed: {e.status} {e.reason}") from None
        except Exception as e:  # urllib3 / connection errors: cannot tell now
            raise TokenReviewUnavailable(f"TokenReview failed: {type(e).__name__}") from None
        if status is None or not status.authenticated or status.user is None:
            return None
        # An API server that ignores audiences would answer for any token: insist on ours.
        if status.audiences is not None and self.audience not in status.audiences:
            return None
        account = serviceaccount_of(status.user.username or "")
        if account is None:
            return None
        extra = status.user.extra or {}
        pods = extra.get(POD_NAME_EXTRA) or []
        return TokenSubject(account[0], account[1], pods[0] if pods else "", _jwt_expiry(token))


def _jwt_expiry(token: str) -> float:
    """The `exp` of a service-account JWT the API server has just vouched for (0 if absent)."""
    import base64

    import orjson

    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims.get("exp") or 0)
    except (IndexError, ValueError, TypeError, AttributeError, orjson.JSONDecodeError):
        return 0.0
