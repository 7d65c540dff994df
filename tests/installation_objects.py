"""A Tulle installation as the API server would hold it, for tests against tests/fakekube.py.

Objects are built with the `kubernetes` client's models and serialized as the API server
would (camelCase, base64 Secret data), so `tulle check`, `tulle logs` and completion read
exactly what they would read from a cluster. `Installation` keeps the trust material it
made, so a test can break one piece and know what the rest is.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Optional

from kubernetes import client

from tulle import __version__, pki
from tulle import installation as names

IMAGE = "ghcr.io/tulle/tulle"
NATS_IMAGE = "nats:2.10-alpine"
_serializer = client.ApiClient()


def as_api(model: Any, api_version: str, kind: str) -> dict:
    """A model as the API server serves it (JSON, camelCase), with its apiVersion and kind."""
    return dict(_serializer.sanitize_for_serialization(model), apiVersion=api_version, kind=kind)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def meta(name: str, namespace: Optional[str] = None, labels: Optional[dict] = None,
         annotations: Optional[dict] = None) -> client.V1ObjectMeta:
    return client.V1ObjectMeta(name=name, namespace=namespace, labels=labels, annotations=annotations)


def ready_status(*containers: str, init: tuple[str, ...] = (), ready: bool = True, waiting: str = "") -> client.V1PodStatus:
    def st(name):
        state = (client.V1ContainerState(waiting=client.V1ContainerStateWaiting(reason=waiting)) if waiting else
                 client.V1ContainerState(running=client.V1ContainerStateRunning(started_at=dt.datetime.now(dt.timezone.utc))))
        return client.V1ContainerStatus(name=name, ready=ready, restart_count=3 if waiting else 0, image=IMAGE,
                                        image_id="", started=ready, state=state)

    return client.V1PodStatus(
        phase="Running", pod_ip="10.42.0.9",
        conditions=[client.V1PodCondition(type="Ready", status="True" if ready else "False")],
        container_statuses=[st(c) for c in containers], init_container_statuses=[st(c) for c in init] or None)


@dataclass
class Installation:
    namespace: str = names.CONTROL_PLANE_NAMESPACE
    version: str = __version__
    anchor: pki.CA = field(default_factory=pki.new_trust_anchor)
    issuer: Optional[pki.CA] = None
    webhook_ca: pki.CA = field(default_factory=lambda: pki.new_trust_anchor("webhook"))
    webhook_cert_pem: bytes = b""
    webhook_key_pem: bytes = b""

    def __post_init__(self):
        if self.issuer is None:
            self.issuer = pki.new_issuer(self.anchor)
        if not self.webhook_cert_pem:
            self.webhook_cert_pem, self.webhook_key_pem = self.webhook_cert(f"tulle-proxy-injector.{self.namespace}.svc")

    def webhook_cert(self, dns: str, ca: Optional[pki.CA] = None,
                     lifetime: dt.timedelta = dt.timedelta(days=365)) -> tuple[bytes, bytes]:
        cert, key = pki.issue_leaf(ca or self.webhook_ca, dns, lifetime=lifetime)
        return pki.cert_pem(cert), pki.key_pem(key)

    # --- objects ----------------------------------------------------------------------------------

    def namespace_object(self) -> dict:
        return as_api(client.V1Namespace(metadata=meta(self.namespace)), "v1", "Namespace")

    def deployment(self, name: str, containers: list[str], *, ready: int = 1, replicas: int = 1,
                   version: Optional[str] = None) -> dict:
        component = name.removeprefix("tulle-").replace("proxy-", "")
        labels = {names.COMPONENT_LABEL: component, names.CONTROL_PLANE_NS_LABEL: self.namespace}
        spec = client.V1DeploymentSpec(
            replicas=replicas, selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(metadata=meta(None, labels=labels), spec=client.V1PodSpec(
                containers=[client.V1Container(name=c, image=f"{IMAGE}:v{version or self.version}") for c in containers])))
        status = client.V1DeploymentStatus(replicas=replicas, ready_replicas=ready or None,
                                           available_replicas=ready or None, updated_replicas=replicas)
        return as_api(client.V1Deployment(metadata=meta(name, self.namespace, labels), spec=spec, status=status),
                      "apps/v1", "Deployment")

    def statefulset(self, *, ready: int = 3) -> dict:
        labels = {names.COMPONENT_LABEL: "nats", names.CONTROL_PLANE_NS_LABEL: self.namespace}
        spec = client.V1StatefulSetSpec(
            replicas=3, service_name="tulle-nats", selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(metadata=meta(None, labels=labels), spec=client.V1PodSpec(
                containers=[client.V1Container(name="nats", image=NATS_IMAGE)])))
        return as_api(client.V1StatefulSet(metadata=meta(names.NATS_STATEFULSET, self.namespace, labels), spec=spec,
                                           status=client.V1StatefulSetStatus(replicas=3, ready_replicas=ready or None)),
                      "apps/v1", "StatefulSet")

    def pod(self, name: str, component: str, containers: list[str], *, image: Optional[str] = None,
            ready: bool = True, waiting: str = "") -> dict:
        labels = {names.COMPONENT_LABEL: component, names.CONTROL_PLANE_NS_LABEL: self.namespace}
        spec = client.V1PodSpec(containers=[client.V1Container(name=c, image=image or f"{IMAGE}:v{self.version}")
                                            for c in containers])
        return as_api(client.V1Pod(metadata=meta(name, self.namespace, labels), spec=spec,
                                   status=ready_status(*containers, ready=ready, waiting=waiting)), "v1", "Pod")

    def trust_roots(self, pem: Optional[bytes] = None) -> dict:
        data = {names.TRUST_ROOTS_KEY: (pem if pem is not None else self.anchor.cert_pem).decode()}
        return as_api(client.V1ConfigMap(metadata=meta(names.TRUST_ROOTS_CONFIGMAP, self.namespace), data=data),
                      "v1", "ConfigMap")

    def issuer_secret(self, issuer: Optional[pki.CA] = None, *, drop: tuple[str, ...] = ()) -> dict:
        issuer = issuer or self.issuer
        data = {"ca.crt": b64(self.anchor.cert_pem), "tls.crt": b64(issuer.cert_pem), "tls.key": b64(issuer.key_pem)}
        for k in drop:
            data.pop(k)
        return as_api(client.V1Secret(metadata=meta(names.ISSUER_SECRET, self.namespace), type="kubernetes.io/tls",
                                      data=data), "v1", "Secret")

    def injector_secret(self, cert_pem: Optional[bytes] = None) -> dict:
        data = {"tls.crt": b64(cert_pem or self.webhook_cert_pem), "tls.key": b64(self.webhook_key_pem),
                "ca.crt": b64(self.webhook_ca.cert_pem)}
        return as_api(client.V1Secret(metadata=meta(names.INJECTOR_TLS_SECRET, self.namespace), type="kubernetes.io/tls",
                                      data=data), "v1", "Secret")

    def webhook(self, ca_bundle: Optional[bytes] = None) -> dict:
        hook = client.V1MutatingWebhook(
            name="tulle-proxy-injector.tulle.dev", admission_review_versions=["v1"], side_effects="None",
            failure_policy="Ignore", reinvocation_policy="Never",
            client_config=client.AdmissionregistrationV1WebhookClientConfig(
                service=client.AdmissionregistrationV1ServiceReference(name="tulle-proxy-injector",
                                                                       namespace=self.namespace, path="/", port=443),
                ca_bundle=b64(ca_bundle or self.webhook_ca.cert_pem)),
            namespace_selector=client.V1LabelSelector(match_expressions=[client.V1LabelSelectorRequirement(
                key="tulle.dev/inject", operator="NotIn", values=["disabled"])]),
            rules=[client.V1RuleWithOperations(api_groups=[""], api_versions=["v1"], operations=["CREATE"],
                                               resources=["pods"], scope="Namespaced")])
        return as_api(client.V1MutatingWebhookConfiguration(metadata=meta(names.INJECTOR_WEBHOOK), webhooks=[hook]),
                      "admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration")

    def crd(self, name: str, versions: tuple[str, ...] = ("v1alpha1",)) -> dict:
        plural, _, group = name.partition(".")
        kind = {"serviceprofiles": "ServiceProfile", "servers": "Server",
                "serverauthorizations": "ServerAuthorization"}.get(plural, plural.title())
        schema = client.V1CustomResourceValidation(open_apiv3_schema=client.V1JSONSchemaProps(
            type="object", x_kubernetes_preserve_unknown_fields=True))
        spec = client.V1CustomResourceDefinitionSpec(
            group=group, scope="Namespaced",
            names=client.V1CustomResourceDefinitionNames(kind=kind, plural=plural, list_kind=f"{kind}List"),
            versions=[client.V1CustomResourceDefinitionVersion(name=v, served=True, storage=i == 0, schema=schema)
                      for i, v in enumerate(versions)])
        return as_api(client.V1CustomResourceDefinition(metadata=meta(name), spec=spec),
                      "apiextensions.k8s.io/v1", "CustomResourceDefinition")

    def meshed_pod(self, name: str, namespace: str = "demo", *, ready: bool = True, waiting: str = "",
                   anchors_pem: Optional[bytes] = None, proxy_version: Optional[str] = None,
                   native_sidecar: bool = False, app: str = "app") -> dict:
        """An app pod as the injector leaves it: a tulle-proxy container with its trust anchors."""
        proxy = client.V1Container(
            name=names.PROXY_CONTAINER, image=f"{IMAGE}:v{proxy_version or self.version}", args=["proxy", "run"],
            env=[client.V1EnvVar(name=names.TRUST_ANCHORS_ENV,
                                 value=(anchors_pem or self.anchor.cert_pem).decode()),
                 client.V1EnvVar(name="TULLE_PROXY_NAMESPACE", value_from=client.V1EnvVarSource(
                     field_ref=client.V1ObjectFieldSelector(field_path="metadata.namespace")))])
        app_container = client.V1Container(name=app, image="ghcr.io/example/app:1.0")
        if native_sidecar:
            proxy.restart_policy = "Always"
            spec = client.V1PodSpec(init_containers=[proxy], containers=[app_container])
            status = ready_status(app, init=(names.PROXY_CONTAINER,), ready=ready, waiting=waiting)
        else:
            spec = client.V1PodSpec(containers=[proxy, app_container])
            status = ready_status(names.PROXY_CONTAINER, app, ready=ready, waiting=waiting)
        annotations = {names.PROXY_VERSION_ANNOTATION: f"v{proxy_version or self.version}"}
        return as_api(client.V1Pod(metadata=meta(name, namespace, {"app": app}, annotations), spec=spec, status=status),
                      "v1", "Pod")

    def objects(self) -> list[dict]:
        """Everything a healthy install has."""
        out = [self.namespace_object(),
               self.deployment("tulle-destination", ["destination", "policy"]),
               self.deployment("tulle-identity", ["identity"]),
               self.deployment("tulle-proxy-injector", ["proxy-injector"]),
               self.statefulset(),
               self.pod("tulle-destination-5d8f7c9b4-x2x9k", "destination", ["destination", "policy"]),
               self.pod("tulle-identity-6c4b9d7f8-q7w2e", "identity", ["identity"]),
               self.pod("tulle-proxy-injector-7f9c6d5b8-m3n4p", "injector", ["proxy-injector"]),
               *(self.pod(f"tulle-nats-{i}", "nats", ["nats"], image=NATS_IMAGE) for i in range(3)),
               self.trust_roots(), self.issuer_secret(), self.injector_secret(), self.webhook(),
               *(self.crd(name) for name in names.CRDS)]
        return out

    def apply_to(self, kube) -> "Installation":
        for obj in self.objects():
            kube.apply(obj)
        return self
