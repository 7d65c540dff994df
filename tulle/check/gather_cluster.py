"""The adapter of a cluster: read what the checks look at through the official
`kubernetes` client, into `ClusterFacts` (the client's typed models).

Every read is one GET or LIST; a 404 is "absent", any other failure is kept as the
read's error so the check can say what could not be read and why.

`read_bus` then adds what the observer reads over the cluster's NATS (tulle-nats, the
proxies' heartbeats): async, with the `connect` the caller passes (the CLI's `connect_bus`,
through a port-forward), so a caller with a loop of its own (the dashboard) can await it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

from tulle import __version__
from tulle import installation as names
from tulle.check.cluster import Access, ClusterFacts, Read, pre_access, proxy_container
from tulle.check.proxies import DEFAULT_LIFETIME_S

REQUEST_TIMEOUT_S = 10


def _describe(e: BaseException) -> str:
    status = getattr(e, "status", None)
    if status:
        reason = getattr(e, "reason", "") or ""
        return f"HTTP {status} {reason}".strip()
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    # urllib3 says "HTTPConnectionPool(host=..., port=...): Max retries exceeded ... (Caused by NewConnectionError(...: [Errno 111] Connection refused))"
    m = re.search(r"\[Errno -?\d+\] ([^')]+)", str(e))
    return m.group(1) if m else text


def _read(fn: Callable[..., Any], *args, **kwargs) -> Read:
    from kubernetes.client import ApiException

    try:
        return Read(fn(*args, _request_timeout=REQUEST_TIMEOUT_S, **kwargs))
    except ApiException as e:
        if e.status == 404:
            return Read()
        return Read(error=_describe(e))
    except Exception as e:  # the connection went away mid-way: a read error, not a crash
        return Read(error=_describe(e))


def gather(configuration: Optional[Any], *, namespace: str, pre: bool, with_proxies: bool,
           client_error: str = "") -> ClusterFacts:
    """`configuration`: a kubernetes.client.Configuration, or None with `client_error`
    saying why there is none."""
    facts = ClusterFacts(namespace=namespace, pre=pre, with_proxies=with_proxies, cli_version=__version__)
    if configuration is None:
        facts.client_error = client_error or "no Kubernetes configuration"
        return facts
    from kubernetes import client

    with client.ApiClient(configuration) as api:
        try:
            code = client.VersionApi(api).get_code(_request_timeout=REQUEST_TIMEOUT_S)
        except Exception as e:
            facts.api_error = _describe(e)
            return facts
        facts.server_version = _version(code)
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        ext = client.ApiextensionsV1Api(api)
        facts.control_namespace = _read(core.read_namespace, namespace)
        for name in names.CRDS:
            facts.crds[name] = _read(ext.read_custom_resource_definition, name)
        if pre:
            authz = client.AuthorizationV1Api(api)
            for _, accesses, _ in pre_access(namespace):
                for a in accesses:
                    facts.access[a] = _access(authz, a)
            return facts
        if not facts.control_namespace.found:
            return facts
        for name in names.DEPLOYMENTS:
            facts.deployments[name] = _read(apps.read_namespaced_deployment, name, namespace)
        facts.nats = _read(apps.read_namespaced_stateful_set, names.NATS_STATEFULSET, namespace)
        pods = _read(core.list_namespaced_pod, namespace)
        facts.pods = Read(pods.value.items if pods.found else None, pods.error)
        facts.trust_roots = _read(core.read_namespaced_config_map, names.TRUST_ROOTS_CONFIGMAP, namespace)
        facts.issuer = _read(core.read_namespaced_secret, names.ISSUER_SECRET, namespace)
        facts.injector_tls = _read(core.read_namespaced_secret, names.INJECTOR_TLS_SECRET, namespace)
        facts.webhook = _read(client.AdmissionregistrationV1Api(api).read_mutating_webhook_configuration,
                              names.INJECTOR_WEBHOOK)
        if with_proxies:
            every = _read(core.list_pod_for_all_namespaces)
            meshed = [p for p in every.value.items if proxy_container(p) is not None] if every.found else None
            facts.data_plane = Read(meshed, every.error)
        facts.cert_lifetime_s = _cert_lifetime(facts.deployments.get("tulle-identity", Read()))
    return facts


# The bus through a port-forward: the API, TLS and a login go first (a busy machine may be slow).
BUS_CONNECT_TIMEOUT_S = 10.0


async def read_bus(facts: ClusterFacts, target, connect) -> ClusterFacts:
    """Fill `facts.bus` from the cluster's NATS, read as the observer. `target`: what `connect`
    reaches the bus with (a tulle.cli.common.BusTarget naming the cluster). Not read when the
    API or the control plane is not there (said by the checks before)."""
    from tulle.check.gather_nats import read_bus as read

    if facts.pre or facts.client_error or facts.api_error or not facts.control_namespace.found:
        return facts
    sts = facts.nats.value
    servers = (sts.spec.replicas if sts.spec.replicas is not None else 1) if sts is not None else 0
    facts.bus = await read(target, connect, meshed=True, with_proxies=facts.with_proxies, servers=servers,
                           connect_timeout=BUS_CONNECT_TIMEOUT_S)
    return facts


def _cert_lifetime(identity: Read) -> float:
    """The identity service's --lifetime (the chart passes identity.issuer.issuanceLifetime)."""
    from tulle.durations import parse_ms

    if not identity.found:
        return DEFAULT_LIFETIME_S
    for c in identity.value.spec.template.spec.containers or []:
        args = list(c.args or [])
        for i, arg in enumerate(args):
            value = arg.split("=", 1)[1] if arg.startswith("--lifetime=") else \
                (args[i + 1] if arg == "--lifetime" and i + 1 < len(args) else None)
            if value:
                try:
                    return parse_ms(value) / 1000 or DEFAULT_LIFETIME_S
                except ValueError:
                    return DEFAULT_LIFETIME_S
    return DEFAULT_LIFETIME_S


def _version(code: Any) -> Optional[tuple[int, int, str]]:
    """major, minor ("1", "30+" on some providers) and the full text."""
    try:
        major = int(re.match(r"\d+", code.major or "").group())
        minor = int(re.match(r"\d+", code.minor or "").group())
    except (AttributeError, ValueError):
        return None
    return major, minor, code.git_version or f"v{major}.{minor}"


def _access(authz: Any, a: Access) -> tuple[bool, str]:
    from kubernetes import client

    review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
        resource_attributes=client.V1ResourceAttributes(verb=a.verb, resource=a.resource, group=a.group,
                                                        namespace=a.namespace)))
    try:
        got = authz.create_self_subject_access_review(review, _request_timeout=REQUEST_TIMEOUT_S)
    except Exception as e:
        return False, f"the access review failed: {_describe(e)}"
    return bool(got.status.allowed), "" if got.status.allowed else (got.status.reason or "")
