"""The names of a Tulle installation on Kubernetes, in one place: what `tulle check`,
`tulle logs` and completion look for, and what the Helm chart creates.

The control plane (as Linkerd 2.11: three Deployments) runs in the `tulle` namespace:
tulle-destination (containers `destination` and `policy`), tulle-identity, and
tulle-proxy-injector, with NATS as the StatefulSet tulle-nats.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTROL_PLANE_NAMESPACE = "tulle"

# Labels on control-plane pods (Linkerd: linkerd.io/control-plane-component, -ns).
COMPONENT_LABEL = "tulle.dev/control-plane-component"
CONTROL_PLANE_NS_LABEL = "tulle.dev/control-plane-ns"
# On meshed pods, set by the injector (Linkerd: linkerd.io/proxy-version).
PROXY_VERSION_ANNOTATION = "tulle.dev/proxy-version"

PROXY_CONTAINER = "tulle-proxy"
TRUST_ANCHORS_ENV = "TULLE_PROXY_IDENTITY_TRUST_ANCHORS"

TRUST_ROOTS_CONFIGMAP = "tulle-identity-trust-roots"
TRUST_ROOTS_KEY = "ca-bundle.crt"
ISSUER_SECRET = "tulle-identity-issuer"
ISSUER_KEYS = ("ca.crt", "tls.crt", "tls.key")
INJECTOR_TLS_SECRET = "tulle-proxy-injector-k8s-tls"
INJECTOR_WEBHOOK = "tulle-proxy-injector-webhook-config"

CRD_GROUPS = ("tulle.dev", "policy.tulle.dev")
# name -> the version the CLI and the control plane read; --pre accepts an existing CRD that serves it.
CRDS = {
    "serviceprofiles.tulle.dev": "v1alpha1",
    "servers.policy.tulle.dev": "v1alpha1",
    "serverauthorizations.policy.tulle.dev": "v1alpha1",
}


@dataclass(frozen=True)
class Workload:
    """A control-plane Deployment or StatefulSet."""

    kind: str  # Deployment | StatefulSet
    name: str


DEPLOYMENTS = ("tulle-destination", "tulle-identity", "tulle-proxy-injector")
NATS_STATEFULSET = "tulle-nats"


@dataclass(frozen=True)
class Component:
    """A component as `tulle logs --component` names it: its pods and container."""

    name: str
    workload: Workload
    container: str


COMPONENTS = {
    "destination": Component("destination", Workload("Deployment", "tulle-destination"), "destination"),
    "policy": Component("policy", Workload("Deployment", "tulle-destination"), "policy"),
    "identity": Component("identity", Workload("Deployment", "tulle-identity"), "identity"),
    "injector": Component("injector", Workload("Deployment", "tulle-proxy-injector"), "proxy-injector"),
    "nats": Component("nats", Workload("StatefulSet", NATS_STATEFULSET), "nats"),
}
# `--component proxy`: the tulle-proxy container of every meshed pod.
LOG_COMPONENTS = (*COMPONENTS, "proxy")

# The bus (NATS), as the CLI reaches it from outside the cluster: a port-forward to a
# tulle-nats pod, the observer's credential and NATS's CA read from their Secrets.
NATS_SERVICE = "tulle-nats"
NATS_CLIENT_PORT = 4222
NATS_CREDENTIALS_SECRET = "tulle-nats-credentials"
NATS_OBSERVER_KEY = "observer"  # the observer role's nkey seed: reads KV and events, writes nothing
NATS_TLS_SECRET = "tulle-nats-tls"
NATS_CA_KEY = "ca.crt"


def nats_tls_name(namespace: str) -> str:
    """A name the NATS servers' certificate holds whatever the cluster domain
    (tulle.install.material.nats_dns_names): what a client reaching them at another
    address (a port-forward) verifies."""
    return f"{NATS_SERVICE}.{namespace}.svc"
