"""The bus's door for workload proxies: NATS auth callout, answered by identity.

nats-server sends every connecting client that is not a static user (tulle/busauth.py)
to `$SYS.REQ.USER.AUTH`. Identity checks the token the client presented — the same
workload token it checks on certify — and answers with a user JWT, signed by the callout
issuer key nats-server trusts, that grants the permissions of that one workload
(`busauth.proxy_permissions(namespace, pod)`), expiring with the token. Anything else is
refused with a reason nats-server logs. Replicas share the work through a queue group.

The decision is pure (`decide`); `CalloutResponder` is the NATS adapter around it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Optional

from nats.aio.msg import Msg

from services.identity.tokens import TokenReviewUnavailable, TokenSubject, TokenVerifier
from tulle import busauth, natsjwt
from tulle.bus import Bus
from tulle.log import get_logger
from tulle.metrics import REGISTRY, Registry

RESULTS = ("ok", "unauthenticated", "unbound", "unavailable", "malformed")


@dataclass(frozen=True)
class Verdict:
    result: str  # one of RESULTS
    subject: Optional[TokenSubject] = None
    reason: str = ""


def decide(subject: Optional[TokenSubject]) -> Verdict:
    """May a client proving `subject` join the bus as a workload proxy?"""
    if subject is None:
        return Verdict("unauthenticated", reason="the token does not prove a workload")
    if not subject.pod:
        # The bus permissions are per workload: a token that names no pod cannot be scoped.
        return Verdict("unbound", subject, "the token is not bound to a pod")
    return Verdict("ok", subject)


class CalloutResponder:
    """`bus` is the responder's own connection with the `callout` role's credential (the
    AUTH account): it is started here and closed by `close`."""

    def __init__(self, bus: Bus, verifier: TokenVerifier, issuer_seed: bytes, *,
                 max_lifetime_s: float = 24 * 3600, concurrency: int = 32, registry: Registry = REGISTRY):
        self.bus = bus
        self.concurrency = concurrency
        self._running: set[asyncio.Task] = set()
        self._started = False
        self.verifier = verifier
        self.issuer_seed = issuer_seed
        self.max_lifetime_s = max_lifetime_s
        self.log = get_logger(part="bus-auth")
        logins = registry.counter("tulle_identity_bus_logins_total",
                                  "Workload proxies' NATS logins answered through auth callout, by result", ("result",))
        self.m_logins = {r: logins.labels(r) for r in RESULTS}

    async def start(self) -> None:
        """Connect (this responder's own connection, in the AUTH account) and answer logins."""
        if not self._started:
            self._started = True
            await self.bus.start()
        slots = asyncio.Semaphore(self.concurrency)

        async def on_request(msg: Msg) -> None:
            # A TokenReview waits on the API server: answer several logins at once.
            await slots.acquire()
            task = asyncio.ensure_future(self._on_request(msg))
            self._running.add(task)
            task.add_done_callback(lambda t: (self._running.discard(t), slots.release()))

        await self.bus.subscribe_raw(busauth.CALLOUT_SUBJECT, on_request, queue=busauth.CALLOUT_QUEUE)
        self.log.info("answering bus logins of workload proxies", subject=busauth.CALLOUT_SUBJECT)

    async def close(self) -> None:
        await asyncio.gather(*self._running, return_exceptions=True)
        await self.bus.close()

    async def _on_request(self, msg: Msg) -> None:
        try:
            request = natsjwt.parse_callout_request(msg.data)
        except natsjwt.JWTError as e:
            # Without the request's user key there is nothing to answer: nats-server times out and refuses.
            self.m_logins["malformed"].inc()
            self.log.warning("ignored an authorization request that does not decode", error=str(e))
            return
        try:
            verdict = decide(await self.verifier.verify(request.token))
        except TokenReviewUnavailable as e:
            verdict = Verdict("unavailable", reason=f"cannot check the token now: {e}")
        self.m_logins[verdict.result].inc()
        if verdict.result == "ok":
            s = verdict.subject
            expires = time.time() + self.max_lifetime_s
            if s.expires:
                expires = min(expires, s.expires)
            user = natsjwt.user_jwt(self.issuer_seed, request, account=busauth.MESH_ACCOUNT,
                                    name=f"proxy/{s.namespace}/{s.pod}",
                                    permissions=busauth.proxy_permissions(s.namespace, s.pod),
                                    expires=int(expires), max_subscriptions=busauth.PROXY_MAX_SUBSCRIPTIONS)
            answer = natsjwt.callout_response(self.issuer_seed, request, user=user)
            self.log.debug("bus login", namespace=s.namespace, workload=s.pod, host=request.client_host)
        else:
            answer = natsjwt.callout_response(self.issuer_seed, request, error=verdict.reason)
            self.log.info("bus login refused", result=verdict.result, reason=verdict.reason,
                          host=request.client_host, client=request.client_name[:128])
        try:
            await msg.respond(answer)
        except Exception as e:  # the connection dropped meanwhile: the client will try again
            self.log.debug("could not answer a bus login", error=str(e) or type(e).__name__)
