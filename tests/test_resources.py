"""The resource model's parser: every kind reads, and every mistake is named precisely.

Each error must name the file, the document (index, kind and name) and the field path,
in one line, so that a person can go straight to the mistake.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from tulle.resources import model as m
from tulle.resources.parse import ManifestError, load_dir, load_file, parse_duration_ms, parse_object

REPO = Path(__file__).resolve().parent.parent
TULLE = REPO / ".venv" / "bin" / "tulle"

EVERY_KIND = """\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  annotations:
    config.tulle.dev/default-inbound-policy: all-authenticated
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: admin, port: 9090, targetPort: 9091, appProtocol: http}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: demo, labels: {app: web}}
spec:
  serviceAccountName: web
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /ready, port: http}}
  - name: tulle-proxy
    ports: [{name: tulle-admin, containerPort: 4191}]
status:
  podIP: 10.1.0.5
  phase: Running
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: demo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: [10.1.0.5]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: web-1}
- addresses: [10.1.0.6]
  conditions: {ready: false}
ports: [{name: http, port: 8080}]
---
apiVersion: tulle.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: demo, annotations: {tulle.dev/inject: enabled}}
spec:
  command: [python3, -m, http.server]
  serviceAccountName: web
  ports: [{name: http, containerPort: 8080}]
  env: {GREETING: hello}
---
apiVersion: tulle.dev/v1alpha1
kind: ServiceProfile
metadata: {name: web.demo.svc.cluster.local, namespace: demo}
spec:
  routes:
  - name: GET /books/{id}
    condition:
      all:
      - {method: GET}
      - {pathRegex: '/books/\\d+'}
    responseClasses:
    - condition: {status: {min: 500, max: 599}}
      isFailure: true
    isRetryable: true
    timeout: 1m30s
  retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s}
  opaquePorts: [3306]
---
apiVersion: policy.tulle.dev/v1alpha1
kind: Server
metadata: {name: web-http, namespace: demo}
spec:
  podSelector:
    matchLabels: {app: web}
    matchExpressions: [{key: tier, operator: NotIn, values: [test]}]
  port: http
  proxyProtocol: HTTP/1
---
apiVersion: policy.tulle.dev/v1alpha1
kind: ServerAuthorization
metadata: {name: web-authz, namespace: demo}
spec:
  server: {name: web-http}
  client:
    meshTLS:
      serviceAccounts: [{name: client}, {name: admin, namespace: ops}]
    networks:
    - cidr: 10.0.0.0/8
      except: [10.9.0.0/16]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str, name: str = "bad.yaml") -> ManifestError:
    path = write(tmp_path, name, text)
    with pytest.raises(ManifestError) as info:
        load_file(path, display=name)
    return info.value


# --- every kind reads ---------------------------------------------------------------------


def test_every_kind_parses_from_one_multi_document_file(tmp_path):
    objects = load_file(write(tmp_path, "all.yaml", EVERY_KIND))
    assert [o.kind for o in objects] == ["Namespace", "Service", "Pod", "EndpointSlice", "Workload",
                                         "ServiceProfile", "Server", "ServerAuthorization"]
    ns, svc, pod, eps, wl, sp, srv, authz = objects
    assert ns.meta.namespace == "" and ns.meta.annotations[m.DEFAULT_POLICY_ANNOTATION] == "all-authenticated"
    assert [(p.port, p.target_port, p.app_protocol) for p in svc.ports] == [(80, "http", ""), (9090, 9091, "http")]
    assert svc.selector == {"app": "web"} and svc.cluster_ip == ""
    assert pod.ready and pod.meshed and pod.ip == "10.1.0.5" and pod.service_account == "web"
    assert pod.port_number("http") == 8080 and [p.name for p in pod.ports] == ["http"]
    assert pod.probes == (m.HTTPProbe("/ready", "http"),)
    assert eps.service == "web" and [(e.ready, e.target_pod) for e in eps.endpoints] == [(True, "web-1"), (False, "")]
    assert wl.command == ("python3", "-m", "http.server") and wl.env == (("GREETING", "hello"),) and wl.injected
    assert wl.base_dir == str(tmp_path.resolve())
    route = sp.routes[0]
    assert sp.service == "web" and route.timeout_ms == 90_000 and route.is_retryable
    assert route.condition.all[1].path_regex == r"/books/\d+"
    assert route.response_classes[0].condition.status == m.StatusRange(500, 599)
    assert sp.retry_budget == m.RetryBudgetSpec(0.2, 10, 10_000) and sp.opaque_ports == (3306,)
    assert srv.port == "http" and srv.proxy_protocol == "HTTP/1"
    assert srv.pod_selector.matches({"app": "web"}) and not srv.pod_selector.matches({"app": "web", "tier": "test"})
    assert authz.server_name == "web-http"
    assert authz.mesh_tls.service_accounts == (m.ServiceAccountRef("client"), m.ServiceAccountRef("admin", "ops"))
    assert authz.networks == (m.NetworkSpec("10.0.0.0/8", ("10.9.0.0/16",)),)


def test_list_kinds_are_unrolled_and_json_files_read(tmp_path):
    write(tmp_path, "pods.yaml", """\
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: Pod, metadata: {name: a}}
        - {apiVersion: v1, kind: Pod, metadata: {name: b}}
        """)
    write(tmp_path, "svc.json", '{"apiVersion": "v1", "kind": "ServiceList", "items": ['
                                '{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},'
                                ' "spec": {"ports": [{"port": 80}]}}]}')
    objects = load_dir(tmp_path)
    assert sorted(m.key_of(o) for o in objects) == [("Pod", "default", "a"), ("Pod", "default", "b"),
                                                    ("Service", "default", "web")]


def test_load_dir_reads_nested_folders_and_skips_hidden_ones(tmp_path):
    write(tmp_path, "a/b/pod.yaml", "{apiVersion: v1, kind: Pod, metadata: {name: a}}")
    write(tmp_path, ".git/junk.yaml", "not: [valid")
    write(tmp_path, "README.md", "# not a manifest")
    assert [o.meta.name for o in load_dir(tmp_path)] == ["a"]


def test_headless_and_external_name_services_need_no_ports(tmp_path):
    objects = load_file(write(tmp_path, "svc.yaml", """\
        {apiVersion: v1, kind: Service, metadata: {name: db}, spec: {clusterIP: None, selector: {app: db}}}
        ---
        {apiVersion: v1, kind: Service, metadata: {name: ext}, spec: {type: ExternalName, externalName: example.com}}
        """))
    assert [(o.cluster_ip, o.ports) for o in objects] == [("None", ()), ("", ())]


def test_durations_read_as_go_durations():
    assert parse_duration_ms("300ms", "x") == 300
    assert parse_duration_ms("1m30s", "x") == 90_000
    assert parse_duration_ms("1.5s", "x") == 1500
    assert parse_duration_ms("2h", "x") == 7_200_000


# --- mistakes name the file, document, object and field -------------------------------------------

SERVICE_BAD_PORT = """\
    apiVersion: v1
    kind: Namespace
    metadata: {name: demo}
    ---
    apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: demo}
    spec:
      ports: [{port: http}]
    """


def test_a_bad_field_names_file_document_object_and_field_path(tmp_path):
    e = error_of(tmp_path, SERVICE_BAD_PORT)
    assert str(e) == ("bad.yaml: document 2 (Service demo/web): spec.ports[0].port: "
                      "expected an integer from 1 to 65535, got 'http'")
    assert (e.file, e.doc, e.what, e.path) == ("bad.yaml", 2, "Service demo/web", "spec.ports[0].port")


SP = """\
    apiVersion: tulle.dev/v1alpha1
    kind: ServiceProfile
    metadata: {name: web.demo.svc.cluster.local, namespace: demo}
    spec:
      routes:
      - name: r
        condition: %s
    """

AUTHZ = """\
    apiVersion: policy.tulle.dev/v1alpha1
    kind: ServerAuthorization
    metadata: {name: authz, namespace: demo}
    spec:
      server: %s
      client: %s
    """


@pytest.mark.parametrize("text, what, path, message", [
    # ServiceProfile
    (SP % "{pathRegex: '/books/(['}", "ServiceProfile demo/web.demo.svc.cluster.local",
     "spec.routes[0].condition.pathRegex", "invalid regular expression"),
    (SP % "{method: FETCH}", "ServiceProfile demo/web.demo.svc.cluster.local",
     "spec.routes[0].condition.method", "unknown HTTP method 'FETCH'"),
    (SP % "{method: GET}\n        timeout: 10 seconds", "ServiceProfile demo/web.demo.svc.cluster.local",
     "spec.routes[0].timeout", "expected a duration"),
    (SP % "{method: GET}\n        responseClasses: [{condition: {status: {min: 500, max: 400}}}]",
     "ServiceProfile demo/web.demo.svc.cluster.local",
     "spec.routes[0].responseClasses[0].condition.status", "min (500) is greater than max (400)"),
    (SP % "{}", "ServiceProfile demo/web.demo.svc.cluster.local",
     "spec.routes[0].condition", "needs one of method, pathRegex"),
    ("""\
    apiVersion: tulle.dev/v1alpha1
    kind: ServiceProfile
    metadata: {name: web, namespace: demo}
    spec: {}
    """, "ServiceProfile demo/web", "metadata.name", "must be <service>.<namespace>.svc.<cluster-domain>"),
    # ServerAuthorization
    (AUTHZ % ("{name: web-http, selector: {matchLabels: {app: web}}}", "{unauthenticated: true}"),
     "ServerAuthorization demo/authz", "spec.server", "set exactly one of name or selector"),
    (AUTHZ % ("{name: web-http}", "{meshTLS: {identities: ['*'], serviceAccounts: [{name: a}]}}"),
     "ServerAuthorization demo/authz", "spec.client.meshTLS",
     "set exactly one of unauthenticatedTLS, identities or serviceAccounts"),
    (AUTHZ % ("{name: web-http}", "{unauthenticated: true, networks: [{cidr: 10.0.0.0/16, except: [10.1.0.0/24]}]}"),
     "ServerAuthorization demo/authz", "spec.client.networks[0].except[0]", "'10.1.0.0/24' is not inside '10.0.0.0/16'"),
    (AUTHZ % ("{name: web-http}", "{meshTLS: {identities: ['web.*.serviceaccount.identity.tulle.cluster.local']}}"),
     "ServerAuthorization demo/authz", "spec.client.meshTLS.identities[0]", "a wildcard is '*' or a '*.' prefix only"),
    (AUTHZ % ("{name: web-http}", "{unauthenticated: true, networks: [{cidr: 10.0.0.300/8}]}"),
     "ServerAuthorization demo/authz", "spec.client.networks[0].cidr", "is not a valid CIDR"),
    (AUTHZ % ("{name: web-http}", "{}"),
     "ServerAuthorization demo/authz", "spec.client", "set exactly one of meshTLS or unauthenticated"),
    # Server
    ("""\
    apiVersion: policy.tulle.dev/v1alpha1
    kind: Server
    metadata: {name: web-http, namespace: demo}
    spec: {podSelector: {}, port: 8080, proxyProtocol: HTTP/3}
    """, "Server demo/web-http", "spec.proxyProtocol", "expected one of unknown, HTTP/1"),
    ("""\
    apiVersion: policy.tulle.dev/v1alpha1
    kind: Server
    metadata: {name: web-http, namespace: demo}
    spec: {podSelector: {matchExpressions: [{key: app, operator: In}]}, port: 8080}
    """, "Server demo/web-http", "spec.podSelector.matchExpressions[0].values", "required for operator In"),
    ("""\
    apiVersion: policy.tulle.dev/v1alpha1
    kind: Server
    metadata: {name: web-http, namespace: demo}
    spec: {podSelector: {}, port: 70000}
    """, "Server demo/web-http", "spec.port", "expected a port from 1 to 65535, got 70000"),
    # Service, Pod, EndpointSlice, Workload, Namespace
    ("""\
    apiVersion: v1
    kind: Service
    metadata: {name: web}
    spec: {ports: [{port: 80, targetPort: not_a_port_name}]}
    """, "Service default/web", "spec.ports[0].targetPort", "expected a port number or a port name"),
    ("""\
    apiVersion: v1
    kind: Service
    metadata: {name: web}
    spec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}
    """, "Service default/web", "spec.clusterIP", "is not an IP address"),
    ("""\
    apiVersion: v1
    kind: Pod
    metadata: {name: web-1, labels: {version: 2}}
    """, "Pod default/web-1", "metadata.labels.version", "expected a string, got an integer 2 (quote it)"),
    ("""\
    apiVersion: v1
    kind: Pod
    metadata: {name: web-1}
    spec: {containers: [{name: app, readinessProbe: {httpGet: {path: ready, port: 8080}}}]}
    """, "Pod default/web-1", "spec.containers[0].readinessProbe.httpGet.path", "must start with '/'"),
    ("""\
    apiVersion: v1
    kind: Pod
    metadata: {name: Web_1}
    """, "Pod default/Web_1", "metadata.name", "is not a valid name"),
    ("""\
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata: {name: web-abc}
    endpoints: [{conditions: {ready: true}}]
    """, "EndpointSlice default/web-abc", "endpoints[0].addresses", "required"),
    ("""\
    apiVersion: tulle.dev/v1alpha1
    kind: Workload
    metadata: {name: web}
    spec: {command: []}
    """, "Workload default/web", "spec.command", "expected a non-empty list of strings"),
    ("""\
    apiVersion: v1
    kind: Namespace
    metadata: {}
    """, "Namespace", "metadata.name", "required"),
    # kinds and versions
    ("""\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: web}
    """, "Deployment default/web", "kind", "apps/v1 Deployment is not supported here (supported: "),
    ("""\
    apiVersion: policy.tulle.dev/v1
    kind: Server
    metadata: {name: web}
    """, "Server default/web", "apiVersion", "Server is served as policy.tulle.dev/v1alpha1, not 'policy.tulle.dev/v1'"),
])
def test_each_mistake_is_named_with_its_field_path(tmp_path, text, what, path, message):
    e = error_of(tmp_path, text)
    assert (e.file, e.doc, e.what, e.path) == ("bad.yaml", 1, what, path)
    assert message in e.message
    assert str(e).startswith(f"bad.yaml: document 1 ({what}): {path}: ")
    assert "\n" not in str(e)


def test_invalid_yaml_names_line_and_column(tmp_path):
    e = error_of(tmp_path, """\
        apiVersion: v1
        kind: Pod
        metadata:
          name: web
            labels: {}
        """)
    # libyaml and the pure-Python loader word the problem slightly differently.
    assert str(e).startswith("bad.yaml: line 5, column 11: invalid YAML: mapping values are not allowed")


def test_a_document_that_is_not_a_mapping_is_named(tmp_path):
    e = error_of(tmp_path, """\
        {apiVersion: v1, kind: Namespace, metadata: {name: a}}
        ---
        - just
        - a list
        """)
    assert e.doc == 2 and "expected a mapping, got a list" in str(e)


def test_the_same_object_in_two_files_is_an_error_naming_both(tmp_path):
    write(tmp_path, "demo/a.yaml", "{apiVersion: v1, kind: Pod, metadata: {name: web, namespace: demo}}")
    write(tmp_path, "demo/b.yaml", """\
        {apiVersion: v1, kind: Namespace, metadata: {name: demo}}
        ---
        {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: demo}}
        """)
    with pytest.raises(ManifestError) as info:
        load_dir(tmp_path / "demo")
    assert str(info.value) == "demo/b.yaml: document 2 (Pod demo/web): metadata.name: already defined in demo/a.yaml"


def test_parse_object_without_a_file_names_the_object():
    with pytest.raises(ManifestError) as info:
        parse_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "demo"},
                      "spec": {"ports": [{"port": 0}]}})
    assert info.value.what == "Service demo/web" and info.value.path == "spec.ports[0].port"


# --- tulle validate ------------------------------------------------------------------------------


def test_tulle_validate_counts_the_valid_objects(tmp_path):
    write(tmp_path, "demo/all.yaml", EVERY_KIND)
    write(tmp_path, "more/pod.yaml", "{apiVersion: v1, kind: Pod, metadata: {name: extra, namespace: demo}}")
    run = subprocess.run([str(TULLE), "validate", str(tmp_path / "demo"), str(tmp_path / "more")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "9 objects valid\n"


def test_tulle_validate_reports_one_line_and_exits_2_on_a_bad_field(tmp_path):
    write(tmp_path, "demo/00-good.yaml", EVERY_KIND)
    write(tmp_path, "demo/10-web.yaml", SERVICE_BAD_PORT.replace("name: web,", "name: web2,"))
    run = subprocess.run([str(TULLE), "validate", str(tmp_path / "demo")], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr + run.stdout
    lines = run.stderr.splitlines()
    assert lines == ["tulle: demo/10-web.yaml: document 2 (Service demo/web2): spec.ports[0].port: "
                     "expected an integer from 1 to 65535, got 'http'"]


def test_tulle_validate_finds_an_object_defined_in_two_folders(tmp_path):
    write(tmp_path, "a/pod.yaml", "{apiVersion: v1, kind: Pod, metadata: {name: web}}")
    write(tmp_path, "b/pod.yaml", "{apiVersion: v1, kind: Pod, metadata: {name: web}}")
    run = subprocess.run([str(TULLE), "validate", "a", "b"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["tulle: b/pod.yaml: document 1 (Pod default/web): metadata.name: "
                                       "already defined in a/pod.yaml"]


def test_tulle_validate_names_a_missing_folder(tmp_path):
    run = subprocess.run([str(TULLE), "validate", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"tulle: {tmp_path / 'nope'}: not a folder"]
