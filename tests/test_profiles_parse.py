"""ServiceProfile manifests: what the strict parser accepts, and what it rejects with a reason
naming the field (invalid regexes, bad durations, nonsense ranges, routes that can never match)."""

import textwrap

import pytest

from tulle.resources import model as m
from tulle.resources.parse import ManifestError, load_documents, parse_object

HEAD = """
apiVersion: tulle.dev/v1alpha1
kind: ServiceProfile
metadata:
  name: authors.demo.svc.cluster.local
  namespace: demo
"""


def parse(spec: str, head: str = HEAD):
    text = textwrap.dedent(head) + "spec:\n" + textwrap.indent(textwrap.dedent(spec), "  ")
    (index, data), = load_documents(text, "sp.yaml")
    return parse_object(data, file="sp.yaml", doc=index)


def rejected(spec: str, head: str = HEAD) -> str:
    with pytest.raises(ManifestError) as e:
        parse(spec, head)
    message = str(e.value)
    assert "\n" not in message and message.startswith("sp.yaml: document 1 (ServiceProfile demo/authors")
    return message


def test_a_full_profile_parses_with_linkerds_field_names():
    sp = parse("""
    routes:
    - name: GET /authors/{id}
      condition:
        method: get
        pathRegex: '/authors/\\d+'
      responseClasses:
      - condition: {status: {min: 500, max: 599}}
        isFailure: true
      isRetryable: true
      timeout: 1m30s
    retryBudget:
      retryRatio: 0.5
      minRetriesPerSecond: 3
      ttl: 20s
    """)
    assert isinstance(sp, m.ServiceProfile) and sp.service == "authors"
    route, = sp.routes
    assert route.condition == m.RequestMatch(method="GET", path_regex="/authors/\\d+")
    assert route.is_retryable and route.timeout_ms == 90000
    assert route.response_classes == (m.ResponseClass(m.ResponseMatch(status=m.StatusRange(500, 599)), True),)
    assert sp.retry_budget == m.RetryBudgetSpec(0.5, 3, 20000)


def test_without_a_retry_budget_none_is_set_and_destination_applies_linkerds_defaults():
    assert parse("routes: []").retry_budget is None


@pytest.mark.parametrize("spec, where, why", [
    ("routes: [{name: a, condition: {pathRegex: '/a/(unclosed'}}]",
     "spec.routes[0].condition.pathRegex", "invalid regular expression"),
    ("routes: [{name: a, condition: {all: [{pathRegex: '*'}]}}]",
     "spec.routes[0].condition.all[0].pathRegex", "invalid regular expression"),
    ("routes: [{name: a, condition: {method: GET}, timeout: 10}]",
     "spec.routes[0].timeout", "expected a duration"),
    ("routes: [{name: a, condition: {method: GET}, timeout: 5 seconds}]",
     "spec.routes[0].timeout", "expected a duration"),
    ("routes: [{name: a, condition: {method: GET}, timeout: 0s}]",
     "spec.routes[0].timeout", "must be positive"),
    ("retryBudget: {ttl: forever}", "spec.retryBudget.ttl", "expected a duration"),
    ("retryBudget: {ttl: 500ms}", "spec.retryBudget.ttl", "must be from 1s to 60s"),
    ("retryBudget: {ttl: 2m}", "spec.retryBudget.ttl", "must be from 1s to 60s"),
    ("retryBudget: {retryRatio: -0.1}", "spec.retryBudget.retryRatio", "expected a number >= 0.0"),
    ("retryBudget: {retryRatio: 1001}", "spec.retryBudget.retryRatio", "at most 1000"),
    ("retryBudget: {minRetriesPerSecond: -1}", "spec.retryBudget.minRetriesPerSecond", "expected an integer"),
    ("routes: [{name: a, condition: {method: GET}, responseClasses: [{condition: {status: {min: 504, max: 500}}}]}]",
     "spec.routes[0].responseClasses[0].condition.status", "min (504) is greater than max (500)"),
    ("routes: [{name: a, condition: {method: GET}, responseClasses: [{condition: {status: {min: 99}}}]}]",
     "spec.routes[0].responseClasses[0].condition.status.min", "expected an integer from 100 to 599"),
    ("routes: [{name: a, condition: {method: GET}, responseClasses: [{condition: {status: {}}}]}]",
     "spec.routes[0].responseClasses[0].condition.status", "needs min, max or both"),
    ("routes: [{name: a, condition: {all: []}}]", "spec.routes[0].condition.all", "must not be empty"),
    ("routes: [{name: a, condition: {any: []}}]", "spec.routes[0].condition.any", "must not be empty"),
    ("routes: [{name: a, condition: {method: GET}, responseClasses: [{condition: {any: []}}]}]",
     "spec.routes[0].responseClasses[0].condition.any", "must not be empty"),
    ("routes: [{name: a, condition: {}}]", "spec.routes[0].condition", "needs one of method, pathRegex"),
    ("routes: [{name: a, condition: {not: {}}}]", "spec.routes[0].condition.not", "needs one of method, pathRegex"),
    ("routes: [{name: a, condition: {method: GET}, responseClasses: [{condition: {}}]}]",
     "spec.routes[0].responseClasses[0].condition", "needs one of status, all, any, not"),
    ("routes: [{name: a, condition: {method: FETCH}}]", "spec.routes[0].condition.method", "unknown HTTP method"),
    ("routes: [{name: a}]", "spec.routes[0].condition", "required"),
    ("routes: [{name: '', condition: {method: GET}}]", "spec.routes[0].name", "must not be empty"),
    ("routes: [{name: a, condition: {method: GET}}, {name: a, condition: {method: POST}}]",
     "spec.routes[1].name", "duplicate route name 'a'"),
])
def test_invalid_profiles_are_rejected_naming_the_field(spec, where, why):
    message = rejected(spec)
    assert f"{where}: " in message and why in message


@pytest.mark.parametrize("name, namespace, where", [
    ("authors", "demo", "metadata.name"),
    ("authors.demo.cluster.local", "demo", "metadata.name"),
    ("authors.demo.svc.cluster.local", "other", "metadata.namespace"),
])
def test_the_name_must_be_the_services_fqdn_in_its_namespace(name, namespace, where):
    head = f"apiVersion: tulle.dev/v1alpha1\nkind: ServiceProfile\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
    with pytest.raises(ManifestError) as e:
        parse("routes: []", head)
    assert f": {where}: " in str(e.value)


@pytest.mark.parametrize("spec, why", [
    # the same condition twice: the second route is shadowed
    ("""
    routes:
    - {name: first, condition: {method: GET, pathRegex: /a}}
    - {name: second, condition: {all: [{pathRegex: /a}, {method: GET}]}}
    """, "route 'second' can never match: route 'first' (spec.routes[0]) has the same condition and comes first"),
    ("""
    routes:
    - {name: first, condition: {any: [{method: GET}, {method: HEAD}]}}
    - {name: second, condition: {any: [{method: HEAD}, {method: GET}]}}
    """, "route 'first' (spec.routes[0]) has the same condition"),
    # an earlier route that matches everything
    ("""
    routes:
    - {name: all, condition: {pathRegex: '.*'}}
    - {name: books, condition: {pathRegex: /books}}
    """, "route 'all' (spec.routes[0]) matches every request and comes first"),
    # conditions that can match nothing
    ("""
    routes:
    - {name: both, condition: {all: [{method: GET}, {method: POST}]}}
    """, "it requires the method to be GET and POST at once"),
    ("""
    routes:
    - {name: contradiction, condition: {all: [{pathRegex: /a}, {not: {pathRegex: /a}}]}}
    """, "a condition and its negation"),
    ("""
    routes:
    - {name: nothing, condition: {not: {pathRegex: '^.*$'}}}
    """, "negates a condition that matches every request"),
])
def test_routes_that_can_never_match_are_rejected(spec, why):
    message = rejected(spec)
    assert ".condition: " in message and why in message


def test_a_response_class_shadowed_by_an_identical_one_is_rejected():
    message = rejected("""
    routes:
    - name: a
      condition: {method: GET}
      responseClasses:
      - {condition: {status: {min: 500, max: 599}}, isFailure: true}
      - {condition: {status: {min: 500, max: 599}}, isFailure: false}
    """)
    assert "spec.routes[0].responseClasses[1].condition: never applies: spec.routes[0].responseClasses[0]" in message


def test_overlapping_but_meaningful_routes_are_fine():
    sp = parse("""
    routes:
    - {name: one book, condition: {method: GET, pathRegex: '/books/\\d+'}}
    - {name: books, condition: {pathRegex: '/books.*'}}
    - {name: rest, condition: {pathRegex: '/.+'}}
    """)
    assert [r.name for r in sp.routes] == ["one book", "books", "rest"]


def test_the_demo_profile_makes_the_flaky_authors_lookup_retryable_with_a_timeout():
    from pathlib import Path

    from proxy.profiles import RouteTable
    from services.destination.compile import Settings, compile_profile
    from tulle.resources.parse import load_file

    demo = Path(__file__).resolve().parent.parent / "examples" / "demo"
    sp, = load_file(demo / "profile-authors.yaml")
    assert sp.meta.name == "authors.demo.svc.cluster.local" and sp.meta.namespace == "demo"
    route = RouteTable.from_profile(compile_profile(sp, Settings())).match("GET", "/authors/3")
    assert route.name == "GET /authors/{id}" and route.is_retryable and route.timeout_s == 2.0
    assert route.is_failure(500)  # the injected failures are what gets retried
