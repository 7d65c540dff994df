"""Completion of resource names — namespaces, workloads, services, Servers — from the
running local mesh or the cluster (as tulle/cli/target.py decides), for click's
`shell_complete` on the parameters that take them. bash, zsh and fish all ask through
click's completion protocol (`_TULLE_COMPLETE=<shell>_complete`).

Completion must never fail loudly or hang a shell: whatever goes wrong (no mesh, an API
that does not answer within a few seconds) gives no suggestions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from click.shell_completion import CompletionItem

from tulle.cli.target import Cluster, Local, resolve

API_TIMEOUT_S = 3


@dataclass
class Names:
    """(namespace, name) of each kind, as one mesh has them."""

    namespaces: set[str] = field(default_factory=set)
    workloads: set[tuple[str, str]] = field(default_factory=set)
    services: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # -> its ports
    servers: set[tuple[str, str]] = field(default_factory=set)
    containers: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # workload -> its containers
    owners: dict[tuple[str, str], str] = field(default_factory=dict)  # pod -> its workload, when not itself


# --- where names come from -----------------------------------------------------------------------


def local_names(state) -> Names:
    from tulle.local.state import read_record

    record = read_record(state)
    names = Names()
    if not record:
        return names
    for w in record.get("workloads") or []:
        key = (w.get("namespace", ""), w.get("name", ""))
        names.workloads.add(key)
        names.containers[key] = [key[1]] + (["tulle-proxy"] if w.get("proxy") else [])
    for s in record.get("services") or []:
        names.services[(s["namespace"], s["name"])] = [p.get("port") for p in s.get("ports") or [] if p.get("port")]
    if record.get("manifests"):
        try:
            from tulle.resources import model as m
            from tulle.resources.parse import load_dir

            for obj in load_dir(record["manifests"]):
                if isinstance(obj, m.Namespace):
                    names.namespaces.add(obj.meta.name)
                elif isinstance(obj, m.Server):
                    names.servers.add((obj.meta.namespace, obj.meta.name))
        except Exception:  # a manifest being edited: complete what the record says
            pass
    names.namespaces |= {ns for ns, _ in names.workloads} | {ns for ns, _ in names.services}
    return names


def cluster_names(cluster: Cluster, want: set[str], namespace: Optional[str]) -> Names:
    """Only the kinds in `want` are listed (each kind is one LIST call)."""
    from kubernetes import client

    names = Names()
    api = client.ApiClient(cluster.configuration())
    core = client.CoreV1Api(api)
    t = {"_request_timeout": API_TIMEOUT_S}
    if "namespaces" in want:
        names.namespaces = {n.metadata.name for n in core.list_namespace(**t).items}
    if "workloads" in want:
        pods = core.list_namespaced_pod(namespace, **t) if namespace else core.list_pod_for_all_namespaces(**t)
        for p in pods.items:
            key = (p.metadata.namespace, p.metadata.name)
            names.workloads.add(key)
            template_hash = (p.metadata.labels or {}).get("pod-template-hash")
            if template_hash and f"-{template_hash}-" in p.metadata.name:  # a Deployment's pod
                names.owners[key] = p.metadata.name.rsplit(f"-{template_hash}-", 1)[0]
            sidecars = [c.name for c in p.spec.init_containers or [] if getattr(c, "restart_policy", None) == "Always"]
            names.containers[key] = sidecars + [c.name for c in p.spec.containers or []]
    if "services" in want:
        svcs = core.list_namespaced_service(namespace, **t) if namespace else core.list_service_for_all_namespaces(**t)
        for s in svcs.items:
            names.services[(s.metadata.namespace, s.metadata.name)] = [p.port for p in s.spec.ports or []]
    if "servers" in want:
        custom = client.CustomObjectsApi(api)
        group, version, plural = "policy.tulle.dev", "v1alpha1", "servers"
        got = (custom.list_namespaced_custom_object(group, version, namespace, plural, **t) if namespace
               else custom.list_cluster_custom_object(group, version, plural, **t))
        for item in got.get("items", []):
            meta = item.get("metadata") or {}
            names.servers.add((meta.get("namespace", ""), meta.get("name", "")))
    return names


def lookup(ctx: Any, want: set[str], namespace: Optional[str] = None) -> Names:
    """The names of the mesh the command line points at; empty when it cannot be reached."""
    params = ctx.params if ctx is not None else {}
    logging.disable(logging.CRITICAL)  # nothing may reach the shell but the suggestions
    try:
        target = resolve(kubeconfig=params.get("kubeconfig"), context=params.get("context"),
                         kubernetes=bool(params.get("kubernetes")), state_dir=params.get("state_dir"))
        if isinstance(target, Local):
            return local_names(target.state)
        return cluster_names(target, want, namespace)
    except Exception:
        return Names()


def _namespace(ctx: Any, default: Optional[str] = None) -> Optional[str]:
    value = (ctx.params or {}).get("namespace") if ctx is not None else None
    return value or default


def _items(pairs: list[tuple[str, str]], incomplete: str) -> list[CompletionItem]:
    """One suggestion per value (the first help text it had), in order, matching `incomplete`."""
    seen: dict[str, str] = {}
    for value, help_ in pairs:
        if value.startswith(incomplete) and value not in seen:
            seen[value] = help_
    return [CompletionItem(v, help=h) for v, h in sorted(seen.items())]


# --- the completers ---------------------------------------------------------------------------


def complete_namespace(ctx, param, incomplete: str) -> list[CompletionItem]:
    names = lookup(ctx, {"namespaces"})
    return _items([(ns, "namespace") for ns in names.namespaces], incomplete)


def _workloads(ctx, incomplete: str, default_namespace: Optional[str]) -> list[tuple[str, str]]:
    ns = _namespace(ctx, default_namespace)
    names = lookup(ctx, {"workloads"}, ns)
    return [(name, f"workload in {wns}") for wns, name in names.workloads if ns is None or wns == ns]


def workload_completer(default_namespace: Optional[str] = None) -> Callable:
    """Workloads (pods) of -n NAMESPACE, else of `default_namespace`, else of every namespace."""
    def complete(ctx, param, incomplete: str) -> list[CompletionItem]:
        return _items(_workloads(ctx, incomplete, default_namespace), incomplete)
    return complete


def service_completer(default_namespace: Optional[str] = None) -> Callable:
    def complete(ctx, param, incomplete: str) -> list[CompletionItem]:
        ns = _namespace(ctx, default_namespace)
        names = lookup(ctx, {"services"}, ns)
        return _items([(name, f"service in {sns}") for sns, name in names.services if ns is None or sns == ns],
                      incomplete)
    return complete


def complete_server(ctx, param, incomplete: str) -> list[CompletionItem]:
    ns = _namespace(ctx)
    names = lookup(ctx, {"servers"}, ns)
    return _items([(name, f"Server in {sns}") for sns, name in names.servers if ns is None or sns == ns], incomplete)


def complete_service_address(ctx, param, incomplete: str) -> list[CompletionItem]:
    """`tulle endpoints`: SERVICE.NAMESPACE, then SERVICE.NAMESPACE:PORT once a `:` is typed."""
    names = lookup(ctx, {"services"})
    pairs = []
    for (ns, name), ports in names.services.items():
        pairs.append((f"{name}.{ns}", "service"))
        if ":" in incomplete:
            pairs += [(f"{name}.{ns}:{port}", "service port") for port in ports]
    return _items(pairs, incomplete)


def complete_route_target(ctx, param, incomplete: str) -> list[CompletionItem]:
    """`tulle routes`: a service or workload of -n (default: default), `svc/NAME`,
    `workload/NAME`, or a service of another namespace as NAME.NAMESPACE."""
    from tulle.cli.routes import SERVICE_KINDS, WORKLOAD_KINDS

    ns = _namespace(ctx, "default")
    names = lookup(ctx, {"services", "workloads"})
    kind, slash, _ = incomplete.partition("/")
    pairs = []
    services = [(sns, name) for sns, name in names.services]
    workloads = [(wns, name) for wns, name in names.workloads if wns == ns]
    if slash and kind.lower() in SERVICE_KINDS:
        pairs += [(f"{kind}/{name}", "service") for sns, name in services if sns == ns]
    elif slash and kind.lower() in WORKLOAD_KINDS:
        pairs += [(f"{kind}/{name}", "workload") for _, name in workloads]
    elif not slash:
        pairs += [(name, "service") for sns, name in services if sns == ns]
        pairs += [(name, "workload") for _, name in workloads]
        if _namespace(ctx) is None:
            pairs += [(f"{name}.{sns}", "service") for sns, name in services if sns != ns]
    return _items(pairs, incomplete)


def complete_container(ctx, param, incomplete: str) -> list[CompletionItem]:
    """`tulle logs NAME --container`: the containers of the named workload (or pods)."""
    from tulle.logs.select import name_matches

    name = (ctx.params or {}).get("name")
    if name is None and ctx.args:
        # Completing an option's value, click parses what came before resiliently and leaves
        # the positional NAME unassigned, in ctx.args.
        name = ctx.args[0]
    ns = _namespace(ctx)
    names = lookup(ctx, {"workloads"}, ns)
    pairs = [(c, f"container of {wname}") for (wns, wname), containers in names.containers.items()
             if (ns is None or wns == ns) and (name is None or name_matches(wname, name)) for c in containers]
    return _items(pairs, incomplete)


# --- `tulle stat` and `tulle edges` ---------------------------------------------------------------

STAT_TYPES = (("workload", "workloads (deploy, sts, ds …)"), ("deploy", "workloads"), ("po", "pods"),
              ("svc", "services"), ("ns", "namespaces"))


def _typed_names(ctx, kind_text: str, prefix: str) -> list[tuple[str, str]]:
    """`<prefix><name>` of each resource of the kind `kind_text` names (kubectl's names)."""
    from tulle.traffic import KIND_ALIASES

    kind = KIND_ALIASES.get(kind_text.lower())
    if kind is None:
        return []
    if kind == "namespace":
        return [(f"{prefix}{ns}", "namespace") for ns in lookup(ctx, {"namespaces"}).namespaces]
    ns = _namespace(ctx, "default")
    if kind == "service":
        names = lookup(ctx, {"services"}, ns)
        return [(f"{prefix}{name}", f"service in {sns}") for sns, name in names.services if sns == ns]
    names = lookup(ctx, {"workloads"}, ns)
    if kind == "workload":
        from tulle.traffic import owner_guess

        return [(f"{prefix}{names.owners.get((wns, name)) or owner_guess(name)}", f"workload in {wns}")
                for wns, name in names.workloads if wns == ns]
    return [(f"{prefix}{name}", f"pod in {wns}") for wns, name in names.workloads if wns == ns]


def complete_stat_resource(ctx, param, incomplete: str) -> list[CompletionItem]:
    """`tulle stat` RESOURCE, --from, --to: a type, then TYPE/NAME once a `/` is typed."""
    kind, slash, _ = incomplete.partition("/")
    if slash:
        return _items(_typed_names(ctx, kind, f"{kind}/"), incomplete)
    return _items(list(STAT_TYPES), incomplete)


def complete_stat_name(ctx, param, incomplete: str) -> list[CompletionItem]:
    """`tulle stat TYPE NAME`: the names of that type."""
    resource = (ctx.params or {}).get("resource") if ctx is not None else None
    if not resource or "/" in resource:
        return []
    return _items(_typed_names(ctx, resource, ""), incomplete)


def complete_edges_type(ctx, param, incomplete: str) -> list[CompletionItem]:
    return _items([("workload", "edges between workloads"), ("deploy", "edges between workloads"),
                   ("po", "edges between pods")], incomplete)
