"""The dashboard as an optional component of the tulle-control-plane chart
(`dashboard.enabled`), rendered by the real Helm engine and checked against the
Kubernetes schemas: off by default; when on, locked down like every control-plane
container, reading the bus with the observer's credential only, never a Secret through
the API, and started with flags the real `tulle dashboard` accepts."""

from __future__ import annotations

import click
import pytest

from tests.chart_support import NAMESPACE, containers, control_plane_values, find, invalid_objects, render_control_plane
from tulle.install.render import ChartError, lint

ENABLED = {"dashboard": {"enabled": True, "allowedHosts": ["tulle.example.com"]}}


@pytest.fixture(scope="module")
def objects():
    return render_control_plane(ENABLED)


def test_the_dashboard_is_not_installed_unless_asked():
    assert not [o for o in render_control_plane() if "dashboard" in o["metadata"]["name"]]


def test_the_enabled_dashboard_lints_clean_and_every_object_is_valid(objects):
    assert lint("tulle-control-plane", control_plane_values(ENABLED)) == []
    assert invalid_objects(objects) == []
    service = find(objects, "Service", "tulle-dashboard")
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 8084


def test_the_dashboard_container_is_locked_down_and_probed(objects):
    c = containers(objects)["tulle-dashboard/dashboard"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert c["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}


def test_the_dashboard_reads_the_bus_as_the_observer_and_no_secret_through_the_api(objects):
    pod = find(objects, "Deployment", "tulle-dashboard")["spec"]["template"]["spec"]
    secrets = sorted((v["secret"]["secretName"], tuple(i["key"] for i in v["secret"].get("items", [])))
                     for v in pod["volumes"] if "secret" in v)
    assert secrets == [("tulle-nats-credentials", ("observer",)), ("tulle-nats-tls", ("ca.crt",))]
    rules = find(objects, "ClusterRole", f"tulle-{NAMESPACE}-dashboard")["rules"] + \
        find(objects, "Role", "tulle-dashboard")["rules"]
    assert not [r for r in rules if "secrets" in r["resources"]]
    assert {v for r in rules for v in r["verbs"]} <= {"get", "list"}


def test_the_real_command_accepts_the_charts_flags(objects, monkeypatch):
    from tulle.cli.dashboard import choose_targets, dashboard
    from tulle.cli.target import Cluster

    c = containers(objects)["tulle-dashboard/dashboard"]
    assert c["command"] == ["tulle", "dashboard"]
    ctx = dashboard.make_context("dashboard", list(c["args"]))
    assert ctx.params["address"] == "0.0.0.0" and ctx.params["port"] == 8084 and ctx.params["kubernetes"] is True
    # In the pod: the bus is the NATS Service named by --nats, the checks look at the cluster.
    monkeypatch.delenv("TULLE_NATS_URL", raising=False)
    p = ctx.params
    bus, checks = choose_targets(p["nats_url"], p["nats_creds"], kubeconfig=p["kubeconfig"], context=p["context"],
                                 kubernetes=p["kubernetes"], namespace=p["namespace"], state_dir=p["state_dir"])
    assert bus.url == f"tls://tulle-nats.{NAMESPACE}.svc.cluster.local:4222" and bus.cluster is None
    assert bus.creds_file == "/var/run/tulle/nats/creds" and isinstance(checks, Cluster)
    assert set(ctx.params["allowed"]) == {"tulle.example.com", f"tulle-dashboard.{NAMESPACE}.svc.cluster.local"}
    assert {"name": "TULLE_NATS_CA", "value": "/var/run/tulle/nats-ca/ca.crt"} in c["env"]


def test_a_bad_dashboard_value_gets_helms_schema_error_naming_it():
    with pytest.raises(ChartError, match="/dashboard/port"):
        render_control_plane({"dashboard": {"enabled": True, "port": 0}})
    with pytest.raises(ChartError, match="/dashboard/allowedHosts/0"):
        render_control_plane({"dashboard": {"enabled": True, "allowedHosts": ["evil.example/../x"]}})
