"""The checks of a Kubernetes installation: the facts gather_cluster reads through the
official client (as its typed models), and Linkerd's categories over them, under Tulle's
names (tulle/installation.py).

    kubernetes-api, kubernetes-version
    pre-kubernetes-setup, tulle-crds             (--pre: before an install)
    tulle-existence, tulle-config,
    tulle-nats                                   (over the bus, through a port-forward:
                                                 tulle/check/nats.py, shared with local mode)
    tulle-identity, tulle-webhooks-and-apisvc-tls, tulle-version,
    tulle-control-plane-proxy                    (not meshed, by design: the chart says
                                                 tulle.dev/inject: disabled)
    tulle-data-plane                             (--proxy: the pods, and their heartbeats
                                                 in tulle-proxies for their certificates)
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from tulle import installation as names
from tulle import schemas
from tulle.check.core import Category, Check, Outcome, Result, error, ok, warning
from tulle.check.identity import EXPIRY_WARNING, IdentityMaterial, fingerprints, identity_checks
from tulle.check.nats import BusFacts, NatsAdvice, nats_checks
from tulle.check.proxies import DEFAULT_LIFETIME_S, certificate_verdict, certificates_outcome

T = TypeVar("T")

MIN_KUBERNETES = (1, 22)
INSTALL_HINT = "install the control plane: `tulle install | kubectl apply -f -` (or its Helm charts)"


@dataclass
class Read(Generic[T]):
    """One object read from the API: found, absent (404), or not readable (`error`)."""

    value: Optional[T] = None
    error: str = ""

    @property
    def found(self) -> bool:
        return self.value is not None


@dataclass(frozen=True)
class Access:
    verb: str
    resource: str
    group: str = ""
    namespace: Optional[str] = None


@dataclass
class ClusterFacts:
    namespace: str = names.CONTROL_PLANE_NAMESPACE
    pre: bool = False
    with_proxies: bool = False
    cli_version: str = ""
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    client_error: str = ""  # the client could not be set up (no kubeconfig, no such context)
    api_error: str = ""  # the API did not answer
    server_version: Optional[tuple[int, int, str]] = None  # major, minor, gitVersion
    control_namespace: Read = field(default_factory=Read)  # V1Namespace
    deployments: dict[str, Read] = field(default_factory=dict)  # name -> V1Deployment
    nats: Read = field(default_factory=Read)  # V1StatefulSet
    pods: Read = field(default_factory=Read)  # list[V1Pod] of the control plane namespace
    trust_roots: Read = field(default_factory=Read)  # V1ConfigMap
    issuer: Read = field(default_factory=Read)  # V1Secret
    injector_tls: Read = field(default_factory=Read)  # V1Secret
    webhook: Read = field(default_factory=Read)  # V1MutatingWebhookConfiguration
    crds: dict[str, Read] = field(default_factory=dict)  # name -> V1CustomResourceDefinition
    access: dict[Access, tuple[bool, str]] = field(default_factory=dict)  # (allowed, reason)
    data_plane: Read = field(default_factory=Read)  # list[V1Pod] with a tulle-proxy container
    # The bus as the observer reads it through a port-forward (None: not read, e.g. no API).
    bus: Optional[BusFacts] = None
    cert_lifetime_s: float = DEFAULT_LIFETIME_S  # the identity Deployment's --lifetime


# --- small readers of the models ---------------------------------------------------------------


def _data(obj: Any, key: str, *, secret: bool) -> Optional[bytes]:
    """A ConfigMap's or Secret's value (a Secret's data is base64, as on the wire)."""
    data = (obj.data or {}) if obj is not None else {}
    value = data.get(key)
    if value is None:
        return None
    if secret:
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            return None
    return value.encode()


def _load_certs(pem: Optional[bytes]) -> list[x509.Certificate]:
    if not pem:
        return []
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def _unreadable(what: str, read: Read, verb: str = "get") -> Optional[Outcome]:
    if read.error:
        return error(f"cannot read {what}: {read.error}", f"your Kubernetes user needs `{verb}` on it")
    return None


def image_version(image: str) -> str:
    """`ghcr.io/tulle/tulle:v0.1.0` -> `0.1.0`; "" when the image names no tag (a digest, latest)."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return ""
    tag = last.rsplit(":", 1)[1]
    if tag == "latest":
        return ""
    return tag[1:] if tag.startswith("v") and tag[1:2].isdigit() else tag


def proxy_container(pod: Any) -> Optional[Any]:
    """The pod's tulle-proxy container: a regular one, or a native sidecar (an init container)."""
    spec = pod.spec
    for c in list(spec.init_containers or []) + list(spec.containers or []):
        if c.name == names.PROXY_CONTAINER:
            return c
    return None


def _container_status(pod: Any, name: str) -> Optional[Any]:
    st = pod.status
    if st is None:
        return None
    for cs in list(st.init_container_statuses or []) + list(st.container_statuses or []):
        if cs.name == name:
            return cs
    return None


def _why_not_ready(cs: Any) -> str:
    if cs is None:
        return "no status yet"
    state = cs.state
    if state is not None and state.waiting is not None:
        return f"waiting: {state.waiting.reason or 'unknown'}"
    if state is not None and state.terminated is not None:
        return f"terminated: {state.terminated.reason or state.terminated.exit_code}"
    return f"running, not ready (restarts: {cs.restart_count or 0})"


def _pod_name(pod: Any) -> str:
    return f"{pod.metadata.namespace}/{pod.metadata.name}"


# --- kubernetes-api, kubernetes-version ---------------------------------------------------------


def client_initialized(f: ClusterFacts) -> Outcome:
    if f.client_error:
        return error(f.client_error, "pass --kubeconfig FILE and --context NAME, as kubectl takes them")
    return ok()


def api_reachable(f: ClusterFacts) -> Outcome:
    if f.api_error:
        return error(f"the Kubernetes API does not answer: {f.api_error}",
                     "is the cluster up, and the kubeconfig's server address right? `kubectl version` tells")
    return ok()


def minimum_version(f: ClusterFacts) -> Optional[Outcome]:
    if f.server_version is None:
        return None
    major, minor, text = f.server_version
    if (major, minor) < MIN_KUBERNETES:
        return error(f"Kubernetes {text} is older than {MIN_KUBERNETES[0]}.{MIN_KUBERNETES[1]}",
                     "upgrade the cluster: Tulle needs the APIs of Kubernetes 1.22 and later")
    return ok()


# --- --pre ----------------------------------------------------------------------------------------


def namespace_absent(f: ClusterFacts) -> Outcome:
    bad = _unreadable(f"Namespace {f.namespace}", f.control_namespace)
    if bad:
        return bad
    if f.control_namespace.found:
        return error(f"the namespace {f.namespace} already exists",
                     "Tulle may be installed already: `tulle check` checks it; or install into another namespace")
    return ok()


def can(access: list[Access], what: str):
    def run(f: ClusterFacts) -> Outcome:
        refused = []
        for a in access:
            allowed, reason = f.access.get(a, (False, "not asked"))
            if not allowed:
                where = f" in {a.namespace}" if a.namespace else ""
                resource = f"{a.resource}.{a.group}" if a.group else a.resource
                refused.append(f"cannot {a.verb} {resource}{where}" + (f" ({reason})" if reason else ""))
        if refused:
            return error("\n".join(refused), f"installing needs the right to {what}: "
                                             "run it as a cluster administrator")
        return ok()
    return run


def pre_access(namespace: str) -> list[tuple[str, list[Access], str]]:
    """(description, the SelfSubjectAccessReviews it asks, what the right is for)."""
    cluster = [Access("create", "namespaces"), Access("create", "clusterroles", "rbac.authorization.k8s.io"),
               Access("create", "clusterrolebindings", "rbac.authorization.k8s.io"),
               Access("create", "customresourcedefinitions", "apiextensions.k8s.io"),
               Access("create", "mutatingwebhookconfigurations", "admissionregistration.k8s.io")]
    out = [("can create non-namespaced resources", cluster, "create the namespace, RBAC, CRDs and the webhook")]
    for desc, resource, group in (("ServiceAccounts", "serviceaccounts", ""), ("Services", "services", ""),
                                  ("Deployments", "deployments", "apps"), ("StatefulSets", "statefulsets", "apps"),
                                  ("ConfigMaps", "configmaps", ""), ("Secrets", "secrets", "")):
        out.append((f"can create {desc}", [Access("create", resource, group, namespace)],
                    f"create {desc} in {namespace}"))
    out.append(("can read Secrets", [Access("get", "secrets", "", namespace)], f"read Secrets in {namespace}"))
    return out


def _crd_serves(crd: Any, version: str) -> bool:
    return any(v.name == version and v.served for v in crd.spec.versions or [])


def crds_absent_or_compatible(f: ClusterFacts) -> Outcome:
    bad = []
    for name, version in names.CRDS.items():
        read = f.crds.get(name, Read())
        if read.error:
            return error(f"cannot read CustomResourceDefinition {name}: {read.error}",
                         "your Kubernetes user needs `get` on customresourcedefinitions")
        if read.found and not _crd_serves(read.value, version):
            served = ", ".join(v.name for v in read.value.spec.versions or [] if v.served) or "none"
            bad.append(f"{name} exists but does not serve {version} (it serves {served})")
    if bad:
        return error("\n".join(bad), "another Tulle installed them: remove it first, or install that version")
    return ok()


# --- tulle-existence ------------------------------------------------------------------------------


def namespace_exists(f: ClusterFacts) -> Outcome:
    bad = _unreadable(f"Namespace {f.namespace}", f.control_namespace)
    if bad:
        return bad
    if not f.control_namespace.found:
        return error(f"the namespace {f.namespace} does not exist", f"{INSTALL_HINT}; or pass -n NAMESPACE")
    return ok()


def _replicas_line(kind: str, name: str, read: Read) -> Optional[str]:
    if read.error:
        return f"{kind} {name}: cannot read it: {read.error}"
    if not read.found:
        return f"{kind} {name} does not exist"
    obj = read.value
    want = obj.spec.replicas if obj.spec.replicas is not None else 1
    ready = (obj.status.ready_replicas if obj.status else 0) or 0
    if ready < want:
        return f"{kind} {name}: {ready}/{want} replicas ready"
    return None


def deployments_ready(f: ClusterFacts) -> Outcome:
    problems = [line for name in names.DEPLOYMENTS
                if (line := _replicas_line("Deployment", name, f.deployments.get(name, Read())))]
    if problems:
        missing = any("does not exist" in p for p in problems)
        return error("\n".join(problems), INSTALL_HINT if missing else
                     f"`kubectl -n {f.namespace} get pods` and `tulle logs --component destination` (or identity, "
                     "injector) say why")
    return ok()


def nats_ready(f: ClusterFacts) -> Outcome:
    line = _replicas_line("StatefulSet", names.NATS_STATEFULSET, f.nats)
    if line:
        return error(line, INSTALL_HINT if "does not exist" in line else "`tulle logs --component nats` says why")
    return ok()


def control_plane_pods_running(f: ClusterFacts) -> Outcome:
    bad = _unreadable(f"the pods of {f.namespace}", f.pods, "list")
    if bad:
        return bad
    pods = f.pods.value or []
    if not pods:
        return error(f"no pod runs in {f.namespace}", INSTALL_HINT)
    problems = []
    for pod in pods:
        phase = pod.status.phase if pod.status else None
        if phase == "Succeeded":
            continue
        if phase != "Running":
            problems.append(f"{pod.metadata.name}: {phase or 'Pending'}")
            continue
        for c in pod.spec.containers or []:
            cs = _container_status(pod, c.name)
            if cs is None or not cs.ready:
                problems.append(f"{pod.metadata.name}: container {c.name} {_why_not_ready(cs)}")
    if problems:
        return error("\n".join(problems), f"`tulle logs -n {f.namespace} POD` shows a pod's logs; "
                                          f"`kubectl -n {f.namespace} describe pod POD` its events")
    return ok()


# --- tulle-config ----------------------------------------------------------------------------------


def crds_installed(f: ClusterFacts) -> Outcome:
    problems = []
    for name, version in names.CRDS.items():
        read = f.crds.get(name, Read())
        if read.error:
            problems.append(f"{name}: cannot read it: {read.error}")
        elif not read.found:
            problems.append(f"{name} does not exist")
        elif not _crd_serves(read.value, version):
            problems.append(f"{name} does not serve {version}")
    if problems:
        return error("\n".join(problems), "install the CRDs: `tulle install --crds | kubectl apply -f -`")
    return ok()


def trust_roots_present(f: ClusterFacts) -> Outcome:
    what = f"ConfigMap {f.namespace}/{names.TRUST_ROOTS_CONFIGMAP}"
    bad = _unreadable(what, f.trust_roots)
    if bad:
        return bad
    if not f.trust_roots.found:
        return error(f"{what} does not exist", INSTALL_HINT)
    if not _data(f.trust_roots.value, names.TRUST_ROOTS_KEY, secret=False):
        return error(f"{what} has no key {names.TRUST_ROOTS_KEY}",
                     "set identityTrustAnchorsPEM in the install values and upgrade")
    return ok()


def issuer_secret_present(f: ClusterFacts) -> Outcome:
    what = f"Secret {f.namespace}/{names.ISSUER_SECRET}"
    bad = _unreadable(what, f.issuer)
    if bad:
        return bad
    if not f.issuer.found:
        return error(f"{what} does not exist", INSTALL_HINT)
    missing = [k for k in names.ISSUER_KEYS if not _data(f.issuer.value, k, secret=True)]
    if missing:
        return error(f"{what} lacks {', '.join(missing)}",
                     "set identity.issuer.tls.crtPEM and keyPEM in the install values and upgrade")
    return ok()


def identity_material(f: ClusterFacts) -> Optional[IdentityMaterial]:
    if f.pre or f.client_error or f.api_error or not f.control_namespace.found:
        return None
    if not f.trust_roots.found or not f.issuer.found:
        return None  # said by tulle-config
    ns = f.namespace
    return IdentityMaterial(
        anchors_where=f"ConfigMap {ns}/{names.TRUST_ROOTS_CONFIGMAP} key {names.TRUST_ROOTS_KEY}",
        issuer_where=f"Secret {ns}/{names.ISSUER_SECRET}",
        anchors_pem=_data(f.trust_roots.value, names.TRUST_ROOTS_KEY, secret=False),
        issuer_cert_pem=_data(f.issuer.value, "tls.crt", secret=True),
        issuer_key_pem=_data(f.issuer.value, "tls.key", secret=True),
        anchors_problem=f"no key {names.TRUST_ROOTS_KEY}", issuer_problem="no key tls.crt",
        fix_anchors="rotate the trust anchors: `tulle identity init`, then set identityTrustAnchorsPEM "
                    "(old and new anchors together until every proxy restarted) and upgrade",
        fix_issuer=f"make a new issuer under the anchor (`tulle identity init --anchor-cert ca.crt --anchor-key "
                   f"ca.key`) and put it in Secret {ns}/{names.ISSUER_SECRET}: the identity service reloads it",
        now=f.now)


# --- tulle-webhooks-and-apisvc-tls -------------------------------------------------------------------


def _injector_cert(f: ClusterFacts) -> Optional[x509.Certificate]:
    certs = _load_certs(_data(f.injector_tls.value, "tls.crt", secret=True)) if f.injector_tls.found else []
    return certs[0] if certs else None


def _webhook_service_names(f: ClusterFacts) -> list[str]:
    hooks = (f.webhook.value.webhooks or []) if f.webhook.found else []
    out = []
    for h in hooks:
        svc = h.client_config.service if h.client_config else None
        if svc is not None:
            out.append(f"{svc.name}.{svc.namespace}.svc")
    return out


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        return []


def injector_cert_valid(f: ClusterFacts) -> Outcome:
    what = f"Secret {f.namespace}/{names.INJECTOR_TLS_SECRET}"
    bad = _unreadable(what, f.injector_tls)
    if bad:
        return bad
    hint = "the chart makes this certificate: upgrade the control plane to make a new one"
    if not f.injector_tls.found:
        return error(f"{what} does not exist", INSTALL_HINT)
    cert = _injector_cert(f)
    if cert is None:
        return error(f"{what} has no parsable certificate under tls.crt", hint)
    if cert.not_valid_before_utc > f.now:
        return error(f"the certificate in {what} is not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}",
                     hint)
    if cert.not_valid_after_utc <= f.now:
        return error(f"the certificate in {what} expired on {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}", hint)
    dns = _dns_names(cert)
    unnamed = [n for n in _webhook_service_names(f) if n not in dns]
    if unnamed:
        return error(f"the certificate in {what} does not name {', '.join(unnamed)} (it names "
                     f"{', '.join(dns) or 'no DNS name'})", hint)
    return ok()


def injector_cert_not_expiring(f: ClusterFacts) -> Optional[Outcome]:
    cert = _injector_cert(f)
    if cert is None or cert.not_valid_after_utc <= f.now:
        return None
    if cert.not_valid_after_utc <= f.now + EXPIRY_WARNING:
        left = (cert.not_valid_after_utc - f.now).days
        return warning(f"the proxy-injector certificate expires on {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} "
                       f"(in {left} days)", "upgrade the control plane to make a new one")
    return ok()


def webhook_trusts_cert(f: ClusterFacts) -> Outcome:
    what = f"MutatingWebhookConfiguration {names.INJECTOR_WEBHOOK}"
    bad = _unreadable(what, f.webhook)
    if bad:
        return bad
    if not f.webhook.found:
        return error(f"{what} does not exist: no pod gets a proxy", INSTALL_HINT)
    hooks = f.webhook.value.webhooks or []
    if not hooks:
        return error(f"{what} has no webhook", INSTALL_HINT)
    cert = _injector_cert(f)
    if cert is None:
        return None  # said above
    hint = "upgrade the control plane: the chart writes the caBundle with the certificate"
    for h in hooks:
        bundle = h.client_config.ca_bundle if h.client_config else None
        cas = _load_certs(base64.b64decode(bundle) if isinstance(bundle, str) else bundle)
        if not cas:
            return error(f"{what}: webhook {h.name} has no caBundle", hint)
        if not any(_issued_by(cert, ca) for ca in cas):
            return error(f"{what}: the caBundle of webhook {h.name} does not verify the certificate in "
                         f"Secret {f.namespace}/{names.INJECTOR_TLS_SECRET}: the API server will refuse the webhook",
                         hint)
    return ok()


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert == ca:
        return True
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


# --- tulle-version -----------------------------------------------------------------------------------


def control_plane_version(f: ClusterFacts) -> Optional[Outcome]:
    other = []
    for name in names.DEPLOYMENTS:
        read = f.deployments.get(name, Read())
        if not read.found:
            continue
        for c in read.value.spec.template.spec.containers or []:
            v = image_version(c.image or "")
            if v and v != f.cli_version:
                other.append(f"{name}/{c.name} runs {v}")
    if other:
        return warning(f"{', '.join(other)}; this CLI is {f.cli_version}",
                       "upgrade the control plane with this CLI (`tulle upgrade | kubectl apply -f -`), "
                       "or use the CLI of its version")
    return ok()


# --- tulle-data-plane ---------------------------------------------------------------------------------


def _meshed(f: ClusterFacts) -> Optional[list[Any]]:
    if not f.with_proxies:
        return None
    return f.data_plane.value or []


def data_plane_ready(f: ClusterFacts) -> Optional[Outcome]:
    if not f.with_proxies:
        return None
    bad = _unreadable("pods in all namespaces", f.data_plane, "list")
    if bad:
        return bad
    problems, first = [], None
    for pod in _meshed(f):
        if pod.status is not None and pod.status.phase == "Succeeded":
            continue
        cs = _container_status(pod, names.PROXY_CONTAINER)
        if cs is None or not cs.ready:
            problems.append(f"{_pod_name(pod)}: {names.PROXY_CONTAINER} {_why_not_ready(cs)}")
            first = first or pod
    if problems:
        return error("\n".join(problems), f"`tulle logs -n {first.metadata.namespace} {first.metadata.name} "
                                          f"--container {names.PROXY_CONTAINER}` says what it waits for")
    return ok()


def _env(container: Any, name: str) -> Optional[str]:
    for e in container.env or []:
        if e.name == name:
            return e.value
    return None


def data_plane_anchors(f: ClusterFacts) -> Optional[Outcome]:
    pods = _meshed(f)
    if pods is None or not f.trust_roots.found:
        return None
    installation = fingerprints(_data(f.trust_roots.value, names.TRUST_ROOTS_KEY, secret=False) or b"")
    if not installation:
        return None
    disjoint, partial = [], []
    for pod in pods:
        value = _env(proxy_container(pod), names.TRUST_ANCHORS_ENV)
        if value is None:
            continue
        got = fingerprints(value)
        if not got & installation:
            disjoint.append(_pod_name(pod))
        elif got != installation:
            partial.append(_pod_name(pod))
    hint = "restart those workloads (`kubectl rollout restart`): the injector gives new pods the current anchors"
    if disjoint:
        return error(f"trust none of the installation's anchors: {', '.join(disjoint)}", hint)
    if partial:
        return warning(f"trust other anchors than the installation's: {', '.join(partial)}", hint)
    return ok()


def data_plane_version(f: ClusterFacts) -> Optional[Outcome]:
    pods = _meshed(f)
    if pods is None:
        return None
    old = [f"{_pod_name(pod)} runs {v}" for pod in pods if (v := _proxy_version(pod)) and v != f.cli_version]
    if old:
        return warning(f"{', '.join(old)}; this CLI is {f.cli_version}",
                       "restart those workloads (`kubectl rollout restart`) once the control plane is upgraded")
    return ok()


def data_plane_heartbeats(f: ClusterFacts) -> Optional[Outcome]:
    """A ready proxy writes its heartbeat every 5 s once it is connected to NATS: a ready pod
    without one runs on what it last heard of discovery and policy."""
    pods = _meshed(f)
    if pods is None or f.bus is None or not f.bus.heartbeats_read:
        return None
    missing = [pod for pod in pods if _proxy_ready(pod) and _heartbeat(f, pod) is None]
    if missing:
        first = missing[0]
        return error("\n".join(f"{_pod_name(p)}: no heartbeat in {schemas.PROXIES_BUCKET} (entries expire "
                               f"{schemas.PROXY_HEARTBEAT_TTL_S:g} s after the last)" for p in missing),
                     f"the proxy cannot reach NATS: `tulle logs -n {first.metadata.namespace} {first.metadata.name} "
                     f"--container {names.PROXY_CONTAINER}`")
    return ok()


def data_plane_certificates(f: ClusterFacts) -> Optional[Outcome]:
    pods = _meshed(f)
    if pods is None or f.bus is None or not f.bus.heartbeats_read:
        return None
    anchors = fingerprints(_data(f.trust_roots.value, names.TRUST_ROOTS_KEY, secret=False) or b"") \
        if f.trust_roots.found else set()
    material = identity_material(f)
    issuer = material.issuer() if material is not None else None
    issuer_not_after = issuer.not_valid_after_utc.timestamp() if issuer is not None else None
    verdicts = ((pod, _pod_name(pod), certificate_verdict(
        hb, now=f.now.timestamp(), expected_identity=_expected_identity(pod), installation_anchors=anchors,
        lifetime_s=f.cert_lifetime_s, issuer_not_after=issuer_not_after))
        for pod in pods if (hb := _heartbeat(f, pod)) is not None)  # no heartbeat: said by that check
    return certificates_outcome(verdicts, lambda pod: (
        f"a proxy renews its certificate at 70 % of its life from the identity service: `tulle logs -n "
        f"{pod.metadata.namespace} {pod.metadata.name} --container {names.PROXY_CONTAINER}`, "
        f"`tulle logs --component identity`; a proxy started with other anchors needs a restart "
        f"(`kubectl rollout restart`)"))


def _proxy_ready(pod: Any) -> bool:
    if pod.status is None or pod.status.phase != "Running":
        return False
    cs = _container_status(pod, names.PROXY_CONTAINER)
    return cs is not None and bool(cs.ready)


def _heartbeat(f: ClusterFacts, pod: Any) -> Optional[schemas.ProxyHeartbeat]:
    """A pod's proxy writes under <namespace>.<pod name> (TULLE_PROXY_WORKLOAD is the pod's name)."""
    return f.bus.heartbeats.get(schemas.proxy_key(pod.metadata.namespace, pod.metadata.name)) if f.bus else None


def _expected_identity(pod: Any) -> str:
    """The identity the pod's proxy should hold: its service account's, in the trust domain the
    injector gave it; "" when the pod does not say (then it is not compared)."""
    domain = _env(proxy_container(pod), "TULLE_PROXY_TRUST_DOMAIN")
    if not domain:
        return ""
    return schemas.identity_name(pod.spec.service_account_name or "default", pod.metadata.namespace, domain)


# --- tulle-control-plane-proxy -----------------------------------------------------------------------


def _control_plane_proxies(f: ClusterFacts) -> list[Any]:
    return [pod for pod in (f.pods.value or []) if proxy_container(pod) is not None] if f.pods.found else []


def control_plane_unmeshed(f: ClusterFacts) -> Optional[Outcome]:
    """The control plane reaches NATS and the API itself, with its own credentials: a proxy in
    front of identity would need a certificate from it, one in front of NATS the bus it serves.
    The chart marks the namespace and every pod template `tulle.dev/inject: disabled`."""
    if not f.pods.found:
        return None  # said by tulle-existence
    meshed = _control_plane_proxies(f)
    if meshed:
        return warning(f"{', '.join(p.metadata.name for p in meshed)}: {'carries' if len(meshed) == 1 else 'carry'} "
                       f"a {names.PROXY_CONTAINER} container",
                       f"the control plane runs without proxies (its namespace and pods say tulle.dev/inject: "
                       f"disabled): one was added by hand; re-apply the control plane "
                       f"(`tulle upgrade | kubectl apply -f -`) to remove it")
    return ok()


def control_plane_proxies_ready(f: ClusterFacts) -> Optional[Outcome]:
    meshed = _control_plane_proxies(f)
    if not meshed:
        return None
    bad = [p for p in meshed if not _proxy_ready(p)]
    if bad:
        return error("\n".join(f"{p.metadata.name}: {names.PROXY_CONTAINER} "
                               f"{_why_not_ready(_container_status(p, names.PROXY_CONTAINER))}" for p in bad),
                     f"`tulle logs -n {f.namespace} {bad[0].metadata.name} --container {names.PROXY_CONTAINER}` "
                     "says what it waits for")
    return ok()


def control_plane_proxies_version(f: ClusterFacts) -> Optional[Outcome]:
    meshed = _control_plane_proxies(f)
    if not meshed:
        return None
    old = [f"{p.metadata.name} runs {v}" for p in meshed if (v := _proxy_version(p)) and v != f.cli_version]
    if old:
        return warning(f"{', '.join(old)}; this CLI is {f.cli_version}",
                       "re-apply the control plane with this CLI (`tulle upgrade | kubectl apply -f -`)")
    return ok()


def _proxy_version(pod: Any) -> str:
    annotations = pod.metadata.annotations or {}
    v = annotations.get(names.PROXY_VERSION_ANNOTATION) or image_version(proxy_container(pod).image or "")
    return v[1:] if v.startswith("v") and v[1:2].isdigit() else v


# --- tulle-nats ---------------------------------------------------------------------------------------


def _bus_facts(f: ClusterFacts) -> Optional[BusFacts]:
    return f.bus


def nats_advice(namespace: str) -> NatsAdvice:
    return NatsAdvice(
        unreachable=(f"the CLI reaches NATS through a port-forward to a {names.NATS_SERVICE}-* pod with the observer "
                     f"credential of Secret {namespace}/{names.NATS_CREDENTIALS_SECRET}: see the NATS StatefulSet "
                     f"check above, `tulle logs --component nats`, and that you may port-forward "
                     f"(`kubectl auth can-i create pods/portforward -n {namespace}`)"),
        jetstream_off="the chart runs NATS with JetStream on: `tulle logs --component nats` says why it is off",
        nats_logs="`tulle logs --component nats` and "
                  f"`kubectl -n {namespace} get pods -l {names.COMPONENT_LABEL}=nats` say which and why",
        fix_replicas="a stream keeps the copies it was made with (its writer made it while NATS had fewer servers, "
                     "and no Tulle role may change a stream): raise them with `nats stream edit STREAM --replicas "
                     "{n}` for {streams}, as a NATS user allowed $JS.API.STREAM.UPDATE in the MESH account")


def categories(*, pre: bool, with_proxies: bool, namespace: str) -> list[Category[ClusterFacts]]:
    cats: list[Category[ClusterFacts]] = [
        Category("kubernetes-api", (
            Check("can initialize the client", client_initialized, fatal=True),
            Check("can query the Kubernetes API", api_reachable, fatal=True, transient=True),
        )),
        Category("kubernetes-version", (
            Check("is running the minimum Kubernetes API version", minimum_version),
        )),
    ]
    if pre:
        cats += [
            Category("pre-kubernetes-setup", (
                Check("control plane namespace does not already exist", namespace_absent),
                *(Check(desc, can(access, what)) for desc, access, what in pre_access(namespace)),
            )),
            Category("tulle-crds", (
                Check("Tulle CRDs are absent or compatible", crds_absent_or_compatible),
            )),
        ]
        return cats
    cats += [
        Category("tulle-existence", (
            Check("control plane namespace exists", namespace_exists, fatal=True),
            Check("control plane Deployments are ready", deployments_ready, transient=True),
            Check("the NATS StatefulSet is ready", nats_ready, transient=True),
            Check("control plane pods are running", control_plane_pods_running, transient=True),
        )),
        Category("tulle-config", (
            Check("control plane CustomResourceDefinitions exist", crds_installed),
            Check("the trust roots ConfigMap exists", trust_roots_present),
            Check("the issuer Secret exists", issuer_secret_present),
        )),
        Category("tulle-nats", nats_checks(_bus_facts, nats_advice(namespace))),
        Category("tulle-identity", identity_checks(identity_material)),
        Category("tulle-webhooks-and-apisvc-tls", (
            Check("proxy-injector webhook has valid cert", injector_cert_valid),
            Check("proxy-injector cert is valid for at least 60 days", injector_cert_not_expiring),
            Check("proxy-injector webhook configuration trusts the cert", webhook_trusts_cert),
        )),
        Category("tulle-version", (
            Check("control plane and cli versions match", control_plane_version),
        )),
        Category("tulle-control-plane-proxy", (
            Check("the control plane runs without proxies, by design", control_plane_unmeshed),
            Check("control plane proxies are healthy", control_plane_proxies_ready, transient=True),
            Check("control plane proxies and cli versions match", control_plane_proxies_version),
        )),
    ]
    if with_proxies:
        cats.append(Category("tulle-data-plane", (
            Check("data plane proxies are ready", data_plane_ready, transient=True),
            Check("data plane proxies send heartbeats", data_plane_heartbeats, transient=True),
            Check("data plane proxies have valid certificates", data_plane_certificates, transient=True),
            Check("data plane proxies trust the installation's anchors", data_plane_anchors),
            Check("data plane and cli versions match", data_plane_version),
        )))
    return cats
