"""The CLI against a cluster: `tulle endpoints` and `tulle events` reach the cluster's NATS
the way linkerd's CLI reaches its control plane — a port-forward through the API server
(tests/fakekube.py speaks the kubernetes client's WebSocket port-forward protocol) to a
`tulle-nats-*` pod, here bridged to a real nats-server with the chart's TLS certificate —
logging in with the observer credential of the Secret `tulle-nats-credentials` and
verifying NATS against the CA of `tulle-nats-tls`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess

import pytest

from tests.bus_support import MeshNats
from tests.conftest import eventually
from tests.fakekube import FakeKube
from tests.local_support import TULLE
from tulle import busauth, installation, natsjwt, schemas
from tulle.bus import Bus
from tulle.cli.common import connect_bus, resolve_target
from tulle.errors import UserError
from tulle.install.material import generate_nats_tls

NS = installation.CONTROL_PLANE_NAMESPACE


def nats_pod(name: str = "tulle-nats-0", *, phase: str = "Running", ready: bool = True) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {installation.COMPONENT_LABEL: "nats"}},
            "spec": {"containers": [{"name": "nats", "image": "tulle"}]},
            "status": {"phase": phase, "podIP": "10.0.0.7",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def install_bus_objects(kube: FakeKube, nats: MeshNats, tls) -> None:
    """What `tulle install` puts in the cluster for the bus: its two Secrets, and a NATS pod."""
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    seeds = {role: natsjwt.read_seed(nats.seed_file(role)).decode() for role in busauth.STATIC_ROLES}
    kube.apply({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": installation.NATS_CREDENTIALS_SECRET, "namespace": NS}, "stringData": seeds})
    kube.apply({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": installation.NATS_TLS_SECRET, "namespace": NS},
                "stringData": {"ca.crt": tls.ca_pem, "tls.crt": tls.crt_pem, "tls.key": tls.key_pem}})
    kube.apply(nats_pod())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A fake API server whose `tulle-nats-0` pod's port 4222 is a real, TLS-only nats-server
    with the certificate `tulle install` makes (names tulle-nats.tulle.svc ..., no IP)."""
    base = tmp_path_factory.mktemp("cluster-bus")
    tls = generate_nats_tls(NS, "cluster.local")
    for name, pem in (("ca.crt", tls.ca_pem), ("tls.crt", tls.crt_pem), ("tls.key", tls.key_pem)):
        (base / name).write_text(pem)
    nats = MeshNats(base / "nats", with_callout=False,
                    tls=busauth.TLSFiles(str(base / "tls.crt"), str(base / "tls.key"), str(base / "ca.crt"))).start()
    kube = FakeKube().start()
    install_bus_objects(kube, nats, tls)
    kube.forward_pod_port(NS, "tulle-nats-0", installation.NATS_CLIENT_PORT, nats.address)
    kubeconfig = kube.write_kubeconfig(base / "kubeconfig", context="prod")
    ns = "demo"

    async def publish():
        # As destination does, inside the cluster (the test dials NATS directly, by the certificate's name).
        creds = dataclasses.replace(nats.credentials("destination"), tls_hostname=installation.nats_tls_name(NS))
        bus = Bus(nats.url, component="destination", credentials=creds)
        await bus.start()
        await bus.ensure_events_stream()
        await bus.put(schemas.ENDPOINTS_BUCKET, schemas.endpoints_key(ns, "web", 8080), schemas.EndpointSet(
            namespace=ns, service="web", port=8080, endpoints=[schemas.Endpoint(
                address="10.1.0.5", port=8080, identity=schemas.identity_name("web", ns), labels={"pod": "web-0"})]))
        await bus.publish_event("endpoints-changed", {"service": f"web.{ns}", "endpoints": 1})
        await bus.close()
    asyncio.run(publish())
    yield {"kube": kube, "nats": nats, "kubeconfig": kubeconfig, "base": base}
    kube.stop()
    nats.close()


def cli(cluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TULLE_NATS", "KUBECONFIG"))}
    env["TULLE_STATE_DIR"] = str(cluster["base"] / "no-local-run")
    return subprocess.run([TULLE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_endpoints_reads_the_clusters_nats_through_a_port_forward(cluster):
    before = len(cluster["kube"].port_forwards)
    proc = cli(cluster, "endpoints", "web.demo:8080", "-o", "json", "--kubeconfig", cluster["kubeconfig"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # stdout carries the answer; nothing else is said
    (row,) = json.loads(proc.stdout)
    assert (row["ip"], row["port"], row["pod"]) == ("10.1.0.5", 8080, "web-0")
    assert row["identity"] == schemas.identity_name("web", "demo")
    # It got there through the API server's pods/portforward, to the NATS pod's client port.
    assert cluster["kube"].port_forwards[before:] == [(NS, "tulle-nats-0", 4222)]


def test_events_follows_the_clusters_event_stream_with_kubectls_context_flag(cluster):
    proc = cli(cluster, "events", "--since", "1h", "--count", "1", "-o", "json", "--timeout", "30",
               "--kubeconfig", cluster["kubeconfig"], "--context", "prod")
    assert proc.returncode == 0, proc.stderr
    event = json.loads(proc.stdout.splitlines()[0])
    assert event["type"] == "dev.tulle.destination.endpoints-changed" and event["data"]["service"] == "web.demo"


def test_the_cli_logs_in_with_the_observer_credential_held_in_memory_which_writes_nothing(cluster):
    """The observer seed read from the Secret is used from memory (no file), and NATS
    refuses what the observer may not do."""
    target = resolve_target(None, None, kubeconfig=cluster["kubeconfig"])
    assert target.cluster is not None and not target.creds_file

    async def try_write():
        bus = await connect_bus(target, what="test")
        try:
            await bus.nc.publish(f"$KV.{schemas.ENDPOINTS_BUCKET}.demo.web.8080", b"{}")
            await bus.sync()
            await eventually(lambda: bus.permission_errors, 10, what="the server refusing the observer's write")
            return bus.credentials, list(bus.permission_errors)
        finally:
            await bus.close()
    creds, refused = asyncio.run(try_write())
    assert refused and "permissions violation for publish" in refused[0].lower()
    observer = natsjwt.read_seed(cluster["nats"].seed_file("observer")).decode()
    assert creds.seed == observer and not creds.seed_file


def test_a_context_the_kubeconfig_lacks_is_one_line_and_exit_2(cluster):
    proc = cli(cluster, "endpoints", "web.demo:8080", "--kubeconfig", cluster["kubeconfig"], "--context", "nope")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "context 'nope'" in line and cluster["kubeconfig"] in line


def test_nats_flag_and_cluster_flags_together_are_refused(cluster):
    proc = cli(cluster, "endpoints", "web.demo:8080", "--nats", "nats://127.0.0.1:4222",
               "--kubeconfig", cluster["kubeconfig"])
    assert proc.returncode == 2 and "--nats and --kubeconfig" in proc.stderr


# --- what the cluster refuses: one line each -----------------------------------------------------


@pytest.fixture
def bare_kube(cluster, tmp_path):
    """Another API server, with the bus's Secrets and pod, where each test breaks one thing."""
    kube = FakeKube().start()
    install_bus_objects(kube, cluster["nats"], generate_nats_tls(NS, "cluster.local"))
    yield kube, kube.write_kubeconfig(tmp_path / "kubeconfig")
    kube.stop()


def refusal(kubeconfig: str, namespace: str | None = None) -> str:
    async def go():
        bus = await connect_bus(resolve_target(None, None, kubeconfig=kubeconfig, namespace=namespace),
                                what="endpoints", timeout=10)
        await bus.close()
    with pytest.raises(UserError) as e:
        asyncio.run(go())
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_namespace_without_tulle_says_so(bare_kube):
    _, kubeconfig = bare_kube
    assert refusal(kubeconfig, "elsewhere").startswith(
        "endpoints: no Secret elsewhere/tulle-nats-credentials: is Tulle installed in namespace elsewhere?")


def test_a_forbidden_secret_says_who_may_not_read_what(bare_kube):
    kube, kubeconfig = bare_kube
    kube.forbid("get", "secrets", NS)
    line = refusal(kubeconfig)
    assert line.startswith(f"endpoints: cannot read Secret {NS}/tulle-nats-credentials: HTTP 403")


def test_a_forbidden_port_forward_says_so(bare_kube):
    kube, kubeconfig = bare_kube
    kube.forbid("create", "pods/portforward", NS)
    line = refusal(kubeconfig)
    assert line.startswith(f"endpoints: cannot port-forward to pod {NS}/tulle-nats-0 port 4222: 403 Forbidden")
    assert "pods/portforward is forbidden" in line


def test_no_running_nats_pod_says_so(bare_kube):
    kube, kubeconfig = bare_kube
    kube.apply(nats_pod(phase="Pending", ready=False))
    assert "no running NATS pod (tulle-nats-*) in namespace tulle" in refusal(kubeconfig)


def test_a_nats_pod_that_does_not_listen_gives_the_kubelets_error(bare_kube):
    _, kubeconfig = bare_kube  # no forward_pod_port: nothing listens on the pod's 4222
    line = refusal(kubeconfig)
    assert line.startswith(f"endpoints: cannot reach NATS through a port-forward to pod {NS}/tulle-nats-0 port 4222")
    assert "error forwarding port 4222" in line and "connection refused" in line
