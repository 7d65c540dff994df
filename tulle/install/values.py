"""The values `tulle install` / `upgrade` render the control plane with: the user's
(-f, --set, --ha, --cni), then the secrets the chart requires, taken from the user's
values first, else from the cluster (upgrade), else generated (install).

Pure apart from generating keys: `complete()` says what it generated in `Completed`, and
the CLI decides what to tell the user and where to save it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tulle import pki
from tulle.errors import UserError
from tulle.install import credentials, material
from tulle.install.credentials import BusCredentials
from tulle.install.material import ServerTLS, TrustMaterial


@dataclass
class Existing:
    """What an installed control plane already has (read from the cluster by `upgrade`)."""

    anchors_pem: str = ""
    issuer_crt_pem: str = ""
    issuer_key_pem: str = ""
    nats_tls: Optional[ServerTLS] = None
    bus: Optional[BusCredentials] = None
    # The values the installation was made with (ConfigMap tulle-install-values), without
    # secrets; None: not found (an installation made before it, or by Helm itself).
    install_values: Optional[dict] = None


@dataclass
class Completed:
    values: dict
    generated_trust: Optional[pki.CA] = None  # the new anchor (with its key), when trust was generated
    trust: Optional[TrustMaterial] = None
    generated: list[str] = field(default_factory=list)  # what else was generated, for the user
    kept_nats_tls: Optional[ServerTLS] = None


def _get(values: dict, path: str, default=None):
    node = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def _set(values: dict, path: str, value) -> None:
    parts = path.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def complete(user_values: dict, chart_defaults: dict, *, namespace: str, existing: Optional[Existing] = None,
             may_generate_trust: bool = True, trust_source: str = "") -> Completed:
    """`user_values` with every secret the chart requires filled in.

    `chart_defaults` are the chart's own values (to know the effective settings);
    `trust_source` words where an upgrade looked for trust material, for the error when
    there is none and none may be generated."""
    values = dict(user_values)
    existing = existing or Existing()
    effective = _merged(chart_defaults, values)
    cluster_domain = _get(effective, "clusterDomain", "cluster.local")
    trust_domain = _get(effective, "identityTrustDomain") or cluster_domain
    out = Completed(values)

    # Identity: the anchors always (the injector gives them to every proxy), the issuer
    # unless a Secret made outside the chart holds it.
    issuer_in_chart = _get(effective, "identity.issuer.scheme", "tulle.dev/tls") == "tulle.dev/tls"
    anchors = _get(values, "identityTrustAnchorsPEM") or existing.anchors_pem
    crt = _get(values, "identity.issuer.tls.crtPEM") or existing.issuer_crt_pem
    key = _get(values, "identity.issuer.tls.keyPEM") or existing.issuer_key_pem
    if not anchors and not crt and not key:
        if not may_generate_trust:
            raise UserError(f"no trust anchors to keep{': ' + trust_source if trust_source else ''} "
                            "(give --identity-trust-anchors-file and the issuer's files)")
        generated, anchor = material.generate_trust(trust_domain)
        anchors, crt, key = generated.anchors_pem, generated.issuer_crt_pem, generated.issuer_key_pem
        out.generated_trust = anchor
    elif not anchors:
        raise UserError("identityTrustAnchorsPEM: required with the issuer (the anchors that signed it)")
    elif issuer_in_chart and not (crt and key):
        which = "identity.issuer.tls.crtPEM" if not crt else "identity.issuer.tls.keyPEM"
        raise UserError(f"{which}: required with identityTrustAnchorsPEM "
                        "(Tulle cannot sign an issuer without the anchors' private key)")
    out.trust = TrustMaterial(anchors, crt, key)
    if issuer_in_chart:
        material.check_trust(out.trust)
        _set(values, "identity.issuer.tls.crtPEM", crt)
        _set(values, "identity.issuer.tls.keyPEM", key)
    else:
        material._certs(anchors, "identityTrustAnchorsPEM")
    _set(values, "identityTrustAnchorsPEM", anchors)

    # The injector webhook's TLS: regenerated on every install and upgrade, as Linkerd
    # does (its caBundle is rendered with it), unless given or managed outside the chart.
    if not _get(effective, "proxyInjector.externalSecret", False):
        if not _get(values, "proxyInjector.crtPEM"):
            tls = material.generate_webhook_tls(namespace, cluster_domain)
            _set(values, "proxyInjector.crtPEM", tls.crt_pem)
            _set(values, "proxyInjector.keyPEM", tls.key_pem)
            _set(values, "proxyInjector.caBundle", tls.ca_pem)
        else:
            material.check_server_tls(ServerTLS(_get(values, "proxyInjector.caBundle", "") or
                                                _get(values, "proxyInjector.crtPEM"),
                                                _get(values, "proxyInjector.crtPEM"),
                                                _get(values, "proxyInjector.keyPEM", "")), "proxyInjector")

    # The bus's TLS: kept across upgrades (every proxy holds its CA), generated once.
    given = [_get(values, f"nats.tls.{k}") for k in ("caPEM", "crtPEM", "keyPEM")]
    if all(given):
        material.check_server_tls(ServerTLS(*given), "nats.tls")
    elif any(given):
        raise UserError("nats.tls: give caPEM, crtPEM and keyPEM together")
    else:
        tls = existing.nats_tls
        if tls is None:
            tls = material.generate_nats_tls(namespace, cluster_domain)
            out.generated.append("the NATS servers' TLS certificate and its CA")
        else:
            out.kept_nats_tls = tls
        _set(values, "nats.tls.caPEM", tls.ca_pem)
        _set(values, "nats.tls.crtPEM", tls.crt_pem)
        _set(values, "nats.tls.keyPEM", tls.key_pem)

    # The bus credentials: kept across upgrades, generated once.
    auth = _get(values, "nats.auth", {}) or {}
    seed_keys = [f"{r}Seed" for r in credentials.ROLES] + ["calloutIssuerSeed"]
    present = [k for k in seed_keys if auth.get(k)]
    if present and len(present) != len(seed_keys):
        missing = [k for k in seed_keys if not auth.get(k)]
        raise UserError(f"nats.auth: give every role's seed or none (missing {', '.join(missing)})")
    if present:
        bus = BusCredentials.from_seeds({r: auth[f"{r}Seed"] for r in credentials.ROLES}, auth["calloutIssuerSeed"])
    elif existing.bus is not None:
        bus = existing.bus
    else:
        bus = credentials.generate_bus_credentials()
        out.generated.append("the bus credentials (one per control-plane role)")
    _set(values, "nats.auth", {**auth, **bus.values()})
    return out


def _merged(base: dict, override: dict) -> dict:
    from tulle.install.render import merge_values

    return merge_values(base, override)
