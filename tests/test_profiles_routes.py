"""Route matching and response classification in the proxy (pure, no I/O).

Profiles are written as a user would (YAML), parsed strictly, compiled by destination
and carried through the bus codec, exactly as a proxy receives them.
"""

import textwrap

import pytest

from proxy.profiles import (
    DEFAULT_ROUTE, MAX_REPLAY_BODY, ReplayBuffer, RetryBudget, RouteTable, may_retry, request_path,
)
from services.destination.compile import Settings, compile_profile
from tulle import schemas
from tulle.codec import decode, encode
from tulle.resources.parse import load_documents, parse_object


def table(spec_yaml: str, service="authors", namespace="demo") -> RouteTable:
    doc = {
        "apiVersion": "tulle.dev/v1alpha1", "kind": "ServiceProfile",
        "metadata": {"name": f"{service}.{namespace}.svc.cluster.local", "namespace": namespace},
        "spec": load_documents(textwrap.dedent(spec_yaml))[0][1],
    }
    profile = compile_profile(parse_object(doc), Settings())
    return RouteTable.from_profile(decode(schemas.Profile, encode(profile)))


BOOKS = """
routes:
- name: GET /books/{id}
  condition: {method: GET, pathRegex: '/books/[^/]*'}
  timeout: 300ms
  isRetryable: true
- name: GET /books
  condition: {method: GET, pathRegex: /books}
- name: writes
  condition:
    all:
    - pathRegex: '/books.*'
    - any: [{method: POST}, {method: PUT}, {method: PATCH}]
- name: everything but GET
  condition:
    not: {method: GET}
"""


def test_the_first_matching_route_wins_in_declaration_order():
    t = table(BOOKS)
    assert t.match("GET", "/books/42").name == "GET /books/{id}"
    assert t.match("GET", "/books").name == "GET /books"
    assert t.match("POST", "/books").name == "writes"  # "everything but GET" matches too, but comes later
    assert t.match("DELETE", "/books/1").name == "everything but GET"


def test_unmatched_requests_belong_to_the_default_route_which_never_retries_or_times_out():
    t = table(BOOKS)
    route = t.match("GET", "/authors")
    assert route.name == DEFAULT_ROUTE and route.timeout_s is None and not route.is_retryable
    assert RouteTable.from_profile(None).match("GET", "/anything").name == DEFAULT_ROUTE


def test_path_regex_must_match_the_whole_path_and_ignores_the_query():
    t = table(BOOKS)
    assert t.match("GET", "/books/42/reviews").name == DEFAULT_ROUTE  # [^/]* stops at the slash
    assert t.match("GET", "/api/books").name == DEFAULT_ROUTE  # not a prefix-free search
    assert t.match("GET", "/books/42?fields=title").name == "GET /books/{id}"
    assert t.match("GET", "http://authors.demo:8080/books?x=1").name == "GET /books"  # absolute-form target


def test_explicit_anchors_mean_the_same_as_none():
    t = table("routes: [{name: a, condition: {pathRegex: '^/a$'}}]")
    assert t.match("GET", "/a").name == "a" and t.match("GET", "/ab").name == DEFAULT_ROUTE


def test_several_fields_in_one_condition_must_all_match():
    t = table("routes: [{name: get-a, condition: {method: GET, pathRegex: /a}}]")
    assert t.match("GET", "/a").name == "get-a"
    assert t.match("POST", "/a").name == DEFAULT_ROUTE
    assert t.match("GET", "/b").name == DEFAULT_ROUTE


def test_all_any_and_not_nest():
    t = table("""
    routes:
    - name: reads-outside-admin
      condition:
        all:
        - any: [{method: GET}, {method: HEAD}]
        - not:
            any: [{pathRegex: '/admin(/.*)?'}, {all: [{method: HEAD}, {pathRegex: /private}]}]
    """)
    assert t.match("GET", "/books").name == "reads-outside-admin"
    assert t.match("HEAD", "/books").name == "reads-outside-admin"
    assert t.match("GET", "/admin/users").name == DEFAULT_ROUTE
    assert t.match("HEAD", "/private").name == DEFAULT_ROUTE
    assert t.match("GET", "/private").name == "reads-outside-admin"  # the HEAD-only exclusion does not apply
    assert t.match("POST", "/books").name == DEFAULT_ROUTE


def test_route_timeout_and_retryability_come_from_the_profile():
    route = table(BOOKS).match("GET", "/books/1")
    assert route.timeout_s == pytest.approx(0.3) and route.is_retryable


@pytest.mark.parametrize("status, grpc, failure", [
    (200, None, False), (404, None, False), (499, None, False),
    (500, None, True), (503, None, True), (599, None, True),
    (200, 0, False),    # gRPC OK
    (200, 14, True),    # gRPC UNAVAILABLE in a 200 response
    (200, 5, True),     # NOT_FOUND is a failure for gRPC too
])
def test_without_response_classes_5xx_and_grpc_non_ok_are_failures(status, grpc, failure):
    assert RouteTable.from_profile(None).match("GET", "/").is_failure(status, grpc) is failure


def test_response_classes_decide_in_order_and_fall_back_to_the_default():
    t = table("""
    routes:
    - name: r
      condition: {pathRegex: /.*}
      responseClasses:
      - condition: {status: {min: 404, max: 404}}
        isFailure: true
      - condition: {status: {min: 500, max: 504}}
        isFailure: false
      - condition: {status: {min: 400, max: 599}}
        isFailure: true
      - condition:
          all: [{status: {min: 300, max: 399}}, {not: {status: {min: 302, max: 399}}}]
        isFailure: true
    """)
    r = t.match("GET", "/x")
    assert r.is_failure(404) and r.is_failure(429)      # 4xx declared failures
    assert not r.is_failure(503)                        # "500-504 are fine" comes before "400-599 fail"
    assert r.is_failure(505)
    assert r.is_failure(300) and r.is_failure(301) and not r.is_failure(302)
    assert not r.is_failure(200)                        # no class: the default (not 5xx)
    assert not r.is_failure(200, 0) and r.is_failure(200, 13)  # no class: gRPC default


def test_a_response_class_can_declare_5xx_a_success_even_for_grpc():
    r = table("""
    routes:
    - name: r
      condition: {method: POST}
      responseClasses: [{condition: {status: {min: 500, max: 599}}, isFailure: false}]
    """).match("POST", "/pkg.Svc/Call")
    assert not r.is_failure(503) and not r.is_failure(503, 14)


def test_request_path_handles_every_request_target_form():
    assert request_path("/a/b?c=d") == "/a/b"
    assert request_path("http://h:1/a?x") == "/a"
    assert request_path("http://h:1") == "/"
    assert request_path("*") == "*"


# --- replay buffer and the retry decision ----------------------------------------------


def test_bodies_up_to_64_kib_are_replayable_and_larger_ones_never():
    assert MAX_REPLAY_BODY == 64 * 1024
    ok = ReplayBuffer(content_length=MAX_REPLAY_BODY)
    ok.add(b"x" * MAX_REPLAY_BODY)
    ok.finish()
    assert ok.can_replay and ok.chunks == [b"x" * MAX_REPLAY_BODY]
    assert not ReplayBuffer(content_length=MAX_REPLAY_BODY + 1).replayable


def test_an_unsized_body_growing_past_the_cap_drops_its_buffer_and_becomes_non_replayable():
    body = ReplayBuffer(content_length=None)
    for _ in range(64):
        body.add(b"y" * 1024)
    assert body.replayable
    body.add(b"z")
    body.finish()
    assert not body.can_replay and body.chunks == []


def test_a_body_still_streaming_when_the_response_arrives_cannot_be_replayed():
    body = ReplayBuffer(content_length=10)
    body.add(b"12345")
    assert not body.can_replay


def test_retry_needs_a_failure_a_retryable_route_an_unstarted_response_a_replayable_body_and_budget():
    t = table(BOOKS)
    retryable, plain = t.match("GET", "/books/1"), t.match("GET", "/books")
    budget = RetryBudget(retry_ratio=0.0, min_retries_per_second=1, ttl_s=1.0, clock=lambda: 0.0)
    done = ReplayBuffer(content_length=3)
    done.add(b"abc")
    done.finish()
    assert not may_retry(retryable, failed=False, body=None, response_started=False, budget=budget)
    assert not may_retry(plain, failed=True, body=None, response_started=False, budget=budget)
    assert not may_retry(retryable, failed=True, body=None, response_started=True, budget=budget)
    assert not may_retry(retryable, failed=True, body=ReplayBuffer(content_length=10**6), response_started=False,
                         budget=budget)
    assert budget.available() == 1  # none of the refusals above spent the budget
    assert may_retry(retryable, failed=True, body=done, response_started=False, budget=budget)
    assert not may_retry(retryable, failed=True, body=None, response_started=False, budget=budget)  # spent


def test_a_status_with_only_min_or_only_max_is_that_exact_code():
    r = table("""
    routes:
    - name: r
      condition: {method: GET}
      responseClasses:
      - {condition: {status: {min: 429}}, isFailure: true}
      - {condition: {status: {max: 409}}, isFailure: true}
    """).match("GET", "/")
    assert r.is_failure(429) and r.is_failure(409)
    assert not r.is_failure(430) and not r.is_failure(408)
