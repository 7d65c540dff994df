"""Who may do what on the bus: the roles, their NATS permissions, and the nats-server
configuration that enforces them — the one place that decides it, for local mode, the
tests and the Helm chart alike. Pure: no I/O beyond the small key-file helpers at the end.

The model (DESIGN.md, "The bus is a trust boundary"):
- No anonymous connection. One NATS account, MESH, holds the KV buckets and the event
  stream; every client is a user of it.
- Control-plane roles (destination, policy, identity, injector) and the observer (the CLI
  and external tools) are static nkey users: the server knows only their public keys; each
  process holds its own seed file.
- A proxy has no static credential. It presents its workload's token (a projected
  service-account token in Kubernetes, the local token in local mode); nats-server hands
  the token to the identity service through NATS auth callout, identity verifies it
  (TokenReview / HMAC) and answers with permissions for that one workload: it can write its
  own heartbeat key and nothing else. A stolen proxy token is worth one proxy.
- Each user gets its own inbox prefix, so no client can read replies meant for another.

Chosen over one credential shared by all proxies because a shared secret would let any
compromised pod write every proxy's heartbeat and impersonate any workload on the bus;
per-workload scoping costs one signed reply from identity per (re)connection.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional

from tulle import schemas

MESH_ACCOUNT = "MESH"
# The auth callout runs in an account of its own: only the callout responder is in it, so
# no mesh client can even see the subject that carries proxies' tokens, and the server's
# per-login bookkeeping stays out of the mesh account.
AUTH_ACCOUNT = "AUTH"
CALLOUT_ROLE = "callout"
SYSTEM_ACCOUNT = "SYS"
CALLOUT_SUBJECT = "$SYS.REQ.USER.AUTH"
CALLOUT_QUEUE = "identity"
STATIC_ROLES = ("destination", "policy", "identity", "injector", "observer")
ROLE_EVENT_KINDS = {"destination": "destination", "policy": "policy", "identity": "identity",
                    "injector": "injector"}
# Buckets every control-plane service may create when missing: the stores no single writer
# owns (heartbeats, leases) and the event stream, so any service can start first.
SHARED_BUCKETS = (schemas.PROXIES_BUCKET, schemas.LEASES_BUCKET)
# Requests the observer may make of proxies (scatter-gather reads such as `tulle routes`).
PROXY_QUERY_SUBJECTS = "tulle.proxy.v1.>"
# A workload proxy holds a handful of subscriptions (its watches, its inbox, the stats
# subject); the cap keeps a compromised proxy from exhausting the server.
PROXY_MAX_SUBSCRIPTIONS = 1000


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    # Allowed to answer the requests it receives (publish once to their reply subject).
    allow_responses: bool = False

    def __add__(self, other: "Permissions") -> "Permissions":
        return Permissions(_merge(self.publish, other.publish), _merge(self.subscribe, other.subscribe),
                           self.allow_responses or other.allow_responses)


def _merge(a: Iterable[str], b: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*a, *b]))


# --- building blocks -----------------------------------------------------------------------


def _stream_read(stream: str) -> Permissions:
    """Read a JetStream stream: info, message get, ordered (ephemeral) consumers and their
    flow control. The consumer-create body carries the filter, so a reader can read the
    whole stream: reading is not where the boundary is."""
    api = "$JS.API"
    return Permissions(publish=(
        f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.*", f"{api}.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ))


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def kv_read(bucket: str) -> Permissions:
    return _stream_read(kv_stream(bucket))


def kv_write(bucket: str, keys: Iterable[str] = (">",)) -> Permissions:
    """Put and delete the given keys (a KV delete is a put with a marker header)."""
    return Permissions(publish=tuple(f"$KV.{bucket}.{k}" for k in keys))


def stream_create(stream: str) -> Permissions:
    return Permissions(publish=(f"$JS.API.STREAM.CREATE.{stream}",))


def events_publish(kind: str) -> Permissions:
    return Permissions(publish=(f"{schemas.EVENTS_PREFIX}.{kind}.>",))


def events_read() -> Permissions:
    # STREAM.NAMES: a client subscribing by subject (nats-py's js.subscribe without stream=)
    # first asks which stream holds it. Listing names and the account's JetStream info reads.
    return (_stream_read(schemas.EVENTS_STREAM) + Permissions(subscribe=(f"{schemas.EVENTS_PREFIX}.>",))
            + Permissions(publish=("$JS.API.STREAM.NAMES", "$JS.API.STREAM.LIST", "$JS.API.INFO")))


def inbox(prefix: str) -> Permissions:
    return Permissions(subscribe=(f"{prefix}.>",))


def _shared_stores() -> Permissions:
    p = stream_create(schemas.EVENTS_STREAM) + Permissions(publish=(f"$JS.API.STREAM.INFO.{schemas.EVENTS_STREAM}",))
    for bucket in SHARED_BUCKETS:
        p = p + stream_create(kv_stream(bucket)) + Permissions(publish=(f"$JS.API.STREAM.INFO.{kv_stream(bucket)}",))
    return p


def _owned(bucket: str) -> Permissions:
    """A bucket its role writes: read, write every key, create it when missing."""
    return kv_read(bucket) + kv_write(bucket) + stream_create(kv_stream(bucket))


def _lease(name: str) -> Permissions:
    return kv_read(schemas.LEASES_BUCKET) + kv_write(schemas.LEASES_BUCKET, (name,))


# --- inbox prefixes ----------------------------------------------------------------------


def inbox_for_user(public_key: str) -> str:
    """A static user's inbox prefix, derived from its public key (both ends compute it)."""
    return f"_INBOX.u{public_key[1:17].lower()}"


def inbox_for_workload(namespace: str, workload: str) -> str:
    """A workload proxy's inbox prefix. Hashed: pod names may hold dots, which would make
    one workload's prefix a subject prefix of another's."""
    digest = hashlib.sha256(f"{namespace}/{workload}".encode()).hexdigest()[:20]
    return f"_INBOX.w{digest}"


# --- the roles ------------------------------------------------------------------------------


def role_permissions(role: str, public_key: str) -> Permissions:
    """What a static role may do. Unknown roles get nothing (a KeyError, loudly)."""
    own_inbox = inbox(inbox_for_user(public_key))
    if role == "destination":
        return (own_inbox + _owned(schemas.ENDPOINTS_BUCKET) + _owned(schemas.PROFILES_BUCKET)
                + _lease("destination") + events_publish("destination") + _shared_stores())
    if role == "policy":
        return (own_inbox + _owned(schemas.POLICY_BUCKET) + _lease("policy") + events_publish("policy")
                + _shared_stores())
    if role == "identity":
        return (own_inbox + _owned(schemas.IDENTITY_BUCKET) + events_publish("identity") + _shared_stores()
                + Permissions(subscribe=(schemas.CERTIFY_SUBJECT,), allow_responses=True))
    if role == CALLOUT_ROLE:  # identity's second connection, in the AUTH account
        return own_inbox + Permissions(subscribe=(CALLOUT_SUBJECT,), allow_responses=True)
    if role == "injector":
        return own_inbox + events_publish("injector") + _shared_stores()
    if role == "observer":
        # Any inbox: external tools (the nats CLI, a nats-py script) use the default `_INBOX.`
        # prefix. Replies in this account carry nothing an observer could not read anyway
        # (public certificates, KV values, proxy statistics); tokens travel only on the
        # certify subject, which only identity may read.
        p = (own_inbox + inbox("_INBOX") + events_read() + Permissions(publish=(PROXY_QUERY_SUBJECTS,)))
        for bucket in (schemas.ENDPOINTS_BUCKET, schemas.PROFILES_BUCKET, schemas.POLICY_BUCKET,
                       schemas.IDENTITY_BUCKET, schemas.PROXIES_BUCKET, schemas.LEASES_BUCKET):
            p = p + kv_read(bucket)
        return p
    raise KeyError(f"unknown bus role {role!r}")


def proxy_permissions(namespace: str, workload: str) -> Permissions:
    """What one workload's proxy may do: read discovery, profiles and policy; write its own
    heartbeat; ask for its certificate; publish proxy events; answer the CLI's queries."""
    return (inbox(inbox_for_workload(namespace, workload))
            + kv_read(schemas.ENDPOINTS_BUCKET) + kv_read(schemas.PROFILES_BUCKET) + kv_read(schemas.POLICY_BUCKET)
            + Permissions(publish=(f"$JS.API.STREAM.INFO.{kv_stream(schemas.PROXIES_BUCKET)}",))
            + kv_write(schemas.PROXIES_BUCKET, (schemas.proxy_key(namespace, workload),))
            + events_publish("proxy")
            + Permissions(publish=(schemas.CERTIFY_SUBJECT,), subscribe=(PROXY_QUERY_SUBJECTS,),
                          allow_responses=True))


# --- the server configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    cert_file: str
    key_file: str
    # Client TLS: given to clients (the server asks them for no certificate). Route TLS:
    # what each node verifies its peers' certificates with.
    ca_file: str = ""


@dataclass(frozen=True)
class ClusterSpec:
    """A JetStream cluster: this node's route listener, every node's route URL, and how
    the nodes prove themselves to each other.

    Routes are authenticated as clients are: a server that could join the cluster would see
    every message of every account, around the bus's authorization. As in the Helm chart,
    each route presents the nodes' certificate and verifies its peer's (mutual TLS): a
    route from anything without a certificate of `route_tls.ca_file` is refused.
    """

    name: str
    listen: str  # host:port of this node's route listener
    routes: tuple[str, ...]  # nats-route://host:port of every node (this one may be included)
    route_tls: TLSFiles  # the nodes' certificate (serverAuth and clientAuth) and its CA


@dataclass(frozen=True)
class BusPublicKeys:
    """The public half of the installation's bus credentials: all the server needs."""

    users: Mapping[str, str]  # role -> user public key (U...), the static roles and `callout`
    callout_issuer: str  # account public key (A...) that signs callout answers


@dataclass(frozen=True)
class ServerOptions:
    listen: str  # host:port
    store_dir: str
    server_name: str
    tls: Optional[TLSFiles] = None
    cluster: Optional[ClusterSpec] = None
    # host:port of the monitoring server (`/healthz` says when JetStream is current); "" none.
    # It shows no message contents or credentials.
    http_listen: str = ""
    max_memory_store: str = "256MB"
    max_file_store: str = "2GB"
    # Seconds a connecting client has to authenticate, callout round trip included
    # (a TokenReview can take a while).
    auth_timeout_s: float = 5.0
    extra: tuple[str, ...] = field(default_factory=tuple)
    # More static users beyond the roles (an operator's monitoring user; the tests' bus
    # mechanics user): name -> (public key, permissions).
    extra_users: Mapping[str, tuple[str, Permissions]] = field(default_factory=dict)


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(items: Iterable[str]) -> str:
    return "[" + ", ".join(_q(i) for i in items) + "]"


def _permissions_block(p: Permissions) -> str:
    parts = [f"publish: {{ allow: {_list(p.publish)} }}", f"subscribe: {{ allow: {_list(p.subscribe)} }}"]
    if p.allow_responses:
        parts.append("allow_responses: { max: 1, expires: \"10s\" }")
    return "{ " + ", ".join(parts) + " }"


def authorization_config(keys: BusPublicKeys,
                         extra_users: Mapping[str, tuple[str, Permissions]] | None = None,
                         auth_timeout_s: float = 5.0) -> str:
    """The accounts and authorization blocks: users per role, the auth callout for proxies."""
    missing = [r for r in (*STATIC_ROLES, CALLOUT_ROLE) if r not in keys.users]
    if missing:
        raise ValueError(f"bus keys missing for roles: {', '.join(missing)}")
    entries = [(role, keys.users[role], role_permissions(role, keys.users[role])) for role in STATIC_ROLES]
    entries += [(name, pub, perms) for name, (pub, perms) in (extra_users or {}).items()]
    callout = (CALLOUT_ROLE, keys.users[CALLOUT_ROLE], role_permissions(CALLOUT_ROLE, keys.users[CALLOUT_ROLE]))
    auth_users = [pub for _, pub, _ in entries] + [callout[1]]
    return (
        "accounts {\n"
        f"  {MESH_ACCOUNT} {{\n"
        "    jetstream: enabled\n"
        "    users: [\n" + ",\n".join(_user_entry(*e) for e in entries) + "\n    ]\n"
        "  }\n"
        f"  {AUTH_ACCOUNT} {{\n"
        "    users: [\n" + _user_entry(*callout) + "\n    ]\n"
        "  }\n"
        f"  {SYSTEM_ACCOUNT} {{ }}\n"
        "}\n"
        f"system_account: {SYSTEM_ACCOUNT}\n"
        "authorization {\n"
        "  # Proxies wait on the callout round trip (a TokenReview can take a while).\n"
        f"  timeout: {auth_timeout_s:g}\n"
        "  # Every client that is not one of the static users above is a workload proxy: its\n"
        "  # token goes to the identity service, which answers with that workload's permissions\n"
        f"  # in the {MESH_ACCOUNT} account.\n"
        "  auth_callout {\n"
        f"    issuer: {_q(keys.callout_issuer)}\n"
        f"    account: {AUTH_ACCOUNT}\n"
        f"    auth_users: {_list(auth_users)}\n"
        "  }\n"
        "}\n"
    )


def _user_entry(name: str, pub: str, perms: Permissions) -> str:
    return f"      # {name}\n      {{ nkey: {_q(pub)}, permissions: {_permissions_block(perms)} }}"


def server_config(keys: BusPublicKeys, opts: ServerOptions) -> str:
    lines = [
        f"listen: {_q(opts.listen)}",
        f"server_name: {_q(opts.server_name)}",
        "max_payload: 1MB",
        "jetstream {",
        f"  store_dir: {_q(opts.store_dir)}",
        f"  max_memory_store: {opts.max_memory_store}",
        f"  max_file_store: {opts.max_file_store}",
        # Every KV watch is a consumer; nats-server 2.15 caps a stream at 1,000 of them by
        # default, which 1,000 proxy watches of tulle-endpoints reach. -1: no cap, as before 2.15.
        "  limits { default_max_consumers: -1 }",
        "}",
    ]
    if opts.tls is not None:
        lines += ["tls {", f"  cert_file: {_q(opts.tls.cert_file)}", f"  key_file: {_q(opts.tls.key_file)}",
                  "  timeout: 5", "}"]
    if opts.http_listen:
        lines.append(f"http: {_q(opts.http_listen)}")
    if opts.cluster is not None:
        c = opts.cluster
        if not c.route_tls.ca_file:
            raise ValueError("cluster routes need the CA their certificates are verified with")
        lines += ["cluster {", f"  name: {_q(c.name)}", f"  listen: {_q(c.listen)}", f"  routes: {_list(c.routes)}",
                  "  tls {", f"    cert_file: {_q(c.route_tls.cert_file)}", f"    key_file: {_q(c.route_tls.key_file)}",
                  f"    ca_file: {_q(c.route_tls.ca_file)}", "    verify: true", "    timeout: 5", "  }", "}"]
    lines += list(opts.extra)
    auth = authorization_config(keys, opts.extra_users, opts.auth_timeout_s)
    return "\n".join(line for line in lines if line) + "\n" + auth


# --- key files (local mode and tests; Kubernetes keeps them in Secrets) ------------------------------


def role_seed_file(directory: Path, role: str) -> Path:
    return directory / f"{role}.nk"


def callout_issuer_seed_file(directory: Path) -> Path:
    return directory / "callout-issuer.nk"


def ensure_keys(directory: Path) -> BusPublicKeys:
    """Make (once) an nkey seed per static role and the callout issuer's account seed in
    `directory` (each file 0600), and return their public keys."""
    from tulle import natsjwt

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    users = {}
    for role in (*STATIC_ROLES, CALLOUT_ROLE):
        users[role] = natsjwt.ensure_seed(role_seed_file(directory, role), "user")
    issuer = natsjwt.ensure_seed(callout_issuer_seed_file(directory), "account")
    return BusPublicKeys(users=users, callout_issuer=issuer)


# --- the Helm chart's copy -----------------------------------------------------------------------


HELM_VALUE_KEYS = {**{role: f"{role}PublicKey" for role in (*STATIC_ROLES, CALLOUT_ROLE)}}
HELM_ISSUER_KEY = "calloutIssuerPublicKey"


def _helm_required(key: str, what: str) -> str:
    # Checked before any use: `substr` on an empty key would fail with a sprig error that
    # names neither the value nor what makes it.
    return (f'{{{{- $_ := required "nats.auth.{key} is required: {what} (tulle install generates it)" '
            f".Values.nats.auth.{key} -}}}}\n")


def helm_template() -> str:
    """The chart's `tulle.natsAuth` template: `authorization_config` itself, with each public
    key (and the inbox prefix derived from it) read from `.Values.nats.auth.<role>PublicKey`
    and the callout issuer's from `.Values.nats.auth.calloutIssuerPublicKey`; a missing key
    fails the render naming it. deploy/charts/tulle-control-plane/templates/_nats-auth.tpl
    is this output; a test keeps it so, and another renders the chart and compares with
    authorization_config."""
    def placeholder(prefix: str, role: str) -> str:
        return (prefix + role.upper().replace("-", "")).ljust(56, "Z")

    users = {role: placeholder("U", role) for role in HELM_VALUE_KEYS}
    text = authorization_config(BusPublicKeys(users=users, callout_issuer=placeholder("A", "issuer")))
    for role, pub in users.items():
        value = f".Values.nats.auth.{HELM_VALUE_KEYS[role]}"
        text = text.replace(inbox_for_user(pub), f"_INBOX.u{{{{ substr 1 17 {value} | lower }}}}")
        text = text.replace(pub, f"{{{{ {value} }}}}")
    text = text.replace(placeholder("A", "issuer"), f"{{{{ .Values.nats.auth.{HELM_ISSUER_KEY} }}}}")
    checks = "".join(_helm_required(key, f"the public key of the {role} role's nkey seed")
                     for role, key in HELM_VALUE_KEYS.items())
    checks += _helm_required(HELM_ISSUER_KEY, "the public key of the auth-callout issuer's account seed")
    return ("{{- /*\n"
            "GENERATED by tulle/busauth.py (helm_template): the bus's accounts, users per role with their\n"
            "permissions, and the auth callout — the same text local mode and the tests run. Do not edit;\n"
            "regenerate with `python -m tulle.busauth --helm-template > <this file>`.\n"
            "*/ -}}\n"
            "{{- define \"tulle.natsAuth\" -}}\n" + checks + text + "{{- end }}\n")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--helm-template"]:
        sys.exit("usage: python -m tulle.busauth --helm-template")
    sys.stdout.write(helm_template())
