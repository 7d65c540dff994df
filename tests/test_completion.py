"""Completion of resource names — namespaces, workloads, services, Servers — from a
cluster (the fake API server) and from a running local mesh: through click's completion
protocol for bash, zsh and fish (the environment variables the generated scripts set),
and in a real bash that sourced `tulle completion bash`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fakekube import FakeKube
from tests.installation_objects import Installation, as_api, meta
from tests.local_support import TULLE, tiny_folder, tulle
from kubernetes import client

BIN = str(Path(TULLE).parent)

SERVER_YAML = """\
apiVersion: policy.tulle.dev/v1alpha1
kind: Server
metadata:
  name: hello-http
  namespace: tiny
spec:
  podSelector:
    matchLabels:
      app: hello
  port: http
  proxyProtocol: HTTP/1
"""


def protocol(shell: str, words: list[str], env: dict) -> list[tuple[str, str]]:
    """(value, help) of each suggestion, asked as the generated `shell` script asks: the
    words typed so far, the last one being completed. bash shows no help: it is always ""
    there, so `shown(shell, ...)` says what each shell should get."""
    full = dict(env, COMP_WORDS=" ".join(words), COMP_CWORD=str(len(words) - 1), _TULLE_COMPLETE=f"{shell}_complete")
    if shell == "fish":  # fish passes the command line and the word being completed
        full.update(COMP_WORDS=" ".join(words), COMP_CWORD=words[-1])
    out = subprocess.run([TULLE], capture_output=True, text=True, timeout=60, env=full)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    if shell == "zsh":  # type, value, help: three lines per suggestion
        lines = out.stdout.split("\n")[:-1] if out.stdout else []
        return [(lines[i + 1].replace("\\:", ":"), lines[i + 2]) for i in range(0, len(lines), 3)
                if lines[i] == "plain"]  # zsh's _describe needs its colons escaped
    pairs = []
    for line in out.stdout.splitlines():
        kind, _, rest = line.partition(",")
        value, _, help_ = rest.partition("\t")
        if kind == "plain":
            pairs.append((value, help_))
    return pairs


def shown(shell: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(v, "" if shell == "bash" else h) for v, h in pairs]


def in_bash(words: list[str], env: dict) -> list[str]:
    """COMPREPLY after the real bash ran tulle's completion function for these words."""
    typed = " ".join(f"'{w}'" for w in words)
    script = ('source <(tulle completion bash)\n'
              f'COMP_WORDS=({typed}); COMP_CWORD={len(words) - 1}\n'
              f'_tulle_completion tulle "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"\n'
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    out = subprocess.run([shutil.which("bash"), "--norc", "--noprofile", "-c", script], capture_output=True,
                         text=True, timeout=60, env=dict(env, PATH=BIN + os.pathsep + env.get("PATH", "")))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return [line for line in out.stdout.splitlines() if line]


# --- a cluster ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("completion-cluster")
    kube = FakeKube().start()
    inst = Installation().apply_to(kube)
    for ns in ("demo", "default"):
        kube.apply(as_api(client.V1Namespace(metadata=meta(ns)), "v1", "Namespace"))
    kube.apply(inst.meshed_pod("web-7d9f8-x2x9k", app="web"))
    kube.apply(inst.meshed_pod("books-5f6d7-k8k8k", app="books"))
    for name, port in (("web", 80), ("books", 9090)):
        kube.apply(as_api(client.V1Service(metadata=meta(name, "demo"), spec=client.V1ServiceSpec(
            selector={"app": name}, ports=[client.V1ServicePort(name="http", port=port)])), "v1", "Service"))
    kube.apply({"apiVersion": "policy.tulle.dev/v1alpha1", "kind": "Server",
                "metadata": {"name": "books-grpc", "namespace": "demo"},
                "spec": {"podSelector": {"matchLabels": {"app": "books"}}, "port": 9090, "proxyProtocol": "gRPC"}})
    env = dict(os.environ, KUBECONFIG=kube.write_kubeconfig(tmp / "kubeconfig"), TULLE_STATE_DIR=str(tmp / "none"))
    yield env
    kube.stop()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_namespaces_complete_from_the_cluster(cluster, shell):
    assert protocol(shell, ["tulle", "routes", "-n", ""], cluster) == shown(shell, [
        ("default", "namespace"), ("demo", "namespace"), ("tulle", "namespace")])


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_workloads_complete_from_the_cluster_in_the_namespace_given(cluster, shell):
    assert protocol(shell, ["tulle", "policy", "-n", "demo", ""], cluster) == shown(shell, [
        ("books-5f6d7-k8k8k", "workload in demo"), ("web-7d9f8-x2x9k", "workload in demo")])
    assert protocol(shell, ["tulle", "logs", "-n", "demo", "w"], cluster) == shown(shell, [
        ("web-7d9f8-x2x9k", "workload in demo")])


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_services_complete_from_the_cluster(cluster, shell):
    assert protocol(shell, ["tulle", "endpoints", "b"], cluster) == shown(shell, [("books.demo", "service")])
    assert protocol(shell, ["tulle", "endpoints", "books.demo:"], cluster) == shown(shell, [
        ("books.demo:9090", "service port")])
    assert protocol(shell, ["tulle", "profile", "-n", "demo", ""], cluster) == shown(shell, [
        ("books", "service in demo"), ("web", "service in demo")])


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_servers_complete_from_the_cluster(cluster, shell):
    assert protocol(shell, ["tulle", "policy", "books", "-n", "demo", "--server", ""], cluster) == shown(shell, [
        ("books-grpc", "Server in demo")])


def test_each_kind_completes_in_a_real_bash_from_the_cluster(cluster):
    assert in_bash(["tulle", "logs", "-n", "d"], cluster) == ["default", "demo"]
    assert in_bash(["tulle", "policy", "-n", "demo", ""], cluster) == ["books-5f6d7-k8k8k", "web-7d9f8-x2x9k"]
    assert in_bash(["tulle", "routes", "-n", "demo", "--to", ""], cluster) == ["books", "web"]
    assert in_bash(["tulle", "policy", "books", "-n", "demo", "--server", ""], cluster) == ["books-grpc"]


def test_routes_offers_services_and_workloads_and_services_of_other_namespaces_by_full_name(cluster):
    assert protocol("fish", ["tulle", "routes", "-n", "demo", "svc/"], cluster) == [
        ("svc/books", "service"), ("svc/web", "service")]
    assert [v for v, _ in protocol("bash", ["tulle", "routes", ""], cluster)] == ["books.demo", "web.demo"]


def test_stat_completes_resource_types_then_names_of_that_type_from_the_cluster(cluster):
    assert [v for v, _ in protocol("bash", ["tulle", "stat", ""], cluster)] == ["deploy", "ns", "po", "svc", "workload"]
    assert protocol("fish", ["tulle", "stat", "-n", "demo", "svc/"], cluster) == [
        ("svc/books", "service in demo"), ("svc/web", "service in demo")]
    assert [v for v, _ in protocol("bash", ["tulle", "stat", "ns", "d"], cluster)] == ["default", "demo"]
    assert in_bash(["tulle", "edges", ""], cluster) == ["deploy", "po", "workload"]


def test_an_unreachable_cluster_gives_no_suggestions_and_no_noise(cluster, tmp_path):
    dead = FakeKube().start()
    env = dict(cluster, KUBECONFIG=dead.write_kubeconfig(tmp_path / "kubeconfig"))
    dead.stop()
    assert protocol("bash", ["tulle", "policy", ""], env) == []


# --- a running local mesh -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    base = tmp_path_factory.mktemp("completion-local")
    manifests, state = tiny_folder(base / "manifests"), base / "state"
    (manifests / "server.yaml").write_text(SERVER_YAML)
    up = tulle("up", str(manifests), "--detach", "--isolation", "none", "--timeout", "90", state=state)
    try:
        assert up.returncode == 0, up.stderr + up.stdout
        yield dict(os.environ, TULLE_STATE_DIR=str(state), KUBECONFIG="/nonexistent/kubeconfig")
    finally:
        tulle("down", state=state)


def test_each_kind_completes_in_a_real_bash_from_the_local_mesh(local):
    assert in_bash(["tulle", "logs", "-n", ""], local) == ["tiny"]
    assert in_bash(["tulle", "policy", ""], local) == ["hello", "worker"]
    assert in_bash(["tulle", "identity", "show", "-n", "tiny", "w"], local) == ["worker"]
    assert in_bash(["tulle", "endpoints", ""], local) == ["hello.tiny"]
    assert in_bash(["tulle", "routes", "-n", "tiny", "--to", ""], local) == ["hello"]
    assert in_bash(["tulle", "policy", "hello", "-n", "tiny", "--server", ""], local) == ["hello-http"]


def test_stat_completes_workloads_and_services_of_the_local_mesh_in_a_real_bash(local):
    assert in_bash(["tulle", "stat", "-n", "tiny", "deploy/"], local) == ["deploy/hello", "deploy/worker"]
    assert in_bash(["tulle", "stat", "-n", "tiny", "po", "h"], local) == ["hello"]
    assert in_bash(["tulle", "stat", "-n", "tiny", "--to", "svc/"], local) == ["svc/hello"]
    assert in_bash(["tulle", "edges", "-n", ""], local) == ["tiny"]


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_zsh_and_fish_get_the_local_names_with_their_descriptions(local, shell):
    assert protocol(shell, ["tulle", "logs", ""], local) == [("hello", "workload in tiny"), ("worker", "workload in tiny")]
    assert protocol(shell, ["tulle", "logs", "hello", "-n", "tiny", "--container", ""], local) == [
        ("hello", "container of hello"), ("tulle-proxy", "container of hello")]  # the named workload's only
    assert protocol(shell, ["tulle", "policy", "hello", "--server", ""], local) == [("hello-http", "Server in tiny")]
