"""Service profiles in the proxy: which route a request is, how a response is classified,
may a failed attempt be retried, and the route figures. Pure: no I/O, clock injected.

Called on the outbound hot path, so everything a request needs is prepared when a
profile arrives (`RouteTable.from_profile`): regexes compiled once, conditions turned
into small closures, each route's response classes turned into a status lookup table.

Semantics follow Linkerd's ServiceProfiles:
- routes are tried in order; the first whose condition matches wins; otherwise the
  request belongs to the `[DEFAULT]` route (no timeout, never retried);
- `pathRegex` must match the whole path (Linkerd anchors it as `^…$`), query excluded;
  several fields set in one condition must all match (as `all`); empty `all` matches
  every request, empty `any` none (the parser rejects both);
- a response's class is the first response class whose condition matches its status;
  without one, a response is a failure when its `grpc-status` is not 0 (gRPC) or,
  without `grpc-status`, when its status is 5xx; a connection error is a failure;
- retries draw on a budget (`RetryBudget`, tower's TpsBudget) shared by every route of
  one destination service in this proxy.

What the proxy does with these (decided in the issue, enforced by the proxy): the route
timeout covers the whole request including retries (504 with `tulle-proxy-error` when it
expires); a retry is allowed only for a retryable route, a failed attempt whose response
body has not started reaching the caller, a request body of at most `MAX_REPLAY_BODY`
(`ReplayBuffer`), and while the budget allows; it prefers another endpoint and carries
`tulle-retry-attempt: <n>` (n = 1 for the first retry).
"""

from __future__ import annotations

import re
import time
from typing import Callable, Optional

from tulle import schemas


DEFAULT_ROUTE = "[DEFAULT]"
MAX_REPLAY_BODY = 64 * 1024  # Linkerd's cap on a buffered (replayable) request body
RETRY_ATTEMPT_HEADER = "tulle-retry-attempt"

_Match = Callable[[str, str], bool]
_STATUS_TABLE_SIZE = 600  # response classes are decided for statuses 0..599 in advance


# --- request matching ----------------------------------------------------------------------


def _compile_request_match(rm: schemas.RequestMatch) -> _Match:
    if (rm.method is not None and rm.path_regex is not None
            and rm.all_ is None and rm.any_ is None and rm.not_ is None):
        # The usual route (`tulle profile` writes these): one flat test, cheapest first.
        method, fullmatch = rm.method.upper(), re.compile(rm.path_regex).fullmatch
        return lambda m, p: m == method and fullmatch(p) is not None
    parts: list[_Match] = []
    if rm.method is not None:
        method = rm.method.upper()
        parts.append(lambda m, p, _method=method: m == _method)
    if rm.path_regex is not None:
        fullmatch = re.compile(rm.path_regex).fullmatch  # `^…$` written out is harmless under fullmatch
        parts.append(lambda m, p, _fm=fullmatch: _fm(p) is not None)
    if rm.all_ is not None:
        parts.extend(_compile_request_match(x) for x in rm.all_)
    if rm.any_ is not None:
        alternatives = tuple(_compile_request_match(x) for x in rm.any_)

        def any_of(m: str, p: str, _alts=alternatives) -> bool:
            for alt in _alts:
                if alt(m, p):
                    return True
            return False

        parts.append(any_of)
    if rm.not_ is not None:
        inner = _compile_request_match(rm.not_)
        parts.append(lambda m, p, _inner=inner: not _inner(m, p))
    if len(parts) == 1:
        return parts[0]
    conjunction = tuple(parts)

    def all_of(m: str, p: str, _parts=conjunction) -> bool:
        for part in _parts:
            if not part(m, p):
                return False
        return True

    return all_of


def request_path(target: str) -> str:
    """The path of a request target: origin-form `/a?b`, absolute-form `http://h/a?b`, or `*`."""
    if target[:1] != "/":
        scheme = target.find("://")
        if scheme >= 0:
            slash = target.find("/", scheme + 3)
            target = target[slash:] if slash >= 0 else "/"
    q = target.find("?")
    return target[:q] if q >= 0 else target


# --- response classification ---------------------------------------------------------------


def _compile_response_match(rm: schemas.ResponseMatch) -> Callable[[int], bool]:
    parts: list[Callable[[int], bool]] = []
    if rm.status is not None:
        lo, hi = rm.status.min, rm.status.max
        parts.append(lambda s, _lo=lo, _hi=hi: _lo <= s <= _hi)
    if rm.all_ is not None:
        subs = [_compile_response_match(x) for x in rm.all_]
        parts.append(lambda s, _subs=subs: all(f(s) for f in _subs))
    if rm.any_ is not None:
        subs = [_compile_response_match(x) for x in rm.any_]
        parts.append(lambda s, _subs=subs: any(f(s) for f in _subs))
    if rm.not_ is not None:
        inner = _compile_response_match(rm.not_)
        parts.append(lambda s, _inner=inner: not _inner(s))
    return lambda s, _parts=parts: all(f(s) for f in _parts)


def default_is_failure(status: int, grpc_status: Optional[int] = None) -> bool:
    """Without a matching response class: gRPC by its status, anything else 5xx."""
    if grpc_status is not None:
        return grpc_status != 0
    return status >= 500


class CompiledRoute:
    """One route as the hot path uses it."""

    __slots__ = ("name", "timeout_s", "is_retryable", "_by_status")

    def __init__(self, name: str, timeout_s: Optional[float] = None, is_retryable: bool = False,
                 response_classes: Optional[list[schemas.ResponseClass]] = None):
        self.name = name
        self.timeout_s = timeout_s
        self.is_retryable = is_retryable
        # Per status 0..599: True/False when a response class decides it, None for the default.
        self._by_status: Optional[tuple[Optional[bool], ...]] = None
        if response_classes:
            classes = [(_compile_response_match(c.condition), c.is_failure) for c in response_classes]
            table: list[Optional[bool]] = []
            for status in range(_STATUS_TABLE_SIZE):
                table.append(next((failure for match, failure in classes if match(status)), None))
            self._by_status = tuple(table)

    def is_failure(self, status: int, grpc_status: Optional[int] = None) -> bool:
        """Classify a response: the route's response classes first, else the default.

        For an attempt that got no response at all (connection refused, reset), the
        proxy counts a failure without asking.
        """
        table = self._by_status
        if table is not None and 0 <= status < _STATUS_TABLE_SIZE:
            decided = table[status]
            if decided is not None:
                return decided
        if grpc_status is not None:
            return grpc_status != 0
        return status >= 500

    def __repr__(self) -> str:
        return f"CompiledRoute({self.name!r}, timeout_s={self.timeout_s}, retryable={self.is_retryable})"


class RouteTable:
    """A destination service's routes, in order, plus `[DEFAULT]` and its retry budget settings."""

    __slots__ = ("routes", "default", "retry_budget", "_matchers")

    def __init__(self, routes: list[tuple[_Match, CompiledRoute]], retry_budget: schemas.RetryBudget):
        self._matchers = tuple(routes)
        self.routes = [r for _, r in routes]
        self.default = CompiledRoute(DEFAULT_ROUTE)
        self.retry_budget = retry_budget

    @classmethod
    def from_profile(cls, profile: Optional[schemas.Profile]) -> "RouteTable":
        """Compile a profile once per update. None (no profile): only `[DEFAULT]`, default budget.

        The destination service has validated the profile; a route whose regex still does
        not compile (a newer writer) is skipped rather than failing the whole table.
        """
        if profile is None:
            return cls([], schemas.RetryBudget())
        routes = []
        for r in profile.routes:
            try:
                matcher = _compile_request_match(r.condition)
            except re.error:
                continue
            routes.append((matcher, CompiledRoute(
                r.name, r.timeout_ms / 1000.0 if r.timeout_ms > 0 else None, r.is_retryable,
                r.response_classes)))
        return cls(routes, profile.retry_budget)

    def match(self, method: str, path: str) -> CompiledRoute:
        """The first route matching the request, else `[DEFAULT]`. `path` may carry a query."""
        if not self._matchers:
            return self.default
        if path[:1] != "/" or "?" in path:
            path = request_path(path)
        for matcher, route in self._matchers:
            if matcher(method, path):
                return route
        return self.default

    def budget_settings(self) -> tuple[float, int, float]:
        """(retry_ratio, min_retries_per_second, ttl_s), for `RetryBudget(...)` / `.update(...)`."""
        b = self.retry_budget
        return b.retry_ratio, b.min_retries_per_second, b.ttl_ms / 1000.0


# --- the retry budget ------------------------------------------------------------------------


class RetryBudget:
    """How many retries may happen now: tower's TpsBudget, as Linkerd's proxy uses it.

    Within any `ttl`, retries ≤ `min_retries_per_second` × ttl + `retry_ratio` × original
    requests. The ttl is cut into 10 slots; each slot keeps its balance (deposits minus
    withdrawals) and slots older than the ttl are forgotten. Amounts are integers in
    thousandths of a retry, so a ratio such as 0.2 is exact.

    One per destination service per proxy, shared by all its routes. Call `deposit()` for
    every original request and `try_withdraw()` before each retry.
    """

    SLOTS = 10
    _UNIT = 1000  # one retry costs this many units; a deposit earns ratio × this

    __slots__ = ("_clock", "_slot_s", "_deposit", "_reserve", "_slots", "_slot_index", "_balance", "_settings")

    def __init__(self, retry_ratio: float = 0.2, min_retries_per_second: int = 10, ttl_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._settings: Optional[tuple[float, int, float]] = None
        self.update(retry_ratio, min_retries_per_second, ttl_s)

    def update(self, retry_ratio: float, min_retries_per_second: int, ttl_s: float) -> None:
        """New settings (a profile changed). Unchanged settings keep the balance; changed ones start afresh."""
        settings = (float(retry_ratio), int(min_retries_per_second), float(ttl_s))
        if settings == self._settings:
            return
        if ttl_s <= 0 or retry_ratio < 0 or min_retries_per_second < 0:
            raise ValueError(f"invalid retry budget {settings}")
        self._settings = settings
        self._deposit = int(round(retry_ratio * self._UNIT))
        self._reserve = int(round(min_retries_per_second * ttl_s * self._UNIT))
        self._slot_s = ttl_s / self.SLOTS
        self._slots = [0] * self.SLOTS
        self._slot_index = int(self._clock() / self._slot_s)
        self._balance = 0  # sum of _slots

    @property
    def settings(self) -> tuple[float, int, float]:
        return self._settings  # type: ignore[return-value]

    def _expire(self) -> int:
        """Forget slots older than the ttl; return the current slot's position in the ring."""
        index = int(self._clock() / self._slot_s)
        passed = index - self._slot_index
        if passed:
            slots = self._slots
            if passed >= self.SLOTS or passed < 0:  # a long quiet spell (or a clock jump): all forgotten
                for i in range(self.SLOTS):
                    slots[i] = 0
                self._balance = 0
            else:
                for k in range(1, passed + 1):
                    i = (self._slot_index + k) % self.SLOTS
                    self._balance -= slots[i]
                    slots[i] = 0
            self._slot_index = index
        return index % self.SLOTS

    def deposit(self) -> None:
        """An original request (not a retry) was sent."""
        i = self._expire()
        self._slots[i] += self._deposit
        self._balance += self._deposit

    def try_withdraw(self) -> bool:
        """May a retry happen now? If so, it is counted against the budget."""
        i = self._expire()
        if self._balance + self._reserve >= self._UNIT:
            self._slots[i] -= self._UNIT
            self._balance -= self._UNIT
            return True
        return False

    def available(self) -> float:
        """Retries the budget would allow right now (for metrics and tests)."""
        self._expire()
        return max(0, self._balance + self._reserve) / self._UNIT


# --- replayable request bodies ---------------------------------------------------------------


class ReplayBuffer:
    """Keeps a request body's chunks so a retry can send them again, up to MAX_REPLAY_BODY.

    Chunks are forwarded at once *and* kept (no copy). A declared Content-Length over the
    cap, or a body growing past it, makes the request non-replayable: the chunks are
    dropped and the body streams on. A response that arrives before the body is complete
    also makes it non-replayable (`complete` is False then).
    """

    __slots__ = ("chunks", "size", "replayable", "complete", "limit")

    def __init__(self, content_length: Optional[int] = None, limit: int = MAX_REPLAY_BODY):
        self.chunks: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.replayable = content_length is None or content_length <= limit
        self.complete = content_length == 0

    def add(self, chunk: bytes) -> None:
        if not self.replayable:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.replayable = False
            self.chunks = []
            return
        self.chunks.append(chunk)

    def finish(self) -> None:
        self.complete = True

    @property
    def can_replay(self) -> bool:
        return self.replayable and self.complete


def may_retry(route: CompiledRoute, failed: bool, body: Optional[ReplayBuffer], response_started: bool,
              budget: RetryBudget) -> bool:
    """The retry decision for one failed attempt, in the order that spends the budget last.

    `body` None: the request has no body. `response_started`: some of this attempt's
    response already reached the caller (then it can never be retried).
    """
    return retry_allowed(route, failed, body is None or body.can_replay, response_started, budget)


def retry_allowed(route: CompiledRoute, failed: bool, body_replayable: bool, response_started: bool,
                  budget: RetryBudget) -> bool:
    """`may_retry` for a caller that keeps the body itself (the proxy's HTTP/1 server):
    `body_replayable` = the whole body was read and kept (none counts as kept)."""
    if not (failed and route.is_retryable) or response_started or not body_replayable:
        return False
    return budget.try_withdraw()


def grpc_status_of(headers: list[tuple[bytes, bytes]]) -> Optional[int]:
    """The `grpc-status` among response headers (a trailers-only gRPC answer) or trailers;
    None when absent or not a number (then the HTTP status classifies)."""
    for name, value in headers:
        if len(name) == 11 and name.lower() == b"grpc-status":
            value = value.strip()
            return int(value) if value.isdigit() else None
    return None
