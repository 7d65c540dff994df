"""What the commands that read the bus share: where NATS is, and the credential to read it with.

Every such command takes `--nats URL` and `--nats-creds FILE`, and — for a cluster —
`--kubeconfig FILE`, `--context NAME`, `--kubernetes` and `-L/--tulle-namespace NS`.

Where: --nats, else (without the cluster flags) TULLE_NATS_URL, else the mesh
tulle/cli/target.py picks (as `tulle check` and `tulle logs` do): the running `tulle up`,
else the cluster of the kubeconfig, else nats://127.0.0.1:4222.

In a cluster the bus is reached as linkerd's CLI reaches its control plane: a port-forward
through the API server to a `tulle-nats-*` pod of the control-plane namespace
(tulle/cli/portforward.py), with the observer credential read from the Secret
`tulle-nats-credentials` and NATS's CA from `tulle-nats-tls` — both kept in memory.

The credential: --nats-creds, else TULLE_NATS_CREDS, else the running `tulle up`'s (or the
cluster's) observer credential, which reads KV and events and writes nothing. NATS
accepts no anonymous client, so a command with no credential fails with one line saying
how to give one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import click

from tulle import installation as names
from tulle.errors import UserError

if TYPE_CHECKING:
    from tulle.cli.portforward import PortForward
    from tulle.cli.target import Cluster

NATS_HELP = ("NATS URL(s), comma-separated (default: TULLE_NATS_URL, else the running `tulle up`, else the "
             "cluster of the kubeconfig through a port-forward, else nats://127.0.0.1:4222)")
CREDS_HELP = ("NATS credential: an nkey seed file (default: TULLE_NATS_CREDS, else the running `tulle up`'s "
              "observer credential, or the cluster's)")


@dataclass(frozen=True)
class BusTarget:
    """Where a command reads the bus: a URL, or (`cluster` set) a cluster's NATS."""

    url: str
    creds_file: str = ""
    ca_file: str = ""
    cluster: Optional["Cluster"] = None
    namespace: str = names.CONTROL_PLANE_NAMESPACE  # a cluster's control plane

    def credentials(self):
        from tulle.bus import BusCredentials

        return BusCredentials.for_seed(self.creds_file, ca_file=self.ca_file)

    def __str__(self) -> str:
        if self.cluster is not None:
            return f"the NATS of namespace {self.namespace} ({self.cluster.describe()})"
        return self.url


def resolve_target(url: Optional[str], creds: Optional[str], env: Optional[dict] = None, *,
                   kubeconfig: Optional[str] = None, context: Optional[str] = None, kubernetes: bool = False,
                   namespace: Optional[str] = None) -> BusTarget:
    from tulle.bus import DEFAULT_URL
    from tulle.cli.target import Cluster, resolve
    from tulle.local.discover import local_bus

    env = os.environ if env is None else env
    explicit_cluster = bool(kubeconfig or context or kubernetes)
    if url and explicit_cluster:
        raise UserError("--nats and --kubeconfig/--context/--kubernetes name two buses: give one")
    ca = env.get("TULLE_NATS_CA", "")
    creds = creds or env.get("TULLE_NATS_CREDS", "")
    url = url or ("" if explicit_cluster else env.get("TULLE_NATS_URL", ""))
    if not url:
        where = resolve(kubeconfig=kubeconfig, context=context, kubernetes=kubernetes)
        if isinstance(where, Cluster):
            return BusTarget("", creds, ca, cluster=where, namespace=namespace or names.CONTROL_PLANE_NAMESPACE)
    local = local_bus()
    url = url or (local.url if local else "") or DEFAULT_URL
    if not creds and local is not None and local.url == url:
        creds, ca = local.observer_creds, ca or local.ca
    return BusTarget(url, creds, ca)


def nats_option(name: str = "url"):
    """`--nats URL`, `--nats-creds FILE` and the cluster flags, handed to the command as a
    BusTarget named `name`."""
    def decorate(f):
        @click.option("--nats-creds", "_nats_creds", default=None, metavar="FILE", help=CREDS_HELP)
        @click.option("--nats", "_nats_url", default=None, metavar="URL", help=NATS_HELP)
        @click.option("--kubeconfig", "_kubeconfig", type=click.Path(dir_okay=False), default=None,
                      help="a cluster: the kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")
        @click.option("--context", "_context", default=None, help="a cluster: the kubeconfig context to use")
        @click.option("--kubernetes", "_kubernetes", is_flag=True,
                      help="read the bus of the cluster of the current kubeconfig context even when a local mesh runs")
        @click.option("-L", "--tulle-namespace", "_tulle_namespace", default=None, metavar="NS",
                      help=f"a cluster: the control plane's namespace (default: {names.CONTROL_PLANE_NAMESPACE})")
        @functools.wraps(f)
        def wrapper(*args, _nats_url=None, _nats_creds=None, _kubeconfig=None, _context=None, _kubernetes=False,
                    _tulle_namespace=None, **kwargs):
            kwargs[name] = resolve_target(_nats_url, _nats_creds, kubeconfig=_kubeconfig, context=_context,
                                          kubernetes=_kubernetes, namespace=_tulle_namespace)
            return f(*args, **kwargs)
        return wrapper
    return decorate


CONNECT_TIMEOUT_S = 5.0


async def connect_bus(target: "BusTarget | str", *, what: str = "", timeout: float = CONNECT_TIMEOUT_S):
    """A started Bus for a CLI command — every command reaches the bus through here — or a
    UserError saying in one line why not (no credential, a refused one, NATS unreachable).
    The caller closes it (or uses `cli_bus`)."""
    from tulle.bus import Bus
    from tulle.log import setup_logging

    # The command's own output and its one-line errors are what a person reads: the bus
    # client's retries and refusals stay out of it (TULLE_LOG_LEVEL=info shows them).
    setup_logging("cli", level=os.environ.get("TULLE_LOG_LEVEL", "error"))
    # asyncio warns when nats-server ends a TLS connection the client is closing ("returning
    # true from eof_received() has no effect when using ssl"): nothing a person can act on.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    if isinstance(target, str):
        target = resolve_target(target, None)
    what = f"{what}: " if what else ""
    if target.cluster is not None:
        return await _connect_cluster(target, what, timeout)
    if not target.creds_file:
        raise UserError(f"{what}no credential for NATS at {target.url}: pass --nats-creds FILE or set "
                        f"TULLE_NATS_CREDS (a running `tulle up` provides its observer credential by itself)")
    bus = Bus(target.url, component="cli", credentials=target.credentials())
    try:
        await asyncio.wait_for(bus.start(), timeout)
    except asyncio.TimeoutError:
        await bus.close()
        if bus.auth_error:
            raise UserError(f"{what}NATS at {target.url} refused the credential {target.creds_file}: "
                            f"{bus.auth_error}") from None
        raise UserError(f"{what}cannot reach NATS at {target.url} (is `tulle up` running? or pass --nats URL, "
                        f"or --kubeconfig/--context for a cluster)") from None
    return bus


async def _connect_cluster(target: BusTarget, what: str, timeout: float):
    from tulle.bus import Bus

    loop = asyncio.get_running_loop()
    stream_failed = asyncio.Event()  # the kubelet could not reach the pod's port: no point waiting
    forward, credentials, creds_from = await asyncio.to_thread(
        open_cluster_bus, target, what, lambda why: loop.call_soon_threadsafe(stream_failed.set))
    bus = Bus(f"tls://127.0.0.1:{forward.port}", component="cli", credentials=credentials)
    bus.on_close(forward.close)
    started = asyncio.ensure_future(bus.start())
    failed = asyncio.ensure_future(stream_failed.wait())
    await asyncio.wait([started, failed], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    failed.cancel()
    if not started.done() or started.exception() is not None:
        # Closing ends the connect loop at its next turn (nats-py may swallow a cancel mid-connect).
        await bus.close()
        await asyncio.wait([started], timeout=2)
        started.cancel()
        if bus.auth_error:
            raise UserError(f"{what}NATS in namespace {target.namespace} refused {creds_from}: {bus.auth_error}") from None
        why = f": {forward.last_error}" if forward.last_error else ""
        raise UserError(f"{what}cannot reach NATS through a port-forward to {forward}{why}") from None
    return bus


def open_cluster_bus(target: BusTarget, what: str = "",
                     on_error: Optional[Callable[[str], None]] = None) -> tuple["PortForward", object, str]:
    """(an open port-forward to a NATS pod, the credentials to log in with, where they come
    from) for a cluster target; UserError (one line) when the cluster says no. Blocking.
    `on_error` hears (from a thread) when a stream through the forward fails."""
    from kubernetes import client

    from tulle.bus import BusCredentials
    from tulle.cli.portforward import PortForward, PortForwardError

    cluster, ns = target.cluster, target.namespace
    api = client.ApiClient(cluster.configuration())
    core = client.CoreV1Api(api)
    seed = "" if target.creds_file else \
        _secret_value(core, ns, names.NATS_CREDENTIALS_SECRET, names.NATS_OBSERVER_KEY, what, cluster)
    if target.ca_file:
        try:
            ca_pem = open(target.ca_file).read()
        except OSError as e:
            raise UserError(f"{what}TULLE_NATS_CA {target.ca_file}: {e.strerror}") from None
    else:
        ca_pem = _secret_value(core, ns, names.NATS_TLS_SECRET, names.NATS_CA_KEY, what, cluster)
    tls_name = names.nats_tls_name(ns)
    if target.creds_file:
        credentials = dataclasses.replace(target.credentials(), ca_file="", ca_pem=ca_pem, tls_hostname=tls_name)
        creds_from = f"the credential {target.creds_file}"
    else:
        credentials = BusCredentials.for_seed_text(
            seed, ca_pem=ca_pem, tls_hostname=tls_name,
            what=f"{what}Secret {ns}/{names.NATS_CREDENTIALS_SECRET} key {names.NATS_OBSERVER_KEY}")
        creds_from = f"the observer credential of Secret {ns}/{names.NATS_CREDENTIALS_SECRET}"
    pod = _nats_pod(core, ns, what, cluster)
    try:
        forward = PortForward(core, ns, pod, names.NATS_CLIENT_PORT, on_error=on_error).open()
    except PortForwardError as e:
        raise UserError(f"{what}{e}") from None
    return forward, credentials, creds_from


REQUEST_TIMEOUT_S = 10


def _api_failure(e: Exception, what: str, doing: str, cluster: "Cluster") -> UserError:
    from tulle.check.gather_cluster import _describe

    if getattr(e, "status", None):
        return UserError(f"{what}cannot {doing}: {_describe(e)}")
    return UserError(f"{what}cannot reach the Kubernetes API of {cluster.describe()}: {_describe(e)}")


def _secret_value(core, ns: str, name: str, key: str, what: str, cluster: "Cluster") -> str:
    import base64

    from kubernetes.client import ApiException

    try:
        secret = core.read_namespaced_secret(name, ns, _request_timeout=REQUEST_TIMEOUT_S)
    except ApiException as e:
        if e.status == 404:
            raise UserError(f"{what}no Secret {ns}/{name}: is Tulle installed in namespace {ns}? "
                            f"(-L names another; `tulle check` says more)") from None
        raise _api_failure(e, what, f"read Secret {ns}/{name}", cluster) from None
    except Exception as e:
        raise _api_failure(e, what, f"read Secret {ns}/{name}", cluster) from None
    value = (secret.data or {}).get(key)
    if not value:
        raise UserError(f"{what}Secret {ns}/{name} has no key {key!r}")
    try:
        return base64.b64decode(value).decode()
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{what}Secret {ns}/{name} key {key!r} is not base64 text") from None


def _nats_pod(core, ns: str, what: str, cluster: "Cluster") -> str:
    """A running, ready NATS pod of the control plane (the first by name: any will do, they
    are one cluster)."""
    selector = f"{names.COMPONENT_LABEL}=nats"
    try:
        pods = core.list_namespaced_pod(ns, label_selector=selector, _request_timeout=REQUEST_TIMEOUT_S).items
    except Exception as e:
        raise _api_failure(e, what, f"list the pods of namespace {ns}", cluster) from None

    def ready(pod) -> bool:
        conditions = (pod.status.conditions if pod.status else None) or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    running = sorted((p for p in pods if p.status and p.status.phase == "Running" and not p.metadata.deletion_timestamp),
                     key=lambda p: (not ready(p), p.metadata.name))
    if not running:
        raise UserError(f"{what}no running NATS pod ({names.NATS_SERVICE}-*) in namespace {ns}: "
                        f"`tulle check` says why")
    return running[0].metadata.name


@contextlib.asynccontextmanager
async def cli_bus(target: "BusTarget | str", *, what: str = "", timeout: float = CONNECT_TIMEOUT_S):
    """`async with cli_bus(url, what="routes") as bus:` — connect_bus, closed on the way out."""
    bus = await connect_bus(target, what=what, timeout=timeout)
    try:
        yield bus
    finally:
        await bus.close()
