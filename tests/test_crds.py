"""The CRDs in deploy/charts/tulle-crds refuse what `tulle validate` refuses.

Each manifest below goes through both: the control plane's parser (tulle/resources/parse.py,
what `tulle validate` runs) and the CRD's schema and CEL rules as the API server applies
them (tests/crd_validation.py). They must agree, except in the listed cases, where the
reason is written down: checks a CRD cannot make (those stay with the control plane, which
refuses the object and says so), and fields the API server is stricter about.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from tests.chart_support import NAMESPACE, crd_validator, invalid_objects
from tests.crd_validation import CRDValidator, is_structural
from tulle.install.render import render
from tulle.resources.parse import ManifestError, load_documents, parse_object

REPO = Path(__file__).resolve().parent.parent

SP = "apiVersion: tulle.dev/v1alpha1\nkind: ServiceProfile\nmetadata: {name: web.demo.svc.cluster.local, namespace: demo}\n"
SRV = "apiVersion: policy.tulle.dev/v1alpha1\nkind: Server\nmetadata: {name: web-http, namespace: demo}\n"
SAZ = "apiVersion: policy.tulle.dev/v1alpha1\nkind: ServerAuthorization\nmetadata: {name: web-authz, namespace: demo}\n"


def sp(spec: str) -> str:
    return SP + "spec:\n" + textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ") + "\n"


def route(extra: str = "", condition: str = "{method: GET}") -> str:
    return sp(f"routes:\n- name: r\n  condition: {condition}\n" + "".join(f"  {line}\n" for line in extra.splitlines()))


def srv(spec: str) -> str:
    return SRV + f"spec: {spec}\n"


def saz(server: str, client: str) -> str:
    return SAZ + f"spec:\n  server: {server}\n  client: {client}\n"


# (manifest, both accept?) — the parser and the CRD must give the same verdict.
AGREE = [
    # ServiceProfile
    (sp("routes: []"), True),
    (route("isRetryable: true\ntimeout: 1m30s\nresponseClasses:\n- {condition: {status: {min: 500, max: 599}}, isFailure: true}"), True),
    (route(condition="{method: get, pathRegex: '/books/\\d+'}"), True),
    (route(condition="{all: [{method: GET}, {not: {pathRegex: /admin}}]}"), True),
    (route(condition="{any: [{method: GET}, {method: HEAD}]}"), True),
    (route(condition="{not: {any: [{pathRegex: /a}, {pathRegex: /b}]}}"), True),
    (sp("retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s}"), True),
    (sp("retryBudget: {ttl: 1s}"), True),
    (sp("retryBudget: {ttl: 60s}"), True),
    (sp("retryBudget: {ttl: 1m}"), True),
    (sp("opaquePorts: {'3306': {}, mysql: {}}"), True),
    (route("timeout: 1ms"), True),
    (route("timeout: 0s"), False),
    (route("timeout: 300us"), False),  # rounds to 0 ms: no timeout at all
    (route("timeout: 10"), False),
    (route("timeout: 5 seconds"), False),
    (route("timeout: '-1s'"), False),
    (sp("retryBudget: {ttl: forever}"), False),
    (sp("retryBudget: {ttl: 500ms}"), False),
    (sp("retryBudget: {ttl: 2m}"), False),
    (sp("retryBudget: {retryRatio: -0.1}"), False),
    (sp("retryBudget: {retryRatio: 1001}"), False),
    (sp("retryBudget: {minRetriesPerSecond: -1}"), False),
    (route("responseClasses: [{condition: {status: {min: 504, max: 500}}}]"), False),
    (route("responseClasses: [{condition: {status: {min: 99}}}]"), False),
    (route("responseClasses: [{condition: {status: {max: 600}}}]"), False),
    (route("responseClasses: [{condition: {status: {}}}]"), False),
    (route("responseClasses: [{condition: {}}]"), False),
    (route("responseClasses: [{condition: {any: []}}]"), False),
    (route("responseClasses: [{isFailure: true}]"), False),
    (route(condition="{all: []}"), False),
    (route(condition="{any: []}"), False),
    (route(condition="{}"), False),
    (route(condition="{not: {}}"), False),
    (route(condition="{all: [{}]}"), False),
    (route(condition="{method: FETCH}"), False),
    (sp("routes: [{name: a}]"), False),
    (sp("routes: [{condition: {method: GET}}]"), False),
    (sp("routes: [{name: '', condition: {method: GET}}]"), False),
    (sp("routes: [{name: '   ', condition: {method: GET}}]"), False),
    (sp("routes: [{name: a, condition: {method: GET}}, {name: a, condition: {method: POST}}]"), False),
    (sp("opaquePorts: {'70000': {}}"), False),
    (sp("opaquePorts: {'0': {}}"), False),
    (SP, False),  # no spec
    ("apiVersion: tulle.dev/v1alpha1\nkind: ServiceProfile\nmetadata: {name: web, namespace: demo}\nspec: {}\n", False),
    ("apiVersion: tulle.dev/v1alpha1\nkind: ServiceProfile\nmetadata: {name: web.demo.cluster.local, namespace: demo}\n"
     "spec: {}\n", False),
    (SP.replace("v1alpha1", "v1alpha2") + "spec: {}\n", True),
    # Server
    (srv("{podSelector: {matchLabels: {app: web}}, port: 8080, proxyProtocol: HTTP/1}"), True),
    (srv("{podSelector: {}, port: http}"), True),
    (srv("{podSelector: {}, port: '8080'}"), True),
    (srv("{podSelector: {matchExpressions: [{key: app, operator: Exists}]}, port: 1}"), True),
    (srv("{podSelector: {matchExpressions: [{key: app, operator: In, values: [a]}]}, port: 65535}"), True),
    (srv("{podSelector: {}, port: 8080, proxyProtocol: HTTP/3}"), False),
    (srv("{podSelector: {}, port: 70000}"), False),
    (srv("{podSelector: {}, port: 0}"), False),
    (srv("{podSelector: {}, port: '99999'}"), False),
    (srv("{podSelector: {}, port: not_a_port_name}"), False),
    (srv("{podSelector: {}, port: a-very-long-port-name}"), False),
    (srv("{port: 8080}"), False),
    (srv("{podSelector: {}}"), False),
    (srv("{podSelector: {matchExpressions: [{key: app, operator: In}]}, port: 8080}"), False),
    (srv("{podSelector: {matchExpressions: [{key: app, operator: Like, values: [a]}]}, port: 8080}"), False),
    (srv("{podSelector: {matchLabels: {version: 2}}, port: 8080}"), False),
    (SRV.replace("v1alpha1", "v1beta1") + "spec: {podSelector: {}, port: 80}\n", True),
    # ServerAuthorization
    (saz("{name: web-http}", "{unauthenticated: true}"), True),
    (saz("{selector: {matchLabels: {tier: backend}}}", "{meshTLS: {serviceAccounts: [{name: web}]}}"), True),
    (saz("{name: web-http}", "{meshTLS: {identities: ['*']}}"), True),
    (saz("{name: web-http}", "{meshTLS: {identities: ['*.demo.serviceaccount.identity.tulle.cluster.local']}}"), True),
    (saz("{name: web-http}", "{meshTLS: {unauthenticatedTLS: true}}"), True),
    (saz("{name: web-http}", "{meshTLS: {serviceAccounts: [{name: web, namespace: other}]}}"), True),
    (saz("{name: web-http}", "{meshTLS: {identities: ['*']}, unauthenticated: false}"), True),
    (saz("{name: web-http}", "{unauthenticated: true, networks: [{cidr: 10.0.0.0/16, except: [10.0.1.0/24]}]}"), True),
    (saz("{name: web-http}", "{unauthenticated: true, networks: [{cidr: 'fd00::/8'}]}"), True),
    (saz("{name: web-http}", "{unauthenticated: true, networks: [{cidr: 10.1.2.3/8}]}"), True),
    (saz("{name: web-http, selector: {matchLabels: {app: web}}}", "{unauthenticated: true}"), False),
    (saz("{}", "{unauthenticated: true}"), False),
    (saz("{name: ''}", "{unauthenticated: true}"), False),
    (saz("{name: web-http}", "{}"), False),
    (saz("{name: web-http}", "{unauthenticated: false}"), False),
    (saz("{name: web-http}", "{meshTLS: {identities: ['*']}, unauthenticated: true}"), False),
    (saz("{name: web-http}", "{meshTLS: {}}"), False),
    (saz("{name: web-http}", "{meshTLS: {identities: ['*'], serviceAccounts: [{name: a}]}}"), False),
    (saz("{name: web-http}", "{meshTLS: {identities: []}}"), False),
    (saz("{name: web-http}", "{meshTLS: {serviceAccounts: []}}"), False),
    (saz("{name: web-http}", "{meshTLS: {identities: ['web.*.serviceaccount.identity.tulle.cluster.local']}}"), False),
    (saz("{name: web-http}", "{meshTLS: {identities: ['']}}"), False),
    (saz("{name: web-http}", "{meshTLS: {serviceAccounts: [{namespace: demo}]}}"), False),
    (saz("{name: web-http}", "{meshTLS: {serviceAccounts: [{name: Web}]}}"), False),
    (saz("{name: web-http}", "{meshTLS: {serviceAccounts: [{name: web, namespace: Demo}]}}"), False),
    (saz("{name: web-http}", "{unauthenticated: true, networks: [{cidr: 10.0.0.300/8}]}"), False),
    (saz("{name: web-http}", "{unauthenticated: true, networks: [{cidr: 10.0.0.0/16, except: [10.1.0.0/24]}]}"), False),
    (saz("{name: web-http}", "{unauthenticated: true, networks: [{cidr: 10.0.0.0/16, except: ['fd00::/8']}]}"), False),
    (saz("{name: web-http}", "{unauthenticated: true, networks: [{except: [10.0.0.0/24]}]}"), False),
    (SAZ, False),
]

# What the control plane refuses and a CRD cannot: the parser still refuses it when it
# reads the object, and says so (policy.invalid-resource / the destination's error log).
ONLY_THE_CONTROL_PLANE_REFUSES = [
    # Python's regular expressions: a CRD has no way to check one compiles.
    (route(condition="{pathRegex: '/a/(unclosed'}"), "a CRD cannot compile a regular expression"),
    # The metadata a CRD rule may read is the name alone, not the namespace.
    ("apiVersion: tulle.dev/v1alpha1\nkind: ServiceProfile\nmetadata: {name: web.demo.svc.cluster.local, "
     "namespace: other}\nspec: {}\n", "a CRD rule cannot read metadata.namespace"),
    # Routes that can never match: judged on the meaning of conditions across routes.
    (sp("routes:\n- {name: first, condition: {method: GET, pathRegex: /a}}\n"
        "- {name: second, condition: {all: [{pathRegex: /a}, {method: GET}]}}"), "semantic: a shadowed route"),
    (sp("routes:\n- {name: all, condition: {pathRegex: '.*'}}\n- {name: books, condition: {pathRegex: /books}}"),
     "semantic: a catch-all route first"),
    (route(condition="{all: [{method: GET}, {method: POST}]}"), "semantic: a condition nothing matches"),
    (route("responseClasses:\n- {condition: {status: {min: 500}}}\n- {condition: {status: {min: 500}}}"),
     "semantic: a response class shadowed by an identical one"),
]

# What the API server refuses and the parser lets through: unknown fields (kubectl's strict
# validation), and the Kubernetes forms of some values.
ONLY_THE_API_SERVER_REFUSES = [
    (srv("{podSelector: {}, port: 80, protocol: HTTP/1}"), "an unknown field (a typo of proxyProtocol)"),
    (sp("retryBudget: {retryRatio: '0.2'}"), "a number given as a string"),
    (saz("{name: web-http}", "{unauthenticated: true, networks: [{cidr: 10.0.0.1}]}"),
     "an address without a prefix length is not a CIDR to Kubernetes"),
    (route(condition="{not: {not: {not: {method: GET}}}}"), "conditions nest at most 3 levels in the CRD"),
]


def tulle_accepts(text: str) -> bool:
    (index, data), = load_documents(text, "case.yaml")
    try:
        parse_object(data, file="case.yaml", doc=index)
        return True
    except ManifestError:
        return False


def crd_errors(text: str) -> list[str]:
    return crd_validator().errors(yaml.safe_load(text))


@pytest.mark.parametrize("text, accepted", AGREE)
def test_the_api_server_and_tulle_validate_agree(text, accepted):
    assert tulle_accepts(text) is accepted
    errors = crd_errors(text)
    assert (errors == []) is accepted, errors


@pytest.mark.parametrize("text, why", ONLY_THE_CONTROL_PLANE_REFUSES)
def test_what_only_the_control_plane_can_refuse(text, why):
    assert not tulle_accepts(text)
    assert crd_errors(text) == [], why


@pytest.mark.parametrize("text, why", ONLY_THE_API_SERVER_REFUSES)
def test_what_only_the_api_server_refuses(text, why):
    assert tulle_accepts(text)
    assert crd_errors(text) != [], why


def test_refusals_name_the_field_and_the_rule():
    errors = crd_errors(saz("{name: web-http}", "{meshTLS: {identities: ['*'], serviceAccounts: [{name: a}]}}"))
    assert errors == ["spec.client.meshTLS: set exactly one of unauthenticatedTLS, identities or serviceAccounts"]
    errors = crd_errors(route("responseClasses: [{condition: {status: {min: 504, max: 500}}}]"))
    assert errors == ["spec.routes[0].responseClasses[0].condition.status: status: min is greater than max"]
    assert crd_errors(route("timeout: 10 seconds"))[0].startswith("spec.routes[0].timeout: '10 seconds' does not match")
    assert crd_errors(sp("routes: [{name: a, condition: {method: GET}}, {name: a, condition: {method: POST}}]")) == [
        "spec.routes[1]: Duplicate value: {'name': 'a'}"]


def test_the_demo_and_example_resources_apply_against_the_crds():
    texts = [p.read_text() for p in sorted((REPO / "examples").rglob("*.yaml"))]
    ours = [d for t in texts for d in yaml.safe_load_all(t)
            if d and d.get("apiVersion", "").split("/")[0] in ("tulle.dev", "policy.tulle.dev")
            and d.get("kind") != "Workload"]
    assert {d["kind"] for d in ours} >= {"ServiceProfile", "Server", "ServerAuthorization"}
    assert invalid_objects(ours) == []


def test_the_crds_are_structural_and_serve_every_version_the_control_plane_reads():
    crds = render("tulle-crds", {}, namespace=NAMESPACE)
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "serverauthorizations.policy.tulle.dev", "servers.policy.tulle.dev", "serviceprofiles.tulle.dev"]
    assert "Workload" not in {c["spec"]["names"]["kind"] for c in crds}  # local mode only, never a cluster kind
    served = {}
    for crd in crds:
        versions = crd["spec"]["versions"]
        assert [v["name"] for v in versions if v["storage"]] == ["v1alpha1"]
        served[crd["spec"]["names"]["kind"]] = {v["name"] for v in versions if v["served"]}
        for v in versions:
            assert is_structural(v["schema"]["openAPIV3Schema"]) == []
    # Every apiVersion the parser (tulle/resources/parse.py) accepts is served.
    from tulle.resources.parse import _PARSERS
    for api, kind in _PARSERS:
        if kind in served:
            assert api.split("/")[1] in served[kind], (api, kind)
    # The rules compile (CRDValidator compiles every one) and the CRDs are valid objects.
    CRDValidator(crds)
    assert invalid_objects(crds) == []
