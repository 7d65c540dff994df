"""`tulle profile`: templates and routes from OpenAPI / .proto files, printed as YAML that the
strict parser accepts; bad input files are one line and exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.profiles import RouteTable
from services.destination.compile import Settings, compile_profile
from tulle.cli import main
from tulle.resources import model as m
from tulle.resources.parse import load_documents, parse_object


def run(capsys, *args):
    """The CLI in-process: (exit code, stdout, stderr)."""
    try:
        main(["profile", *args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def parsed(text: str) -> m.ServiceProfile:
    (index, data), = load_documents(text, "<stdout>")
    return parse_object(data, file="<stdout>", doc=index)


OPENAPI = """\
openapi: 3.0.3
info: {title: Authors, version: "1"}
servers:
- url: https://authors.example.com/api
paths:
  /authors:
    get:
      summary: list
    post:
      summary: create
  /authors/{id}:
    parameters:
    - {name: id, in: path, required: true}
    get:
      x-tulle-retryable: true
      x-tulle-timeout: 300ms
    delete:
      x-linkerd-retryable: false
  /authors/search.json:
    get:
      x-tulle-timeout: 1s
"""

PROTO = """\
// The books service.
syntax = "proto3";

package demo.books;  /* a package, with a comment */

import "google/protobuf/empty.proto";
option go_package = "example.com/books;books";

message Book {
  string id = 1;
  map<string, string> labels = 2;
  message Inner { int32 x = 1; }
  reserved 3, 4;
}

enum Kind { KIND_UNKNOWN = 0; KIND_NOVEL = 1; }

service Books {
  option (some.service_option) = { name: "}" };
  // rpc Commented(Book) returns (Book);
  rpc GetBook (GetBookRequest) returns (Book);
  rpc ListBooks(ListBooksRequest) returns (stream Book) {
    option (google.api.http) = { get: "/v1/books" };
  }
  rpc Upload (stream Book) returns (.google.protobuf.Empty) {}
  ;
}

service Admin { rpc Reindex(stream) returns (stream stream); }
"""


def test_the_template_has_every_field_and_parses(capsys):
    code, out, err = run(capsys, "authors", "-n", "demo", "--template")
    assert code == 0 and err == ""
    sp = parsed(out)
    assert sp.meta.name == "authors.demo.svc.cluster.local" and sp.meta.namespace == "demo"
    for field in ("routes:", "condition:", "method:", "pathRegex:", "all:", "any:", "not:", "responseClasses:",
                  "status:", "min:", "max:", "isFailure:", "isRetryable:", "timeout:", "retryBudget:",
                  "retryRatio:", "minRetriesPerSecond:", "ttl:"):
        assert field in out, field
    assert "#" in out  # commented
    assert sp.retry_budget == m.RetryBudgetSpec(0.2, 10, 10000)


def test_routes_from_an_openapi_spec_round_trip_through_the_parser_and_match_real_paths(tmp_path, capsys):
    spec = tmp_path / "authors.yaml"
    spec.write_text(OPENAPI)
    code, out, err = run(capsys, "authors", "-n", "demo", "--open-api", str(spec), "--cluster-domain", "example.org")
    assert code == 0, err
    sp = parsed(out)
    assert sp.meta.name == "authors.demo.svc.example.org"
    by_name = {r.name: r for r in sp.routes}
    # literal paths come before templated ones, so /authors/search.json is reachable
    assert [r.name for r in sp.routes] == [
        "GET /api/authors", "POST /api/authors", "GET /api/authors/search.json",
        "DELETE /api/authors/{id}", "GET /api/authors/{id}"]
    assert by_name["GET /api/authors/{id}"].condition == m.RequestMatch(method="GET", path_regex="/api/authors/[^/]*")
    assert by_name["GET /api/authors/{id}"].is_retryable and by_name["GET /api/authors/{id}"].timeout_ms == 300
    assert not by_name["DELETE /api/authors/{id}"].is_retryable
    assert by_name["GET /api/authors/search.json"].condition.path_regex == "/api/authors/search\\.json"
    assert by_name["GET /api/authors/search.json"].timeout_ms == 1000

    table = RouteTable.from_profile(compile_profile(sp, Settings(cluster_domain="example.org")))
    assert table.match("GET", "/api/authors/42").name == "GET /api/authors/{id}"
    assert table.match("GET", "/api/authors/search.json").name == "GET /api/authors/search.json"
    assert table.match("GET", "/api/authors/searchXjson").name == "GET /api/authors/{id}"  # '.' is literal
    assert table.match("GET", "/api/authors/42/books").name == "[DEFAULT]"


def test_an_openapi_spec_in_json_works_too(tmp_path, capsys):
    spec = tmp_path / "authors.json"
    spec.write_text(json.dumps({"openapi": "3.1.0", "paths": {"/a/{x}/b": {"put": {"x-tulle-retryable": True}}}}))
    code, out, _ = run(capsys, "a", "--open-api", str(spec))
    route, = parsed(out).routes
    assert route.name == "PUT /a/{x}/b" and route.condition.path_regex == "/a/[^/]*/b" and route.is_retryable


def test_routes_from_a_proto_file_round_trip_through_the_parser(tmp_path, capsys):
    proto = tmp_path / "books.proto"
    proto.write_text(PROTO)
    code, out, err = run(capsys, "books", "-n", "demo", "--proto", str(proto))
    assert code == 0, err
    sp = parsed(out)
    assert [r.name for r in sp.routes] == [
        "POST /demo.books.Books/GetBook", "POST /demo.books.Books/ListBooks", "POST /demo.books.Books/Upload",
        "POST /demo.books.Admin/Reindex"]
    assert sp.routes[0].condition == m.RequestMatch(method="POST", path_regex="/demo\\.books\\.Books/GetBook")
    table = RouteTable.from_profile(compile_profile(sp, Settings()))
    assert table.match("POST", "/demo.books.Books/ListBooks").name == "POST /demo.books.Books/ListBooks"
    assert table.match("POST", "/demoXbooks.Books/ListBooks").name == "[DEFAULT]"
    assert table.match("GET", "/demo.books.Books/GetBook").name == "[DEFAULT]"


@pytest.mark.parametrize("content, problem", [
    ("openapi: 3.0.0\npaths:\n  /a:\n    get: {x-tulle-timeout: soon}\n",
     "line 4: paths./a.get.x-tulle-timeout: expected a duration such as '300ms' or '10s', got 'soon'"),
    ("openapi: 3.0.0\npaths:\n  /a:\n    get:\n      x-tulle-retryable: maybe\n",
     "line 5: paths./a.get.x-tulle-retryable: expected true or false, got 'maybe'"),
    ("openapi: 3.0.0\npaths:\n  /a/{x}: {get: {}}\n  /a/{y}: {get: {}}\n", "paths./a/{y}.get: the same route as paths./a/{x}.get"),
    ("openapi: 3.0.0\npaths:\n  a: {get: {}}\n", "line 3: paths.a: a path must start with '/'"),
    ("openapi: 3.0.0\npaths: {}\n", "paths: no paths declared"),
    ("openapi: 3.0.0\npaths:\n  /a: {parameters: []}\n", "paths: no operations"),
    ("openapi: 1.0\npaths: {}\n", "line 1: openapi: unsupported version"),
    ("title: not a spec\n", "not an OpenAPI document (no `openapi` field)"),
    ("openapi: 3.0.0\npaths:\n  /a: [\n", "line 4, column 1: invalid YAML"),
    ('{"openapi": "3.0.0",\n "paths": }', "line 2, column 11: invalid JSON"),
])
def test_bad_openapi_files_are_one_line_naming_the_file_and_the_problem(tmp_path, capsys, content, problem):
    spec = tmp_path / "api.yaml"
    spec.write_text(content)
    code, out, err = run(capsys, "authors", "--open-api", str(spec))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"tulle: {spec}: ") and problem in err, err


@pytest.mark.parametrize("content, problem", [
    ('syntax = "proto3";\nservice S {\n  rpc Get(Req) returns Resp;\n}\n',
     "line 3: expected '(' before the output type of rpc Get, got 'Resp'"),
    ('service S {\n  rpc Get(Req) (Resp);\n}\n', "line 2: expected 'returns' after the input of rpc Get, got '('"),
    ('service S {\n  rpc Get(Req) returns (Resp);\n', "line 2: unexpected end of file, expected '}' closing service S"),
    ('/* never closed\nservice S {}\n', "line 1: comment /* is never closed"),
    ('package a;\npackage b;\n', "line 2: a second package declaration"),
    ('message M { int32 x = 1; }\n', "declares no service with an rpc"),
    ('service S {\n  field x = 1;\n}\n', "line 2: unexpected 'field' in service S"),
    ('service S { rpc A(R) returns (R); rpc A(R) returns (R); }', "rpc A is declared twice"),
    ('syntax = "proto3";\n@\n', "line 2: unexpected character '@'"),
])
def test_bad_proto_files_are_one_line_naming_the_file_line_and_problem(tmp_path, capsys, content, problem):
    proto = tmp_path / "svc.proto"
    proto.write_text(content)
    code, out, err = run(capsys, "svc", "--proto", str(proto))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"tulle: {proto}: ") and problem in err, err


@pytest.mark.parametrize("args, problem", [
    (["authors"], "choose exactly one of --template, --open-api FILE or --proto FILE"),
    (["authors", "--template", "--proto", "x.proto"], "(got --template, --proto)"),
    (["Authors!", "--template"], "service 'Authors!': not a valid service name"),
    (["authors", "-n", "Demo", "--template"], "namespace 'Demo'"),
    (["authors", "--open-api", "/nonexistent/spec.yaml"], "/nonexistent/spec.yaml: no such file"),
])
def test_bad_flags_are_one_line(capsys, args, problem):
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and problem in err, err


def test_the_installed_command_prints_yaml_a_user_can_pipe(tmp_path):
    proto = tmp_path / "books.proto"
    proto.write_text(PROTO)
    tulle = Path(sys.executable).with_name("tulle")
    assert tulle.exists(), f"the `tulle` entry point is not installed next to {sys.executable}"
    done = subprocess.run([str(tulle), "profile", "books", "-n", "demo", "--proto", str(proto)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# Routes from the gRPC services of")
    assert parsed(done.stdout).meta.name == "books.demo.svc.cluster.local"
