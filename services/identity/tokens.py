"""Who a certify request's token proves: (namespace, serviceaccount), or None.

- Local mode: the runner mints an HMAC token per workload (`tulle.pki.make_local_token`)
  with a secret only it and this service read (`--token-secret-file`).
- Kubernetes: the proxy sends its projected service-account token (audience
  `identity.tulle.dev`); a TokenReview asks the API server who it belongs to. An API
  server or token that does not do audiences gets a second review without one, as
  Linkerd falls back to the pod's default token.

A verifier answers None for a token that proves nothing, and raises `TokenReviewUnavailable`
when it cannot tell (the API server is down): the proxy then retries instead of being told
it is unauthenticated.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Optional, Protocol

from tulle import pki
from tulle.errors import UserError
from tulle.log import get_logger

TOKEN_AUDIENCE = "identity.tulle.dev"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class TokenReviewUnavailable(Exception):
    """The token could not be checked now (API server unreachable or failing)."""


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> Optional[tuple[str, str]]:
        """(namespace, serviceaccount) the token proves, or None."""
        ...


class LocalTokenVerifier:
    """HMAC tokens of local mode."""

    def __init__(self, secret: bytes):
        if not secret:
            raise ValueError("empty token secret")
        self.secret = secret

    @classmethod
    def from_file(cls, path: str | Path) -> "LocalTokenVerifier":
        try:
            secret = Path(path).read_bytes()
        except OSError as e:
            raise UserError(f"--token-secret-file {path}: cannot read: {e.strerror or e}") from None
        if not secret.strip():
            raise UserError(f"--token-secret-file {path}: the file is empty")
        return cls(secret)

    async def verify(self, token: str) -> Optional[tuple[str, str]]:
        if not token:
            return None
        return pki.verify_local_token(self.secret, token)


def serviceaccount_of(username: str) -> Optional[tuple[str, str]]:
    """(namespace, serviceaccount) of `system:serviceaccount:<ns>:<sa>`, or None."""
    parts = username.split(":")
    if len(parts) != 4 or parts[0] != "system" or parts[1] != "serviceaccount":
        return None
    ns, sa = parts[2], parts[3]
    if not DNS1123_LABEL.match(ns) or not DNS1123_LABEL.match(sa):
        return None
    return ns, sa


class KubeTokenVerifier:
    """TokenReview through the `kubernetes` client (which is synchronous: run in a thread)."""

    def __init__(self, api_client, audience: str = TOKEN_AUDIENCE, timeout_s: float = 5.0):
        from kubernetes import client

        self.api = client.AuthenticationV1Api(api_client)
        self.audience = audience
        self.timeout_s = timeout_s
        self.log = get_logger()

    async def verify(self, token: str) -> Optional[tuple[str, str]]:
        if not token:
            return None
        return await asyncio.to_thread(self._verify, token)

    def _review(self, token: str, audiences: Optional[list[str]]):
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
        try:
            return self.api.create_token_review(body, _request_timeout=self.timeout_s).status, None
        except ApiException as e:
            if 400 <= (e.status or 0) < 500 and e.status not in (401, 403, 429):
                return None, f"{e.status} {e.reason}: {(e.body or '')[:200]}"  # the request itself was refused
            raise TokenReviewUnavailable(f"TokenReview failed: {e.status} {e.reason}") from None
        except Exception as e:  # urllib3 / connection errors: cannot tell now
            raise TokenReviewUnavailable(f"TokenReview failed: {type(e).__name__}: {e}") from None

    def _verify(self, token: str) -> Optional[tuple[str, str]]:
        status, refused = self._review(token, [self.audience])
        if refused is not None or (status is not None and not status.authenticated
                                   and "audience" in (status.error or "").lower()):
            # An API server without audience support, or a token for the API server's own audience.
            self.log.debug("token review with audience refused; retrying without", reason=refused or status.error)
            status, refused = self._review(token, None)
        if status is None or not status.authenticated or status.user is None:
            return None
        return serviceaccount_of(status.user.username or "")
