"""`tulle inject` / `tulle uninject` as a person runs them: real-shaped manifests of every
kind against reviewed golden files, injected objects validated against the Kubernetes
schemas, uninject after inject giving back the input (kubectl's own manifests byte for
byte), stdin and folders, the report on stderr, bad input as one line and exit 2.

Golden files: TULLE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_inject_cli.py rewrites
them; review the diff before committing it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.injector_support import GOLDEN, K8S_SCHEMA_VERSION

TULLE = str(Path(sys.executable).with_name("tulle"))
INPUTS = sorted((GOLDEN / "in").iterdir())
UPDATE = os.environ.get("TULLE_UPDATE_GOLDEN") == "1"
MANUAL = ["--manual", "--trust-anchors", str(GOLDEN / "trust-anchors.pem"), "--set", "proxy.image.version=v0.1.0"]
VARIANTS = {  # name -> extra flags, on deployment.yaml
    "no-native-sidecar": ["--set", "proxy.nativeSidecar=false"],
    "cni": ["--set", "cniEnabled=true"],
    "nats-tls": ["--set", "natsURL=tls://nats.tulle.svc.cluster.local:4222", "--set",
                 "natsCAPEM=" + (GOLDEN / "trust-anchors.pem").read_text()],
}


def tulle(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TULLE, *args], capture_output=True, text=True, timeout=60, input=stdin)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / "out" / name
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with TULLE_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{name} differs from its golden file"


def documents(text: str, fmt: str) -> list:
    import json

    if fmt == ".json":
        return [json.loads(text)]
    return [d for d in yaml.safe_load_all(text) if d is not None]


def objects(docs: list) -> list:
    out = []
    for d in docs:
        out += d["items"] if d.get("kind") == "List" else [d]
    return out


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_SCHEMA_VERSION, strict=True)


@pytest.mark.parametrize("src", INPUTS, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["annotate", "manual"])
def test_every_kind_matches_its_golden_file_and_validates(src, mode):
    out = tulle("inject", str(src), *(MANUAL if mode == "manual" else []))
    assert out.returncode == 0, out.stderr
    check_golden(f"{src.stem}.{mode}{src.suffix}", out.stdout)
    check_golden(f"{src.stem}.{mode}.report", out.stderr)
    for obj in objects(documents(out.stdout, src.suffix)):
        validate(obj)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_install_value_variants_match_their_golden_files_and_validate(variant):
    src = GOLDEN / "in" / "deployment.yaml"
    out = tulle("inject", str(src), *MANUAL, *VARIANTS[variant])
    assert out.returncode == 0, out.stderr
    check_golden(f"deployment.manual.{variant}.yaml", out.stdout)
    for obj in objects(documents(out.stdout, ".yaml")):
        validate(obj)


@pytest.mark.parametrize("src", INPUTS, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["annotate", "manual"])
def test_uninject_after_inject_gives_back_the_input(src, mode):
    injected = tulle("inject", str(src), *(MANUAL if mode == "manual" else []))
    back = tulle("uninject", "-", stdin=injected.stdout)
    assert back.returncode == 0, back.stderr
    assert documents(back.stdout, src.suffix) == documents(src.read_text(), src.suffix)


def test_documents_nothing_happened_to_are_written_back_as_read_comments_included():
    src = GOLDEN / "in" / "namespace-service.yaml"
    out = tulle("inject", str(src)).stdout
    assert "greeting: hello   # passed through untouched, comment included\n" in out
    assert out.endswith(src.read_text().split("---\n")[-1])


def test_the_report_names_each_object_and_what_happened():
    out = tulle("inject", str(GOLDEN / "in" / "daemonset.yaml"), str(GOLDEN / "in" / "replicaset.yaml"),
                str(GOLDEN / "in" / "namespace-service.yaml"))
    assert out.stderr.splitlines() == [
        'daemonset "log-shipper" injected',
        'daemonset "node-exporter" skipped: hostNetwork is enabled',
        'replicaset "worker" skipped: pod has the annotation "tulle.dev/inject: disabled"',
        'replicaset "cache" injected',
        'namespace "shop" annotated',
        'service "db" annotated',
    ]
    # Three files, one stream: documents of separate files are separated too.
    assert len([d for d in yaml.safe_load_all(out.stdout) if d]) == 8


def test_a_folder_and_stdin_are_read_like_files(tmp_path):
    folder = tmp_path / "manifests"
    shutil.copytree(GOLDEN / "in", folder)
    (folder / "README.md").write_text("not a manifest\n")
    whole = tulle("inject", str(folder))
    assert whole.returncode == 0, whole.stderr
    assert whole.stderr.count(" injected") == 8
    assert len([d for d in yaml.safe_load_all(whole.stdout) if d]) == 14  # JSON documents are YAML too
    piped = tulle("inject", "-", stdin=(folder / "job.yaml").read_text())
    assert piped.stdout == tulle("inject", str(folder / "job.yaml")).stdout


def test_uninject_keeps_inject_disabled_and_removes_inject_enabled():
    src = (GOLDEN / "in" / "replicaset.yaml").read_text()
    out = tulle("uninject", "-", stdin=src.replace("app: cache\n    spec", "app: cache\n      annotations:\n        tulle.dev/inject: enabled\n    spec"))
    worker, cache = yaml.safe_load_all(out.stdout)
    assert worker["spec"]["template"]["metadata"]["annotations"] == {"tulle.dev/inject": "disabled"}
    assert "annotations" not in cache["spec"]["template"]["metadata"]
    assert out.stderr.splitlines() == ['replicaset "cache" uninjected']


def test_manual_inject_upgrades_a_proxy_already_in_the_manifest():
    old = tulle("inject", str(GOLDEN / "in" / "deployment.yaml"), *MANUAL[:-1], "proxy.image.version=v0.0.9").stdout
    new = tulle("inject", "-", *MANUAL, stdin=old)
    assert new.stdout == tulle("inject", str(GOLDEN / "in" / "deployment.yaml"), *MANUAL).stdout
    spec = yaml.safe_load(new.stdout)["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["tulle-init", "tulle-proxy", "wait-for-db"]


def test_json_in_json_out_and_the_output_flag_converts(tmp_path):
    src = GOLDEN / "in" / "list.json"
    assert tulle("inject", str(src)).stdout.startswith("{\n    \"apiVersion\"")
    as_yaml = tulle("inject", str(src), "-o", "yaml").stdout
    assert yaml.safe_load(as_yaml)["items"][0]["spec"]["template"]["metadata"]["annotations"] == {
        "tulle.dev/inject": "enabled"}


@pytest.mark.parametrize("args,stdin,message", [
    (["-"], "kind: Pod\nmetadata: {name: x\n", "tulle: stdin: document 1: not valid YAML: "),
    (["-"], "{\"kind\": \"Pod\",}", "tulle: stdin: document 1: not valid JSON: "),
    (["/nonexistent/manifests"], None, "tulle: /nonexistent/manifests: no such file or folder"),
    (["--manual", "-"], "kind: Pod\n", "tulle: --manual needs the installation's trust anchors"),
    (["--set", "proxy.colour=blue", "-"], "", "tulle: --set: unknown value 'proxy.colour'"),
])
def test_bad_input_is_one_line_naming_it_and_exit_2(args, stdin, message):
    out = tulle("inject", *args, stdin=stdin)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(message) and len(out.stderr.splitlines()) == 1, out.stderr


# --- kubectl's own manifests ----------------------------------------------------------------------------

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="needs kubectl (Debian: kubernetes-client; make sysdeps installs it)")

KUBECTL_CREATE = {
    "deployment": ["create", "deployment", "web", "--image=nginx:1.27", "--port=8080", "--replicas=2"],
    "deployment-db": ["create", "deployment", "db", "--image=postgres:16", "--port=5432"],
    "job": ["create", "job", "migrate", "--image=busybox", "--", "sh", "-c", "echo migrated"],
    "cronjob": ["create", "cronjob", "report", "--image=busybox", "--schedule=*/5 * * * *", "--", "date"],
    # kubectl folds strings longer than its line width: they must come back folded the same way
    "job-long-command": ["create", "job", "backfill-the-reporting-database", "--image=registry.example.com/tools/"
                         "backfill:2026.12", "--", "sh", "-c", "for day in $(seq 1 30); do backfill --day $day "
                         "--target postgres://reports.db.svc.cluster.local:5432/reports --batch-size 500; done"],
}


@needs_kubectl
@pytest.mark.parametrize("what", sorted(KUBECTL_CREATE))
@pytest.mark.parametrize("mode", ["annotate", "manual"])
def test_kubectl_created_manifests_come_back_byte_for_byte(what, mode):
    argv = KUBECTL_CREATE[what]
    cut = argv.index("--") if "--" in argv else len(argv)  # flags go before the container's command
    made = subprocess.run([KUBECTL, *argv[:cut], "--dry-run=client", "-o", "yaml", *argv[cut:]],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    injected = tulle("inject", "-", *(MANUAL if mode == "manual" else []), stdin=made.stdout)
    assert injected.returncode == 0 and injected.stderr.endswith(" injected\n"), injected.stderr
    assert injected.stdout != made.stdout
    back = tulle("uninject", "-", stdin=injected.stdout)
    assert back.stdout == made.stdout
