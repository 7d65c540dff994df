"""The manifest parsers (tulle/resources/parse.py) for ServiceProfile, Server,
ServerAuthorization and Workload: bytes as a file in a manifests folder (or a CRD object the
Kubernetes source hands over), read as the folder source reads it.

Invariants: every document answers a model object or a ManifestError (the one line a user
gets, exit 2), never another exception.
"""

from __future__ import annotations

from tulle.resources import model as m
from tulle.resources.parse import ManifestError, load_documents, parse_object

INSTRUMENT = ("tulle.resources",)

KINDS = ("ServiceProfile", "Server", "ServerAuthorization", "Workload")


def test_one_input(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # "not a text file" (load_file says so before parsing)
    try:
        docs = load_documents(text, "fuzz.yaml")
    except ManifestError:
        return
    for index, doc in docs:
        try:
            obj = parse_object(doc, file="fuzz.yaml", doc=index, kinds=KINDS)
        except ManifestError as e:
            assert "\n" not in str(e).strip() or "fuzz.yaml" in str(e), str(e)
            continue
        assert type(obj).__name__ in KINDS, obj
        assert isinstance(obj.meta, m.Meta)


def seeds() -> list[bytes]:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "examples" / "demo"
    out = [p.read_bytes() for p in sorted(root.glob("*.yaml"))]
    out.append(b"""apiVersion: tulle.dev/v1alpha2
kind: ServiceProfile
metadata: {name: books.demo.svc.cluster.local, namespace: demo}
spec:
  retryBudget: {retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s}
  routes:
    - name: GET /books/{id}
      condition: {method: GET, pathRegex: '/books/\\d+'}
      isRetryable: true
      timeout: 300ms
      responseClasses:
        - condition: {status: {min: 500, max: 599}}
          isFailure: true
        - condition: {all: [{status: {min: 400}}, {not: {status: {max: 403}}}]}
          isFailure: false
    - name: any
      condition: {any: [{method: POST}, {all: [{pathRegex: /x}]}]}
""")
    out.append(b'{"apiVersion": "policy.tulle.dev/v1beta1", "kind": "ServerAuthorization", "metadata": {"name": "a"},'
               b' "spec": {"server": {"name": "s"}, "client": {"unauthenticated": true, "networks":'
               b' [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]}}}')
    return out
